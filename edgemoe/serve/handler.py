"""The HTTP request handler of `edgemoe serve`: routing, the GET endpoints, and generation answered
as one JSON object or as server-sent events (see server.py for the server and its admission gate)."""

from __future__ import annotations

import json
import select
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

from ..errors import EdgeMoEError
from ..runtime.stats import stats_to_dict  # the one JSON shape of Stats (the monitor reads it back)
from . import metrics
from .schema import COMPLETION_DEFAULT_MAX_TOKENS, APIError, _bad, _messages, _prompt, _sampling, _stream_flags

if TYPE_CHECKING:
    from .server import Server, _HTTPServer

MAX_BODY_BYTES = 8 * 1024 * 1024
ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/stats", "/metrics", "/health")
# read-only endpoints that monitors poll (`edgemoe monitor` every second, Prometheus, health checks):
# their successful GETs are not logged; completions and errors are
QUIET = ("/stats", "/metrics", "/v1/models", "/health")


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
        self.held = text[len(kept) :]
        return kept


class ClientGone(Exception):
    pass


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

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        polled = self.command in ("GET", "HEAD") and self._endpoint() in QUIET
        if polled and str(getattr(code, "value", code)).startswith(("2", "3")):
            return  # a poll that read something: quiet
        super().log_request(code, size)

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
            raise APIError(
                404,
                f"the model '{name}' does not exist; this server serves '{self.app.name}'",
                param="model",
                code="model_not_found",
            )

    def _dispatch(self, routes: dict[str, Any]) -> None:
        path = self.path.split("?", 1)[0]
        try:
            handler = routes.get(path)
            if handler is None and path.startswith("/v1/models/") and "/v1/models" in routes:
                handler = lambda: self._model_one(path[len("/v1/models/") :])
            if handler is None:
                self.close_connection = True  # the body, if any, was not read
                if path in ENDPOINTS or path.startswith("/v1/models/"):
                    raise APIError(405, f"method {self.command} is not allowed on {path}", code="method_not_allowed")
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
        self._dispatch(
            {"/v1/models": self._models, "/stats": self._stats, "/metrics": self._metrics, "/health": self._health}
        )

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_POST(self) -> None:
        self._dispatch(
            {
                "/v1/completions": lambda: self._generate(chat=False),
                "/v1/chat/completions": lambda: self._generate(chat=True),
            }
        )

    # ---- GET endpoints

    def _model_obj(self) -> dict[str, Any]:
        return {"id": self.app.name, "object": "model", "created": self.app.created, "owned_by": "edgemoe"}

    def _models(self) -> None:
        self._json(200, {"object": "list", "data": [self._model_obj()]})

    def _model_one(self, name: str) -> None:
        if name not in (self.app.name, self.app.model.path.name):
            raise APIError(
                404,
                f"the model '{name}' does not exist; this server serves '{self.app.name}'",
                param="model",
                code="model_not_found",
            )
        self._json(200, self._model_obj())

    def _health(self) -> None:
        self._json(200, {"status": "ok", "model": self.app.name})

    def _stats(self) -> None:
        self._json(200, stats_to_dict(self.app.stats()))

    def _metrics(self) -> None:
        app = self.app
        with app._counts_lock:
            requests = dict(app.requests)
        text = metrics.render(
            app.stats(),
            queue_depth=app.gate.queue_depth,
            in_flight=app.gate.in_flight,
            requests=requests,
            model=app.name,
        )
        self._send(200, text.encode(), metrics.CONTENT_TYPE)

    # ---- generation

    def _generate(self, chat: bool) -> None:
        body = self._read_json()
        self._check_model(body)
        if chat:
            from ..models.tokenizer import PLAIN_ROLES

            messages = _messages(body, set(PLAIN_ROLES))
            params = _sampling(body, self.app.max_tokens or 0, ("max_tokens", "max_completion_tokens"))
        else:
            prompt = _prompt(body)
            params = _sampling(body, self.app.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS, ("max_tokens",))
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
                    tok = model.tokenizer
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
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": out},
                "logprobs": None,
                "finish_reason": finish,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": out, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        self._json(
            200,
            {
                "id": cid,
                "object": obj,
                "created": created,
                "model": name,
                "choices": [choice],
                "usage": usage,
                "system_fingerprint": None,
            },
        )

    def _respond_stream(
        self, it: Iterator[Any], chat: bool, n_prompt: int, include_usage: bool, strip: _Strip | None
    ) -> None:
        cid, created, name = _new_id(chat), int(time.time()), self.app.name
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> dict[str, Any]:
            c: dict[str, Any] = {
                "id": cid,
                "object": obj,
                "created": created,
                "model": name,
                "system_fingerprint": None,
                "choices": [choice] if choice else [],
            }
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
                self._event(
                    chunk(None, {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n})
                )
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
