"""The HTTP API: an app factory and the `python -m starter.api` entry point.

The API answers at once and never waits on the work: it authenticates, validates, starts
workflows and reads their state. Dependencies are built once per process (in the lifespan)
or injected by tests.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from atelier.blobstore import BlobStore
from atelier.db import create_engine
from atelier.settings import Settings, load_settings
from starter.api import admin, files, generations, health, library, stream, web
from starter.api.context import ApiContext
from starter.api.cursors import cursor_key
from starter.api.errors import install_error_handlers
from starter.api.limits import BodyLimitMiddleware
from starter.api.metrics import Metrics, MetricsMiddleware

log = logging.getLogger("atelier.api")

# JSON bodies are small (a prompt is at most 4000 characters); an upload is one image
# plus the multipart envelope.
JSON_BODY_LIMIT = 256 * 1024
MULTIPART_OVERHEAD = 64 * 1024

DESCRIPTION = """Durable, paid AI image generations: photography and virtual try-on (fitting).

Authenticate with `Authorization: Bearer <api key>`. Start a generation, then watch its progress
stream (`/v1/generations/{id}/events`), poll it, or receive signed webhooks; `Prefer: wait=N` answers
with the finished generation when it ends within N seconds. Image links are signed and load without
a key."""


def create_app(settings: Settings, *, client: Client | None = None, engine: AsyncEngine | None = None,
               blobs: BlobStore | None = None) -> FastAPI:
    metrics = Metrics()
    key = cursor_key(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if app.state.atelier is not None:
            yield
            return
        owned_engine = None
        try:
            temporal = client or await Client.connect(settings.temporal_address,
                                                      namespace=settings.temporal_namespace)
        except Exception as exc:
            log.error("cannot reach Temporal at %s (namespace %s): %s", settings.temporal_address,
                      settings.temporal_namespace, type(exc).__name__)
            raise
        if engine is None:
            owned_engine = create_engine(settings.database_url, pool_size=settings.database_pool_size)
        app.state.atelier = ApiContext(
            settings=settings, client=temporal, engine=engine or owned_engine,
            blobs=blobs or BlobStore(settings.blob_dir, fsync=settings.blob_fsync), metrics=metrics, cursor_key=key,
        )
        log.info("API ready: Temporal %s/%s, task queue %s", settings.temporal_address,
                 settings.temporal_namespace, settings.task_queue)
        try:
            yield
        finally:
            ctx, app.state.atelier = app.state.atelier, None
            if ctx is not None:
                await ctx.close()
            if owned_engine is not None:
                await owned_engine.dispose()

    app = FastAPI(title="Atelier API", version="1.0.0", description=DESCRIPTION, lifespan=lifespan)
    # With every dependency given (tests), the app works without a lifespan run.
    app.state.atelier = (
        ApiContext(settings=settings, client=client, engine=engine, blobs=blobs, metrics=metrics, cursor_key=key)
        if client is not None and engine is not None and blobs is not None else None
    )
    install_error_handlers(app)
    for router in (generations.router, stream.router, files.router, library.router, admin.router, health.router,
                   web.router):
        app.include_router(router)
    web.install_studio(app, settings)
    # Last added runs first: metrics see every answer, including a refused body.
    app.add_middleware(BodyLimitMiddleware, default_limit=JSON_BODY_LIMIT,
                       limits={"/v1/uploads": settings.max_download_bytes + MULTIPART_OVERHEAD})
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def server_backends() -> tuple[str, str]:
    """uvloop and httptools (uvicorn's `standard` extras, dependencies of this project) when they
    import, else asyncio and h11. Measured (bench.submit, docs/benchmarks.md, issue 13 fourth
    pass): a POST costs the API a fifth less CPU with them, /healthz a third less."""
    import importlib.util

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return loop, http


def main() -> None:
    """`python -m starter.api`: serve on ATELIER_API_HOST:ATELIER_API_PORT until SIGINT/SIGTERM."""
    import uvicorn

    settings = load_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # Drain and return on a signal instead of re-raising it afterwards (uvicorn's default).
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    loop, http = server_backends()
    log.info("serving with the %s event loop and the %s HTTP parser", loop, http)
    config = uvicorn.Config(create_app(settings), host=settings.api_host, port=settings.api_port, log_config=None,
                            server_header=False, loop=loop, http=http)
    server = Server(config)
    server.run()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # The Temporal SDK's threads can abort the interpreter's finalisation; the server is down: leave.
    os._exit(0 if server.started else 1)
