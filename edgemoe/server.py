"""`edgemoe serve`: an OpenAI-compatible HTTP server over one loaded Model.

Standard library only (http.server.ThreadingHTTPServer): the model computes synchronously and one
generation runs at a time, so a thread per connection is the natural fit; server-sent events are
plain writes and flushes, a client that goes away shows as a failed write (or a closed socket seen
between tokens) and stops the generation, and shutdown() stops the accept loop cleanly.

Endpoints: GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions
(with "stream": true: `data: {...}` events ending with `data: [DONE]`), GET /stats (JSON of
Model.stats(), see stats_to_dict), GET /metrics (Prometheus text), GET /health.
"""

from __future__ import annotations

import ipaddress
import json
import math
import select
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from . import metrics
from .errors import EdgeMoEError
from .tui.snapshot import stats_to_dict  # the one JSON shape of Stats (also the TUI's)

MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_QUEUE = 8
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 4
ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/stats", "/metrics", "/health")


# ---- /stats ----------------------------------------------------------------------------------------

# ---- errors ----------------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# ---- request validation ----------------------------------------------------------------------------

def _number(body: dict, name: str, default: Any, *, integer: bool = False, lo: float | None = None,
            hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Any:
    v = body.get(name)
    if v is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int) and
                                                                    not (isinstance(v, float) and v.is_integer())):
        raise _bad(name, f"'{name}' must be {kind}, got {json.dumps(v)}", "invalid_type")
    if isinstance(v, float) and not math.isfinite(v):
        raise _bad(name, f"'{name}' must be finite, got {v}")
    v = int(v) if integer else float(v)
    if lo is not None and (v <= lo if lo_open else v < lo) or hi is not None and (v >= hi if hi_open else v > hi):
        lo_s = "" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
        hi_s = "" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
        rng = f"in {lo_s}, {hi_s}" if lo is not None and hi is not None else (
            f"{'>' if lo_open else '>='} {lo:g}" if lo is not None else f"{'<' if hi_open else '<='} {hi:g}")
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
        raise _bad("response_format", "only response_format {\"type\": \"text\"} is supported", "unsupported_value")
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
            raise _bad(f"{param}.role", f"'{param}.role' must be one of {', '.join(sorted(roles))}, got "
                       f"{json.dumps(m.get('role'))}")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad(f"{param}.content", f"'{param}.content' parts must all be {{\"type\": \"text\", "
                           f"\"text\": ...}}", "unsupported_value")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _bad(f"{param}.content", f"'{param}.content' must be a string", "invalid_type")
        out.append({"role": role, "content": content})
    return out


# ---- admission -----------------------------------------------------------------------------------

