"""A webhook receiver on 127.0.0.1 for tests, in its own thread.

It records every delivery, verifies its Standard Webhooks signature with the secret it was
given, and can be told to answer the first N deliveries with 500. Works from sync and async
tests alike; every wait is bounded.

    with WebhookReceiver(secret, fail_first=3) as receiver:
        ...webhook_url=receiver.url...
        deliveries = receiver.wait_for_success(timeout=30)
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

MAX_BODY_BYTES = 1024 * 1024


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool  # the signature checked out with the receiver's secret
    answered: int  # the status this receiver gave
    payload: Any = None  # the verified JSON, when verified

    @property
    def succeeded(self) -> bool:
        return 200 <= self.answered < 300


class WebhookReceiver:
    def __init__(self, secret: str, *, fail_first: int = 0, path: str = "/hooks/atelier") -> None:
        self.secret = secret
        self.path = path
        self._verifier = Webhook(secret)
        self._fail_left = fail_first
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.deliveries: list[Delivery] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook-receiver", daemon=True)

    # ---- life cycle -------------------------------------------------------------------

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}{self.path}"

    # ---- what tests read ----------------------------------------------------------------

    def successes(self) -> list[Delivery]:
        with self._lock:
            return [d for d in self.deliveries if d.succeeded]

    def wait_for(self, predicate, *, timeout: float) -> list[Delivery]:
        """Block (bounded) until predicate(deliveries) is true; return the deliveries."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self.deliveries):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"webhook condition not met in {timeout} s; got {len(self.deliveries)} deliveries")
                self._changed.wait(timeout=min(left, 0.5))
            return list(self.deliveries)

    def wait_for_success(self, *, timeout: float) -> list[Delivery]:
        return self.wait_for(lambda ds: any(d.succeeded for d in ds), timeout=timeout)

    # ---- the server side ----------------------------------------------------------------

    def _record(self, path: str, headers: dict[str, str], body: bytes) -> int:
        try:
            payload = self._verifier.verify(body, headers)
            verified = True
        except WebhookVerificationError:
            payload, verified = None, False
        with self._changed:
            if not verified:
                status = 401
            elif self._fail_left > 0:
                self._fail_left -= 1
                status = 500
            else:
                status = 204
            if verified and not isinstance(payload, (dict, list)):
                payload = json.loads(body)
            self.deliveries.append(Delivery(path, headers, body, verified, status, payload))
            self._changed.notify_all()
        return status

    def _handler_class(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = min(int(self.headers.get("Content-Length") or 0), MAX_BODY_BYTES)
                body = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                status = receiver._record(self.path, headers, body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        return Handler
