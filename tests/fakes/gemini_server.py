"""A fake Gemini REST server on loopback, for tests and benchmarks.

It speaks `POST /v1beta/models/{model}:generateContent` like the real API, serves from its own
threads (so it keeps answering while a test's event loop is blocked, and a worker in another
process can call it by `url`), records every request, and answers as scripted:

    async with FakeGemini(api_key="k") as fake:           # or: with FakeGemini() as fake
        fake.plan("model-a", [Reply.status(429, retry_after=1), Reply.ok()])
        fake.default = Reply.slow(20)                      # when a model's plan is used up
        ...                                                # GEMINI_BASE_URL=fake.url
        fake.requests_for("model-a")[0].inline_images      # [InlineImage(mime_type, size, sha256)]

From another process: `python -m tests.fakes.gemini_server --port 0 --delay 2` prints its URL;
`RemoteFakeGemini(url)` plans replies and reads requests through the `/_fake/...` endpoints.

Quota mode stands in for a provider's quota: at most `max_in_flight` calls are served at once,
each taking `call_s`; a call beyond that is answered 429 RESOURCE_EXHAUSTED with Retry-After.
`fake.quota_stats()` tells the most calls ever in flight and how many 429s were answered:

    fake.set_quota(max_in_flight=4, call_s=2.0, retry_after="1")
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import io
import json
import re
import signal
import socket
import socketserver
import struct
import threading
import time
from collections import defaultdict, deque
from dataclasses import asdict, dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterable
from urllib.parse import urlsplit

from PIL import Image, ImageOps

_PATH = re.compile(r"/v1beta/models/([^/:]+):generateContent")
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 502: "UNAVAILABLE",
    503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}
_KINDS = {"ok", "status", "blocked", "finish", "no_image", "garbage", "hang", "reset", "truncated"}


@dataclass
class Reply:
    """One planned answer. Any reply may wait `delay_s` first (the server's stop cuts the wait short)."""

    kind: str = "ok"
    status: int = 200
    retry_after: str | None = None
    message: str = ""
    reason: str = ""
    text: str = ""
    retry_delay: str | None = None  # status: a google.rpc.RetryInfo retryDelay in the body ("27s")
    delay_s: float = 0.0
    image_count: int = 1
    derived: bool = True  # ok: the image is made from the first input image when there is one
    snake_case: bool = False  # ok: answer with inline_data/mime_type instead of inlineData/mimeType

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown reply kind {self.kind!r}; one of {sorted(_KINDS)}")

    @classmethod
    def ok(cls, *, image_count: int = 1, derived: bool = True, snake_case: bool = False,
           text: str = "Here is the image.", delay_s: float = 0.0) -> Reply:
        return cls("ok", image_count=image_count, derived=derived, snake_case=snake_case, text=text, delay_s=delay_s)

    @classmethod
    def status(cls, code: int, *, retry_after: float | str | None = None, message: str = "",
               retry_delay: str | None = None) -> Reply:
        return cls("status", status=code, retry_after=None if retry_after is None else str(retry_after),
                   message=message or f"fake error {code}", retry_delay=retry_delay)

    @classmethod
    def blocked(cls, reason: str = "SAFETY") -> Reply:
        """The prompt itself was blocked: promptFeedback.blockReason, no candidates."""
        return cls("blocked", reason=reason)

    @classmethod
    def finish(cls, reason: str = "SAFETY") -> Reply:
        """A candidate stopped with this finishReason and no image."""
        return cls("finish", reason=reason)

    @classmethod
    def safety(cls) -> Reply:
        return cls.finish("SAFETY")

    @classmethod
    def no_image(cls, text: str = "I can only describe it in words.") -> Reply:
        return cls("no_image", text=text)

    @classmethod
    def truncated(cls) -> Reply:
        """A well-formed answer whose image is a PNG cut in half: the provider's own failure."""
        return cls("truncated")

    @classmethod
    def garbage(cls) -> Reply:
        return cls("garbage")

    @classmethod
    def slow(cls, delay_s: float, then: Reply | None = None) -> Reply:
        return replace(then or cls.ok(), delay_s=delay_s)

    @classmethod
    def hang(cls) -> Reply:
        """Never answer; the connection is closed when the server stops."""
        return cls("hang")

    @classmethod
    def reset(cls) -> Reply:
        """Close the socket with a TCP reset, without an answer."""
        return cls("reset")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Reply:
        return cls(**data)


@dataclass
class InlineImage:
    mime_type: str
    size: int  # decoded bytes
    sha256: str


@dataclass
class RecordedRequest:
    method: str
    path: str
    model: str | None
    headers: dict[str, str]
    json: Any  # the parsed body, inline data replaced by "<N base64 chars>" to keep memory bounded
    inline_images: list[InlineImage] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    key_ok: bool = False
    reply: str = ""  # kind of the reply given ("auth", "not_found", "bad_json" for the server's own answers)
    at: float = 0.0

    @property
    def api_key(self) -> str | None:
        return self.headers.get("x-goog-api-key")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Quota:
    """Quota mode: at most `max_in_flight` calls at once, each `call_s` long; 429 beyond."""

    max_in_flight: int = 1
    call_s: float = 0.0
    retry_after: str | None = "1"


@dataclass
class QuotaStats:
    in_flight: int = 0
    max_in_flight_seen: int = 0
    busy_answers: int = 0
    served: int = 0
    # (time.time(), calls in flight) at every change, for charts; bounded.
    timeline: list[tuple[float, int]] = field(default_factory=list)


_TIMELINE_KEPT = 200_000


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # benchmarks open many connections at once
    fake: FakeGemini

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), which can stall; loopback needs none of it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001 - socketserver hook
        pass  # clients that time out or reset are expected here