class Gate:
    """One generation at a time (the model's lock) and at most max_queue requests waiting behind it."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.in_flight = 0
        self.running = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    @property
    def queue_depth(self) -> int:
        return max(self.in_flight - self.running, 0)

    @contextmanager
    def admit(self) -> Iterator[None]:
        with self._lock:
            if self.in_flight >= 1 + self.max_queue:
                raise APIError(429, f"the server is busy: one request is generating and {self.max_queue} are "
                               f"waiting (--max-queue); retry later", type="rate_limit_error", code="queue_full")
            self.in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1
                self._idle.notify_all()

    @contextmanager
    def run(self, model_lock: Any) -> Iterator[None]:
        with model_lock:
            with self._lock:
                self.running += 1
            try:
                yield
            finally:
                with self._lock:
                    self.running -= 1

    def wait_idle(self, timeout: float) -> bool:
        with self._lock:
            return self._idle.wait_for(lambda: self.in_flight == 0, timeout)


class _Strip:
    """Streams text with leading and trailing whitespace removed, as Model.chat does for base models."""

    def __init__(self) -> None:
        self.started = False
        self.held = ""

    def feed(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.held + text
        kept = text.rstrip()
        self.held = text[len(kept):]
        return kept


class ClientGone(Exception):
    pass


# ---- the server ----------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], app: Server):
        self.app = app
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        super().__init__(addr, _Handler)


class Server:
    """Serve `model` over HTTP. start() runs in a background thread, serve_forever() in this one;
    close() stops accepting, stops running generations at their next token and waits for them.

    A host that is not loopback is refused unless allow_remote=True (the CLI passes it when --host is
    given explicitly, and prints a warning)."""

    def __init__(self, model: Any, host: str = "127.0.0.1", port: int = 8080, *, max_queue: int = DEFAULT_MAX_QUEUE,
                 name: str | None = None, allow_remote: bool = False, log: bool = False):
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise EdgeMoEError(f"max_queue must be an int >= 0, got {max_queue!r}")
        if not allow_remote and not is_loopback(host):
            raise EdgeMoEError(f"host {host!r} is not a loopback address; pass it explicitly with --host "
                               f"(allow_remote=True) to serve beyond this machine")
        self.model = model
        self.name = name or model.path.stem
        self.created = int(model.path.stat().st_mtime) if model.path.exists() else int(time.time())
        self.gate = Gate(max_queue)
        self.log = log
        self.stopping = threading.Event()
        self.requests: Counter[tuple[str, int]] = Counter()
        self._counts_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._serving = False
        try:
            self.httpd = _HTTPServer((host, port), self)
        except OSError as exc:
            raise EdgeMoEError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.host = host
        self.port = self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def model_lock(self) -> Any:
        return self.model._lock

    def count(self, endpoint: str, status: int) -> None:
        with self._counts_lock:
            self.requests[(endpoint, status)] += 1

    def stats(self) -> Any:
        for _ in range(5):  # the expert cache may change while it is read during a generation
            try:
                return self.model.stats()
            except RuntimeError:
                time.sleep(0.01)
        with self.model_lock():
            return self.model.stats()

    def serve_forever(self) -> None:
        self._serving = True
        try:
            self.httpd.serve_forever(poll_interval=0.2)
        finally:
            self._serving = False

    def start(self) -> Server:
        self._thread = threading.Thread(target=self.serve_forever, name="edgemoe-server", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop accepting, stop generations at their next token, wait for them (up to timeout s)."""
        self.stopping.set()
        if self._serving:
            self.httpd.shutdown()
        if self._thread is not None:
            self._thread.join(timeout)
        self.httpd.server_close()
        self.gate.wait_idle(timeout)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "edgemoe"
    timeout = 120  # seconds a client may take to send a request or to read a chunk

    server: _HTTPServer

    @property
    def app(self) -> Server:
        return self.server.app

    def log_message(self, format: str, *args: Any) -> None:
        if self.app.log:
            sys.stderr.write(f"edgemoe: {self.address_string()} {format % args}\n")

    # ---- plumbing

    def _endpoint(self) -> str:
        path = self.path.split("?", 1)[0]
        if path.startswith("/v1/models/"):
            return "/v1/models"
        return path if path in ENDPOINTS else "other"

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.app.count(self._endpoint(), status)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", headers)

    def _error(self, err: APIError) -> None:
        headers = {"Retry-After": "1"} if err.status == 429 else None
        self._json(err.status, err.body(), headers)

    def _read_json(self) -> dict[str, Any]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise APIError(411, "chunked request bodies are not supported: send Content-Length")
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            self.close_connection = True
            raise APIError(400, "bad Content-Length header") from None
        if n < 0 or n > MAX_BODY_BYTES:
            self.close_connection = True
            raise APIError(413, f"request body too large ({n} bytes; at most {MAX_BODY_BYTES})")
        raw = self.rfile.read(n) if n else b""
        if not raw.strip():
            raise APIError(400, "the request body is empty: send a JSON object", code="invalid_json")
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    def _check_model(self, body: dict) -> None:
        name = body.get("model")
        if name is None:
            return  # edgemoe serves one model; OpenAI requires the field, edgemoe lets it default
        if not isinstance(name, str):
            raise _bad("model", "'model' must be a string", "invalid_type")
        if name not in (self.app.name, self.app.model.path.name):
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{self.app.name}'",
                           param="model", code="model_not_found")

    def _dispatch(self, routes: dict[str, Any]) -> None:
        path = self.path.split("?", 1)[0]
        try:
            handler = routes.get(path)
            if handler is None and path.startswith("/v1/models/") and "/v1/models" in routes:
                handler = lambda: self._model_one(path[len("/v1/models/"):])
            if handler is None:
                self.close_connection = True  # the body, if any, was not read
                if path in ENDPOINTS or path.startswith("/v1/models/"):
                    raise APIError(405, f"method {self.command} is not allowed on {path}",
                                   code="method_not_allowed")
                raise APIError(404, f"unknown endpoint {self.command} {path}", code="not_found")
            handler()
        except APIError as err:
            self._error(err)
        except (BrokenPipeError, ConnectionResetError, ClientGone):
            self.close_connection = True
            self.app.count(self._endpoint(), 499)
        except Exception as exc:  # a bug: answer 500 in the API's shape, keep serving
            self.close_connection = True
            try:
                self._error(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))
            except OSError:
                pass
            if self.app.log:
                import traceback

                traceback.print_exc()

    def do_GET(self) -> None:
        self._dispatch({"/v1/models": self._models, "/stats": self._stats, "/metrics": self._metrics,
                        "/health": self._health})

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_POST(self) -> None:
        self._dispatch({"/v1/completions": lambda: self._generate(chat=False),
                        "/v1/chat/completions": lambda: self._generate(chat=True)})

    # ---- GET endpoints

    def _model_obj(self) -> dict[str, Any]:
        return {"id": self.app.name, "object": "model", "created": self.app.created, "owned_by": "edgemoe"}

    def _models(self) -> None:
        self._json(200, {"object": "list", "data": [self._model_obj()]})

    def _model_one(self, name: str) -> None:
        if name not in (self.app.name, self.app.model.path.name):
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{self.app.name}'",
                           param="model", code="model_not_found")
        self._json(200, self._model_obj())

    def _health(self) -> None:
        self._json(200, {"status": "ok", "model": self.app.name})

    def _stats(self) -> None:
        self._json(200, stats_to_dict(self.app.stats()))

    def _metrics(self) -> None:
        app = self.app
        with app._counts_lock:
            requests = dict(app.requests)
        text = metrics.render(app.stats(), queue_depth=app.gate.queue_depth, in_flight=app.gate.in_flight,
                              requests=requests, model=app.name)
        self._send(200, text.encode(), metrics.CONTENT_TYPE)

    # ---- generation

    def _generate(self, chat: bool) -> None:
        body = self._read_json()
        self._check_model(body)
        if chat:
            from .tokenizer import PLAIN_ROLES

            messages = _messages(body, set(PLAIN_ROLES))
            params = _sampling(body, 0, ("max_tokens", "max_completion_tokens"))
        else:
            prompt = _prompt(body)
            params = _sampling(body, COMPLETION_DEFAULT_MAX_TOKENS, ("max_tokens",))
        stream, include_usage = _stream_flags(body)
        app = self.app
        model = app.model
        if app.stopping.is_set():
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        with app.gate.admit(), app.gate.run(app.model_lock()):
            if app.stopping.is_set():
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            strip = None
            try:
                if chat:
                    tok = model._tok
                    text_prompt, extra_stops = tok.apply_chat_template(messages)
                    n_prompt = len(model.tokenize(text_prompt, add_bos=not tok.chat_template, special=True))
                    if not params["max_tokens"]:  # OpenAI's chat default: as much as the context holds
                        params["max_tokens"] = max(model.n_ctx - n_prompt, 1)
                    it = model.chat(messages, stream=True, **params)
                    strip = _Strip() if extra_stops else None
                else:
                    if isinstance(prompt, str):
                        n_prompt = len(model.tokenize(prompt, add_bos=True, special=True))
                    else:
                        n_prompt = len(prompt)
                    it = model.stream(prompt, **params)
            except EdgeMoEError as exc:
                raise APIError(400, str(exc), code="invalid_value") from None
            try:
                if stream:
                    self._respond_stream(it, chat, n_prompt, include_usage, strip)
                else:
                    self._respond_once(it, chat, n_prompt, strip)
            finally:
                it.close()  # stops the generation (and releases the model lock) if it did not finish

    def _run(self, it: Iterator[Any], check_client: bool) -> Iterator[tuple[str, str | None]]:
        """(text, finish_reason) per token; stops when the server stops or the client goes away."""
        sock = self.connection
        for r in it:
            yield r.text, r.finish_reason
            if r.finish_reason is not None:
                return
            if self.app.stopping.is_set():
                raise ClientGone("the server is shutting down")
            if check_client and _peer_closed(sock):
                raise ClientGone("the client closed the connection")

    def _respond_once(self, it: Iterator[Any], chat: bool, n_prompt: int, strip: _Strip | None) -> None:
        texts, finish, n = [], None, 0
        for text, fin in self._run(it, check_client=True):
            texts.append(text)
            finish = fin
            n += 1
        out = "".join(texts)
        if strip is not None:
            out = out.strip()
        cid, created, name = _new_id(chat), int(time.time()), self.app.name
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": out}, "logprobs": None,
                      "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": out, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        self._json(200, {"id": cid, "object": obj, "created": created, "model": name, "choices": [choice],
                         "usage": usage, "system_fingerprint": None})

    def _respond_stream(self, it: Iterator[Any], chat: bool, n_prompt: int, include_usage: bool,
                        strip: _Strip | None) -> None:
        cid, created, name = _new_id(chat), int(time.time()), self.app.name
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> dict[str, Any]:
            c: dict[str, Any] = {"id": cid, "object": obj, "created": created, "model": name,
                                 "system_fingerprint": None, "choices": [choice] if choice else []}
            if include_usage:
                c["usage"] = usage
            return c

        def choice(text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        status = 200
        try:
            if chat:
                self._event(chunk(choice("", None, role=True)))
            n = 0
            for text, finish in self._run(it, check_client=True):
                n += 1
                if strip is not None:
                    text = strip.feed(text)
                if finish is not None:
                    if text:
                        self._event(chunk(choice(text, None)))
                    self._event(chunk(choice(None if chat else "", finish)))
                elif text:
                    self._event(chunk(choice(text, None)))
            if include_usage:
                self._event(chunk(None, {"prompt_tokens": n_prompt, "completion_tokens": n,
                                         "total_tokens": n_prompt + n}))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ClientGone):
            status = 499  # nginx's "client closed request"
            raise ClientGone() from None
        except EdgeMoEError as exc:  # after the headers: an error event, then the end of the stream
            status = 400
            self._event(APIError(400, str(exc)).body())
        except Exception as exc:
            status = 500
            self._event(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").body())
        finally:
            if status != 499:
                self.app.count(self._endpoint(), status)

    def _event(self, obj: Any) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()


def _new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def _peer_closed(sock: socket.socket) -> bool:
    """True if the client has closed its end (readable with nothing to read)."""
    try:
        r, _, _ = select.select([sock], [], [], 0)
        if not r:
            return False
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except (OSError, ValueError):
        return True


# ---- the command -----------------------------------------------------------------------------------

def serve(model: Any, host: str | None = None, port: int = 8080, *, max_queue: int = DEFAULT_MAX_QUEUE,
          log: bool = True) -> None:
    """Run the server in this thread until Ctrl+C (or SIGTERM); host None = 127.0.0.1."""
    import signal

    explicit = host is not None
    host = host or "127.0.0.1"
    remote = not is_loopback(host)
    srv = Server(model, host, port, max_queue=max_queue, allow_remote=explicit, log=log)
    if remote:
        print(f"edgemoe: warning: serving on {host}, which is not a loopback address: anyone who can reach "
              f"this machine can use the model (there is no authentication)", file=sys.stderr)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = {}
    if threading.current_thread() is threading.main_thread():  # also when started with SIGINT ignored (cmd &)
        old = {sig: signal.signal(sig, on_term) for sig in (signal.SIGINT, signal.SIGTERM)}
    print(f"edgemoe: serving {srv.name} at {srv.url}/v1 (max queue {max_queue}); Ctrl+C stops", file=sys.stderr,
          flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        print("\nedgemoe: stopping", file=sys.stderr, flush=True)
    finally:
        srv.close()
        for sig, handler in old.items():
            signal.signal(sig, handler)
