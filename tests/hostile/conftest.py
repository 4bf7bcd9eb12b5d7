"""The loopback world shared by the content and request modules: the API and a worker as real
processes, with private URLs allowed because the misbehaving image host lives on 127.0.0.1.
The URL-guard cases run in a world of their own (test_urls.py), with the guard on."""

from __future__ import annotations

import contextlib

import httpx
import pytest

from atelier.blobstore import BlobStore
from atelier.db import create_engine, create_schema_for_tests
from tests.conftest import make_settings
from tests.fakes.http_server import FakeHttpServer
from tests.hostile.world import World, api_server, worker_server

# Short enough that a server that never answers fails in seconds; long enough for a loaded CI box.
LOOPBACK_SETTINGS = dict(
    allow_private_urls=True, ai_provider="local", local_ai_delay_s=0.0,
    download_total_timeout_s=4.0, read_timeout_s=3.0, connect_timeout_s=2.0,
    short_timeout_s=10.0, download_timeout_s=30.0, download_heartbeat_s=10.0,
    ai_timeout_s=60.0, ai_heartbeat_s=5.0, generation_deadline_s=300.0,
)


@pytest.fixture(scope="package")
async def loopback_world(temporal_env, temporal_address, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-loopback")
    settings = make_settings(root, **LOOPBACK_SETTINGS)
    engine = create_engine(settings.database_url)
    await create_schema_for_tests(engine)
    logs = root / "logs"
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(engine.dispose)
        api, base = await stack.enter_async_context(api_server(settings, temporal_address, logs))
        worker = await stack.enter_async_context(worker_server(settings, temporal_address, logs))
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=base, timeout=30.0))
        yield World(settings=settings, client=temporal_env.client, engine=engine,
                    blobs=BlobStore(settings.blob_dir, fsync=False), http=http, api=api, logs=logs, worker=worker)


@pytest.fixture(scope="package")
def image_host():
    # Big enough for the 200 MB stream; every wait in it ends when the server stops.
    with FakeHttpServer(max_body_bytes=210 * 1024 * 1024, max_wait_s=30.0) as server:
        yield server