class FakeGemini:
    def __init__(self, *, api_key: str | None = "test-gemini-key", host: str = "127.0.0.1", port: int = 0,
                 default: Reply | None = None) -> None:
        # api_key None: any non-empty key is accepted.
        self.api_key = api_key
        self.default = default or Reply.ok()
        self._address = (host, port)
        self._lock = threading.Lock()
        self._plans: dict[str, deque[Reply]] = defaultdict(deque)
        self._requests: list[RecordedRequest] = []
        self._stopping = threading.Event()
        self._quota: Quota | None = None
        self._stats = QuotaStats()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle

    def start(self) -> FakeGemini:
        self._stopping.clear()
        self._server = _Server(self._address, _Handler)
        self._server.fake = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-gemini", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes slow and hanging handlers, which then close their connections
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> FakeGemini:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> FakeGemini:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the fake Gemini server is not running")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self._address[0]}:{self.port}"

    # ---- script

    def plan(self, model: str, replies: Iterable[Reply]) -> None:
        """Queue replies for `model`, answered in order; afterwards `default` answers."""
        with self._lock:
            self._plans[model].extend(replies)

    def set_quota(self, max_in_flight: int | None, call_s: float = 0.0, retry_after: str | None = "1") -> None:
        """Turn quota mode on (or off with None); its counters start again from zero."""
        with self._lock:
            self._quota = None if max_in_flight is None else Quota(max_in_flight, call_s, retry_after)
            self._stats = QuotaStats()

    def quota_stats(self) -> QuotaStats:
        with self._lock:
            return replace(self._stats, timeline=list(self._stats.timeline))

    def _enter_quota(self) -> tuple[bool, Quota | None]:
        """(admitted, quota): a call is admitted when quota mode is off or a place is free."""
        with self._lock:
            quota, stats = self._quota, self._stats
            if quota is None:
                return True, None
            if stats.in_flight >= quota.max_in_flight:
                stats.busy_answers += 1
                return False, quota
            stats.in_flight += 1
            stats.served += 1
            stats.max_in_flight_seen = max(stats.max_in_flight_seen, stats.in_flight)
            if len(stats.timeline) < _TIMELINE_KEPT:
                stats.timeline.append((time.time(), stats.in_flight))
            return True, quota

    def _leave_quota(self) -> None:
        with self._lock:
            stats = self._stats
            stats.in_flight -= 1
            if len(stats.timeline) < _TIMELINE_KEPT:
                stats.timeline.append((time.time(), stats.in_flight))

    def pending(self, model: str) -> int:
        with self._lock:
            return len(self._plans[model])

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()
            self._requests.clear()

    def _next_reply(self, model: str) -> Reply:
        with self._lock:
            queue = self._plans.get(model)
            return queue.popleft() if queue else self.default

    # ---- what it received

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def requests_for(self, model: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.model == model]

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    async def wait_for_requests(self, count: int, *, timeout_s: float = 5.0) -> list[RecordedRequest]:
        deadline = time.monotonic() + timeout_s
        while len(self.requests) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fake Gemini got {len(self.requests)} requests, expected {count}")
            await asyncio.sleep(0.01)
        return self.requests


