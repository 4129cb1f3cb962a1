"""OpenAI request bodies for /v1/completions and /v1/chat/completions: their checks, the
generation parameters they convert to, and errors in OpenAI's shape (APIError)."""

from __future__ import annotations

import json
import math
from typing import Any

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 4


# ---- errors ----------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# ---- request validation ----------------------------------------------------------------------------


def _number(
    body: dict,
    name: str,
    default: Any,
    *,
    integer: bool = False,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> Any:
    v = body.get(name)
    if v is None:
        return default
    kind = "an integer" if integer else "a number"
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, float))
        or (integer and not isinstance(v, int) and not (isinstance(v, float) and v.is_integer()))
    ):
        raise _bad(name, f"'{name}' must be {kind}, got {json.dumps(v)}", "invalid_type")
    if isinstance(v, float) and not math.isfinite(v):
        raise _bad(name, f"'{name}' must be finite, got {v}")
    v = int(v) if integer else float(v)
    if lo is not None and (v <= lo if lo_open else v < lo) or hi is not None and (v >= hi if hi_open else v > hi):
        lo_s = "" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
        hi_s = "" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
        rng = (
            f"in {lo_s}, {hi_s}"
            if lo is not None and hi is not None
            else (f"{'>' if lo_open else '>='} {lo:g}" if lo is not None else f"{'<' if hi_open else '<='} {hi:g}")
        )
        raise _bad(name, f"'{name}' must be {rng}, got {v}")
    return v


def _sampling(body: dict, default_max_tokens: int, max_tokens_names: tuple[str, ...]) -> dict[str, Any]:
    max_tokens = default_max_tokens
    for name in max_tokens_names:
        if body.get(name) is not None:
            max_tokens = _number(body, name, None, integer=True, lo=1)
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or any(not isinstance(s, str) for s in stop):
            raise _bad("stop", "'stop' must be a string or a list of strings", "invalid_type")
        if len(stop) > MAX_STOP_STRINGS:
            raise _bad("stop", f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
        stop = [s for s in stop if s] or None
    n = _number(body, "n", 1, integer=True, lo=1)
    if n != 1:
        raise _bad("n", "'n' must be 1: edgemoe generates one choice per request", "unsupported_value")
    best_of = _number(body, "best_of", 1, integer=True, lo=1)
    if best_of != 1:
        raise _bad("best_of", "'best_of' must be 1", "unsupported_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, lo=-2.0, hi=2.0) != 0.0:
            raise _bad(name, f"'{name}' is not supported (use 'repeat_penalty')", "unsupported_parameter")
    for name in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "logit_bias"):
        if body.get(name) not in (None, False, [], {}):
            raise _bad(name, f"'{name}' is not supported by edgemoe", "unsupported_parameter")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise _bad("response_format", 'only response_format {"type": "text"} is supported', "unsupported_value")
    return dict(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.8, lo=0.0, hi=2.0),
        top_p=_number(body, "top_p", 0.95, lo=0.0, hi=1.0, lo_open=True),
        top_k=_number(body, "top_k", 40, integer=True, lo=0),
        min_p=_number(body, "min_p", 0.05, lo=0.0, hi=1.0, hi_open=True),
        repeat_penalty=_number(body, "repeat_penalty", 1.0, lo=0.0, lo_open=True),
        seed=_number(body, "seed", None, integer=True, lo=0, hi=2**63 - 1),
        stop=stop,
    )


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream", "'stream' must be a boolean", "invalid_type")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise _bad("stream_options", "'stream_options' must be an object", "invalid_type")
        include_usage = opts.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise _bad("stream_options.include_usage", "'include_usage' must be a boolean", "invalid_type")
    return bool(stream), include_usage


def _prompt(body: dict) -> str | list[int]:
    if "prompt" not in body or body["prompt"] is None:
        raise _bad("prompt", "'prompt' is required", "missing_required_parameter")
    p = body["prompt"]
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return p
    if isinstance(p, list) and len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
        raise _bad("prompt", "batched prompts are not supported: send one prompt per request", "unsupported_value")
    raise _bad("prompt", "'prompt' must be a string or a non-empty list of token ids", "invalid_type")


def _messages(body: dict, roles: set[str]) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if msgs is None:
        raise _bad("messages", "'messages' is required", "missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "'messages' must be a non-empty array", "invalid_type")
    out = []
    for i, m in enumerate(msgs):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(param, f"'{param}' must be an object with 'role' and 'content'", "invalid_type")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if not isinstance(role, str) or role not in roles:
            raise _bad(
                f"{param}.role",
                f"'{param}.role' must be one of {', '.join(sorted(roles))}, got {json.dumps(m.get('role'))}",
            )
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise _bad(
                    f"{param}.content",
                    f'\'{param}.content\' parts must all be {{"type": "text", "text": ...}}',
                    "unsupported_value",
                )
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _bad(f"{param}.content", f"'{param}.content' must be a string", "invalid_type")
        out.append({"role": role, "content": content})
    return out
