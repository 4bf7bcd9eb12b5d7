"""The API app's own CPU per POST /v1/generations, without HTTP: where a submission's
milliseconds go between our code, the Temporal SDK and the HTTP server.

The app as `create_app` builds it (middleware, routing, authentication, validation, the
submission's read on SQLite, the response) is called in-process through ASGI, one request at
a time or C at a time (as a burst sends them), and the process's CPU time (every thread) is read
around N calls. Arms, each at both:

1. **start faked**: the Temporal client's `start_workflow` returns at once without a server
   (a stand-in used only here, to isolate the app's own code);
2. **start real**: the real client against a dev server (the SDK's Python and Rust work for the
   start, as the API pays it).

What neither arm counts is the HTTP server's and the kernel's part: compare with the API's CPU
per POST in `bench.burst` (fresh connections) or `bench.submit` (kept-alive ones).
"""

from __future__ import annotations

import asyncio
import json
import time

from atelier import credits, users
from atelier.blobstore import BlobStore
from atelier.db import create_engine
from bench.common import (
    console,
    dev_server_flags,
    parser,
    prepare_database,
    print_table,
    resolve_paths,
    run_main,
    stack,
    write_result,
)
from starter.api.app import create_app

NAME = "api_cpu"


class _StartedAtOnce:
    """Stands in for the Temporal client in the `start faked` arm only: the start is accepted
    at once, so the arm measures the app around it."""

    async def start_workflow(self, *args, **kwargs) -> None:
        return None


async def _cpu_per_post(app, api_key: str, image_url: str, n: int, concurrency: int) -> float:
    """Microseconds of process CPU per POST, over n POSTs sent `concurrency` at a time."""
    body = json.dumps({"kind": "photography", "images": [{"url": image_url}], "style": "studio"}).encode()
    headers = [(b"host", b"127.0.0.1:8000"), (b"content-length", str(len(body)).encode()),
               (b"authorization", f"Bearer {api_key}".encode()), (b"content-type", b"application/json")]

    async def one() -> None:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/generations", "raw_path": b"/v1/generations",
                 "query_string": b"", "root_path": "", "headers": headers, "client": ("127.0.0.1", 5555),
                 "server": ("127.0.0.1", 8000)}
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        statuses: list[int] = []

        async def receive() -> dict:
            if messages:
                return messages.pop()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(scope, receive, send)
        if statuses != [202]:
            raise RuntimeError(f"POST answered {statuses}, not 202")

    async def batches(count: int) -> None:
        for start in range(0, count, concurrency):
            await asyncio.gather(*(one() for _ in range(min(concurrency, count - start))))

    await batches(min(100, n))  # warm: caches, the key, the reader's connection
    t = time.process_time()
    await batches(n)
    return (time.process_time() - t) / n * 1e6


async def bench(args) -> None:
    started = time.time()
    n = 50 if args.quick else args.count
    async with stack(NAME, keep_tmp=args.keep_tmp, server_args=dev_server_flags(args)) as s:
        settings = s.settings()
        await prepare_database(settings)
        engine = create_engine(settings.database_url)
        user = await users.create_user(engine)
        await credits.grant(engine, user_id=user.user_id, amount=settings.cost_of("photography") * 3 * (n + 100),
                            reason="benchmark")
        blobs = BlobStore(settings.blob_dir)
        image_url = "http://127.0.0.1:8000/photo.jpg"  # never fetched: no worker runs here
        arms = {}
        try:
            for name, client in (("start faked", _StartedAtOnce()), ("start real", s.client)):
                app = create_app(settings, client=client, engine=engine, blobs=blobs)
                for concurrency in (1, args.concurrency):
                    console.print(f"[bold]{name}[/bold]: {n} POSTs, {concurrency} at a time")
                    arms[f"{name}, {concurrency} at a time"] = round(
                        await _cpu_per_post(app, user.api_key, image_url, n, concurrency), 1)
        finally:
            await engine.dispose()
    sdk = {c: round(arms[f"start real, {c} at a time"] - arms[f"start faked, {c} at a time"], 1)
           for c in (1, args.concurrency)}
    results = {"count": n, "cpu_us_per_post": arms, "sdk_start_us": sdk}
    print_table("CPU per POST through ASGI (no HTTP server)", ["arm", "µs"], [[k, v] for k, v in arms.items()],
                caption=f"the SDK's start (real minus faked), by POSTs at a time: {sdk} µs")
    write_result(NAME, args, results, goals={}, started=started)


def main() -> None:
    p = parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=3000, help="POSTs per arm")
    p.add_argument("--concurrency", type=int, default=100, help="POSTs at a time in the concurrent arms")
    args = resolve_paths(p.parse_args(), NAME)
    run_main(lambda: bench(args))


if __name__ == "__main__":
    main()