def _summarise_parts(body: Any) -> tuple[Any, list[InlineImage], list[str]]:
    """Inline images and texts of the request; the body returned without the base64 data."""
    images: list[InlineImage] = []
    texts: list[str] = []
    if not isinstance(body, dict):
        return body, images, texts
    body = json.loads(json.dumps(body))  # a private copy to strip
    for content in body.get("contents") or []:
        for part in (content.get("parts") or []) if isinstance(content, dict) else []:
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("text"), str):
                texts.append(part["text"])
            inline = part.get("inline_data") or part.get("inlineData")
            if isinstance(inline, dict):
                data = inline.get("data") or ""
                try:
                    raw = base64.b64decode(data, validate=True)
                except (binascii.Error, ValueError, TypeError):
                    raw = b""
                images.append(InlineImage(mime_type=inline.get("mime_type") or inline.get("mimeType") or "",
                                          size=len(raw), sha256=hashlib.sha256(raw).hexdigest()))
                inline["data"] = f"<{len(data)} base64 chars>"
    return body, images, texts


def _first_input_image(raw_body: Any) -> bytes | None:
    try:
        for part in raw_body["contents"][0]["parts"]:
            inline = part.get("inline_data") or part.get("inlineData")
            if inline:
                return base64.b64decode(inline["data"])
    except (KeyError, IndexError, TypeError, AttributeError, binascii.Error, ValueError):
        pass
    return None


