"""A real HTTP server on 127.0.0.1 for tests, running in its own thread.

Tests register routes (status, headers, body; slow, trickling, endless, redirecting or
connection-resetting) and read back the requests it saw. It works the same from sync
and async tests, whatever their event loop. Every loop in it is bounded: bodies stop at
`max_body_bytes`, waits end when the server stops, and `stop()` returns promptly.

    with FakeHttpServer() as server:
        server.route("/cat.jpg", body=jpeg, headers={"Content-Type": "image/jpeg"})
        server.redirect("/old", "/cat.jpg")
        server.trickle("/slow", b"x" * 100, interval_s=1.0)
        url = server.url("/cat.jpg")
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass
class Route:
    """What the server answers on one path."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    # Content-Length to declare: None for len(body) (or none at all when streaming without an end),
    # False for none (the body ends when the connection closes), or an int, which may lie.
    content_length: int | bool | None = None
    # Seconds to wait before sending the status line.
    delay_s: float = 0.0
    # Send the body in pieces of this many bytes, waiting interval_s between them.
    chunk_size: int | None = None
    interval_s: float = 0.0
    # Repeat `body` without end (up to the server's max_body_bytes) instead of sending it once.
    endless: bool = False
    # Sent once before `body` (counted in max_body_bytes): e.g. the start of a stream `body` continues.
    prefix: bytes = b""
    # Reset the connection (TCP RST) instead of answering, or after this many body bytes.
    reset: bool = False
    reset_after_bytes: int | None = None


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


Handler = Callable[[RecordedRequest], Route]


class FakeHttpServer:
    def __init__(self, *, max_body_bytes: int = 64 * 1024 * 1024, max_wait_s: float = 30.0) -> None:
        self.max_body_bytes = max_body_bytes
        self.max_wait_s = max_wait_s
        self.requests: list[RecordedRequest] = []
        self._routes: dict[str, Route | Handler] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle

    def start(self) -> FakeHttpServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        server.daemon_threads = True
        server.block_on_close = False
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-http-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> FakeHttpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    # ---- routes

    def route(self, path: str, route: Route | Handler | None = None, **fields) -> None:
        """Answer `path` with `route` (a Route, or a callable that makes one from the request)
        or with a Route built from keyword fields."""
        with self._lock:
            self._routes[path] = route if route is not None else Route(**fields)

    def redirect(self, path: str, location: str, status: int = 302) -> None:
        self.route(path, status=status, headers={"Location": location})

    def trickle(self, path: str, body: bytes, *, chunk_size: int = 1, interval_s: float = 1.0,
                content_length: int | bool | None = None) -> None:
        self.route(path, body=body, chunk_size=chunk_size, interval_s=interval_s,
                   content_length=content_length)

    def endless(self, path: str, chunk: bytes = b"\0" * 65536, **fields) -> None:
        self.route(path, body=chunk, endless=True, **fields)

    def hits(self, path: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.requests if path is None or urlsplit(r.path).path == path)

    # ---- used by the handler

    def _record(self, request: RecordedRequest) -> Route:
        with self._lock:
            self.requests.append(request)
            route = self._routes.get(request.path) or self._routes.get(urlsplit(request.path).path)
        if route is None:
            return Route(status=404, body=b"not found")
        return route(request) if callable(route) else route

    def _wait(self, seconds: float) -> bool:
        """Sleep; False when the server is stopping."""
        return not self._stopping.wait(min(seconds, self.max_wait_s))


def _make_handler(owner: FakeHttpServer) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # keep test output clean
            pass

        def handle_one_request(self) -> None:
            try:
                super().handle_one_request()
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout):
                self.close_connection = True  # the client went away: nothing to answer

        def do_GET(self) -> None:
            self._answer()

        do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_GET

        def _answer(self) -> None:
            self.close_connection = True
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(min(length, owner.max_body_bytes)) if length else b""
            route = owner._record(RecordedRequest(self.command, self.path, dict(self.headers.items()), body))
            if route.delay_s and not owner._wait(route.delay_s):
                return
            if route.reset:
                self._reset()
                return
            self.send_response(route.status)
            for name, value in route.headers.items():
                self.send_header(name, value)
            declared = route.content_length
            if declared is None and not route.endless:
                declared = len(route.body)
            if declared is not None and declared is not False:
                self.send_header("Content-Length", str(int(declared)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self._send_body(route)

        def _send_body(self, route: Route) -> None:
            sent = 0
            limit = owner.max_body_bytes
            if route.prefix:
                self.wfile.write(route.prefix[:limit])
                sent += min(len(route.prefix), limit)
            piece = route.chunk_size or max(len(route.body), 1)
            while sent < limit and not owner._stopping.is_set():
                for start in range(0, len(route.body), piece):
                    chunk = route.body[start:start + piece][: limit - sent]
                    if route.reset_after_bytes is not None and sent + len(chunk) >= route.reset_after_bytes:
                        self.wfile.write(chunk[: route.reset_after_bytes - sent])
                        self.wfile.flush()
                        self._reset()
                        return
                    if not chunk:
                        return
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    sent += len(chunk)
                    if route.interval_s and not owner._wait(route.interval_s):
                        return
                if not route.endless or not route.body:
                    return

        def finish(self) -> None:
            try:
                super().finish()
            except (OSError, ValueError):
                pass  # the connection was reset on purpose, or the client left

        def _reset(self) -> None:
            # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

    return _Handler
