"""`edgemoe serve`: an OpenAI-compatible HTTP server over one loaded Model.

Standard library only (http.server.ThreadingHTTPServer): the model computes synchronously and one
generation runs at a time, so a thread per connection is the natural fit; server-sent events are
plain writes and flushes, a client that goes away shows as a failed write (or a closed socket seen
between tokens) and stops the generation, and shutdown() stops the accept loop cleanly.

Endpoints: GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions
(with "stream": true: `data: {...}` events ending with `data: [DONE]`), GET /stats (JSON of
Model.stats(), edgemoe.runtime.stats.stats_to_dict), GET /metrics (Prometheus text), GET /health.

This module holds the server, its admission gate and the command; handler.py answers the requests,
schema.py checks OpenAI's request bodies.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from typing import Any

from ..errors import EdgeMoEError
from .handler import _Handler
from .schema import APIError

DEFAULT_MAX_QUEUE = 8


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
                raise APIError(
                    429,
                    f"the server is busy: one request is generating and {self.max_queue} are "
                    f"waiting (--max-queue); retry later",
                    type="rate_limit_error",
                    code="queue_full",
                )
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

    def __init__(
        self,
        model: Any,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        name: str | None = None,
        allow_remote: bool = False,
        log: bool = False,
        max_tokens: int | None = None,
    ):
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
        ):
            raise EdgeMoEError(f"max_tokens must be a positive int, got {max_tokens!r}")
        self.max_tokens = max_tokens  # for requests that name none (None: OpenAI's defaults)
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise EdgeMoEError(f"max_queue must be an int >= 0, got {max_queue!r}")
        if not allow_remote and not is_loopback(host):
            raise EdgeMoEError(
                f"host {host!r} is not a loopback address; pass it explicitly with --host "
                f"(allow_remote=True) to serve beyond this machine"
            )
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
        return self.model.lock

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


# ---- the command -----------------------------------------------------------------------------------


def serve(
    model: Any,
    host: str | None = None,
    port: int = 8080,
    *,
    max_queue: int = DEFAULT_MAX_QUEUE,
    log: bool = True,
    max_tokens: int | None = None,
) -> None:
    """Run the server in this thread until Ctrl+C (or SIGTERM); host None = 127.0.0.1; max_tokens:
    the default of requests that name none (llama-server's -n)."""
    import signal

    explicit = host is not None
    host = host or "127.0.0.1"
    remote = not is_loopback(host)
    srv = Server(model, host, port, max_queue=max_queue, allow_remote=explicit, log=log, max_tokens=max_tokens)
    if remote:
        print(
            f"edgemoe: warning: serving on {host}, which is not a loopback address: anyone who can reach "
            f"this machine can use the model (there is no authentication)",
            file=sys.stderr,
        )

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = {}
    if threading.current_thread() is threading.main_thread():  # also when started with SIGINT ignored (cmd &)
        old = {sig: signal.signal(sig, on_term) for sig in (signal.SIGINT, signal.SIGTERM)}
    print(
        f"edgemoe: serving {srv.name} at {srv.url}/v1 (max queue {max_queue}); Ctrl+C stops",
        file=sys.stderr,
        flush=True,
    )
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        print("\nedgemoe: stopping", file=sys.stderr, flush=True)
    finally:
        srv.close()
        for sig, handler in old.items():
            signal.signal(sig, handler)