def make_png(model: str, index: int = 0, source: bytes | None = None, size: int = 128) -> bytes:
    """A real small PNG: the input image turned into a tinted thumbnail, or a gradient."""
    image: Image.Image | None = None
    if source:
        try:
            with Image.open(io.BytesIO(source)) as opened:
                image = ImageOps.fit(opened.convert("RGB"), (size, size))
            image = ImageOps.colorize(ImageOps.grayscale(image), black=(20, 10, 40), white=(255, 230, 200))
        except (OSError, ValueError):
            image = None
    if image is None:
        seed = hashlib.sha256(f"{model}:{index}".encode()).digest()
        image = ImageOps.colorize(Image.linear_gradient("L").resize((size, size)),
                                  black=tuple(seed[0:3]), white=tuple(seed[3:6]))
    if index:
        image = image.rotate(90 * index)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeGemini/1.0"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    # ---- plumbing

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send_bytes(status, json.dumps(payload).encode(), headers)

    def _send_bytes(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._send_json(status, {"error": {"code": status, "message": message,
                                           "status": _STATUS_NAMES.get(status, "UNKNOWN")}}, headers)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    # ---- the API

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        path = urlsplit(self.path).path
        fake = self.server.fake
        if path == "/_fake/health":
            self._send_json(200, {"ok": True})
        elif path == "/_fake/requests":
            self._send_json(200, {"requests": [r.to_dict() for r in fake.requests]})
        elif path == "/_fake/quota":
            self._send_json(200, asdict(fake.quota_stats()))
        else:
            self._error(404, f"no such path {path}")

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        fake = self.server.fake
        raw = self._read_body()
        path = urlsplit(self.path).path
        if path.startswith("/_fake/"):
            return self._control(path, raw)

        match = _PATH.fullmatch(path)
        model = match.group(1) if match else None
        try:
            body: Any = json.loads(raw) if raw else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        stripped, inline_images, texts = _summarise_parts(body)
        key = self.headers.get("x-goog-api-key")
        key_ok = bool(key) and (fake.api_key is None or key == fake.api_key)
        record = RecordedRequest(method="POST", path=path, model=model,
                                 headers={k.lower(): v for k, v in self.headers.items()}, json=stripped,
                                 inline_images=inline_images, texts=texts, key_ok=key_ok, at=time.time())

        if not key:
            record.reply = "auth"
            fake._record(record)
            return self._error(401, "Method doesn't allow unregistered callers. Please use an API key.")
        if not key_ok:
            record.reply = "auth"
            fake._record(record)
            return self._error(403, "Permission denied: the API key is not valid.")
        if model is None:
            record.reply = "not_found"
            fake._record(record)
            return self._error(404, f"no such method {path}")
        if not isinstance(body, dict) or not isinstance(body.get("contents"), list):
            record.reply = "bad_json"
            fake._record(record)
            return self._error(400, "Invalid JSON payload received.")

        admitted, quota = fake._enter_quota()
        if not admitted:
            record.reply = "quota"
            fake._record(record)
            headers = {"Retry-After": quota.retry_after} if quota.retry_after is not None else None
            return self._error(429, "Resource has been exhausted (e.g. check quota).", headers)
        reply = fake._next_reply(model)
        record.reply = reply.kind
        fake._record(record)
        if quota is None:
            return self._play(reply, model, body)
        try:
            self._play(replace(reply, delay_s=max(reply.delay_s, quota.call_s)), model, body)
        finally:
            fake._leave_quota()

    def _play(self, reply: Reply, model: str, body: dict[str, Any]) -> None:
        stopping = self.server.fake._stopping
        if reply.delay_s > 0 and stopping.wait(reply.delay_s):
            self.close_connection = True  # the server stops: drop the connection unanswered
            return
        if reply.kind == "hang":
            stopping.wait()
            self.close_connection = True
            return
        if reply.kind == "reset":
            # Linger 0: close() sends RST instead of FIN.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if reply.kind == "garbage":
            return self._send_bytes(200, b'{"candidates": [{"content": {"parts": [ <html>oops')
        if reply.kind == "status":
            headers = {"Retry-After": reply.retry_after} if reply.retry_after is not None else None
            if reply.retry_delay is not None:
                return self._send_json(reply.status, {"error": {
                    "code": reply.status, "message": reply.message, "status": _STATUS_NAMES.get(reply.status, "UNKNOWN"),
                    "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                                 "retryDelay": reply.retry_delay}]}}, headers)
            return self._error(reply.status, reply.message, headers)
        usage = {"promptTokenCount": 12, "candidatesTokenCount": 0, "totalTokenCount": 12}
        if reply.kind == "blocked":
            return self._send_json(200, {"promptFeedback": {"blockReason": reply.reason, "safetyRatings": []},
                                         "usageMetadata": usage, "modelVersion": model})
        if reply.kind == "finish":
            return self._send_json(200, {"candidates": [{"finishReason": reply.reason, "index": 0}],
                                         "usageMetadata": usage, "modelVersion": model})
        if reply.kind == "no_image":
            return self._send_json(200, {"candidates": [{"content": {"role": "model", "parts": [{"text": reply.text}]},
                                                         "finishReason": "STOP", "index": 0}],
                                         "usageMetadata": usage, "modelVersion": model})
        # ok
        source = _first_input_image(body) if reply.derived else None
        parts: list[dict[str, Any]] = [{"text": reply.text}] if reply.text else []
        for index in range(reply.image_count):
            png = make_png(model, index, source)
            if reply.kind == "truncated":
                png = png[: len(png) // 2]
            data = base64.b64encode(png).decode("ascii")
            if reply.snake_case:
                parts.append({"inline_data": {"mime_type": "image/png", "data": data}})
            else:
                parts.append({"inlineData": {"mimeType": "image/png", "data": data}})
        self._send_json(200, {"candidates": [{"content": {"role": "model", "parts": parts},
                                              "finishReason": "STOP", "index": 0}],
                              "usageMetadata": usage, "modelVersion": model})

    def _control(self, path: str, raw: bytes) -> None:
        fake = self.server.fake
        try:
            payload = json.loads(raw) if raw else {}
            if path == "/_fake/plan":
                fake.plan(payload["model"], [Reply.from_dict(r) for r in payload["replies"]])
            elif path == "/_fake/default":
                fake.default = Reply.from_dict(payload["reply"])
            elif path == "/_fake/clear":
                fake.clear()
            elif path == "/_fake/quota":
                fake.set_quota(payload.get("max_in_flight"), float(payload.get("call_s", 0.0)),
                               payload.get("retry_after", "1"))
            else:
                return self._error(404, f"no such control path {path}")
        except (KeyError, TypeError, ValueError) as exc:
            return self._error(400, f"bad control request: {exc}")
        self._send_json(200, {"ok": True})


class RemoteFakeGemini:
    """Drives a fake server running in another process (started with the CLI below)."""

    def __init__(self, url: str) -> None:
        import httpx  # only the remote helper needs it

        self._client = httpx.Client(base_url=url.rstrip("/"), timeout=10)

    def plan(self, model: str, replies: Iterable[Reply]) -> None:
        self._client.post("/_fake/plan", json={"model": model, "replies": [r.to_dict() for r in replies]}).raise_for_status()

    def set_default(self, reply: Reply) -> None:
        self._client.post("/_fake/default", json={"reply": reply.to_dict()}).raise_for_status()

    def clear(self) -> None:
        self._client.post("/_fake/clear").raise_for_status()

    def set_quota(self, max_in_flight: int | None, call_s: float = 0.0, retry_after: str | None = "1") -> None:
        self._client.post("/_fake/quota", json={"max_in_flight": max_in_flight, "call_s": call_s,
                                                "retry_after": retry_after}).raise_for_status()

    def quota_stats(self) -> QuotaStats:
        response = self._client.get("/_fake/quota")
        response.raise_for_status()
        data = response.json()
        return QuotaStats(**{**data, "timeline": [tuple(p) for p in data["timeline"]]})

    def requests(self) -> list[dict[str, Any]]:
        response = self._client.get("/_fake/requests")
        response.raise_for_status()
        return response.json()["requests"]

    def close(self) -> None:
        self._client.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake Gemini REST server for tests and benchmarks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on start)")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--api-key", default=None, help="the key to expect; default: any non-empty key")
    parser.add_argument("--quota", type=int, default=None, help="quota mode: at most this many calls at once")
    parser.add_argument("--retry-after", default="1", help="quota mode: the Retry-After of its 429s")
    args = parser.parse_args(argv)

    fake = FakeGemini(api_key=args.api_key, host=args.host, port=args.port, default=Reply.ok(delay_s=args.delay))
    if args.quota is not None:
        fake.set_quota(args.quota, args.delay, args.retry_after)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with fake:
        print(f"fake-gemini listening on {fake.url}", flush=True)
        while not stop.wait(0.5):
            pass


if __name__ == "__main__":
    main()
