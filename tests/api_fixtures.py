"""Fixtures and helpers of the API tests: an app wired to the test's Harness (real dev server,
per-test database and task queues), an HTTP client for it, and a real uvicorn process.

Import in a test module with `from tests.api_fixtures import *  # noqa: F403`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from atelier.settings import Settings
from starter.api import create_app
from tests.conftest import Harness

ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "admin-test-token"  # what make_settings puts in the test settings
TERMINAL = {"completed", "failed", "canceled", "rejected"}


@dataclass
class Api:
    """One test's API: the app, a client for it, and the harness behind it."""

    harness: Harness
    app: object
    http: httpx.AsyncClient

    @property
    def settings(self) -> Settings:
        return self.harness.settings

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.settings.admin_token.get_secret_value()}"}

    async def new_user(self, credits_: int = 100) -> tuple[str, dict[str, str]]:
        """Create a user through the admin route; returns (user_id, its auth headers)."""
        created = await self.http.post("/v1/admin/users", headers=self.admin)
        assert created.status_code == 201, created.text
        body = created.json()
        if credits_:
            granted = await self.http.post(f"/v1/admin/users/{body['user_id']}/credits", headers=self.admin,
                                           json={"amount": credits_, "reason": "test"})
            assert granted.status_code == 200, granted.text
        return body["user_id"], {"Authorization": f"Bearer {body['api_key']}"}

    async def upload(self, headers: dict[str, str], data: bytes, name: str = "photo.jpg") -> str:
        response = await self.http.post("/v1/uploads", headers=headers, files={"file": (name, data, "image/jpeg")})
        assert response.status_code == 201, response.text
        return response.json()["file_id"]

    async def poll(self, headers: dict[str, str], task_id: str, *, until=TERMINAL, timeout: float = 60.0) -> dict:
        """GET the generation until its status is in `until` (bounded in time)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            response = await self.http.get(f"/v1/generations/{task_id}", headers=headers)
            assert response.status_code == 200, response.text
            last = response.json()
            if last["status"] in until:
                return last
            await asyncio.sleep(0.2)
        raise TimeoutError(f"generation {task_id} still {last and last['status']} after {timeout} s")


def make_api(harness: Harness, **client_options) -> Api:
    app = create_app(harness.settings, client=harness.client, engine=harness.engine, blobs=harness.deps.blobs)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app, **client_options), base_url="http://testserver",
                             timeout=30.0)
    return Api(harness, app, http)


@pytest.fixture
async def api(harness) -> Api:
    made = make_api(harness)
    async with made.http:
        yield made
    if made.app.state.atelier is not None:
        await made.app.state.atelier.close()


@pytest.fixture
async def api_factory(harness_factory):
    """Build APIs on harnesses with settings overrides: `await api_factory(local_ai_delay_s=20)`."""
    made: list[Api] = []

    async def make(**overrides) -> Api:
        one = make_api(await harness_factory(**overrides))
        made.append(one)
        return one

    yield make
    for one in made:
        await one.http.aclose()
        if one.app.state.atelier is not None:
            await one.app.state.atelier.close()


async def wait_until(predicate, *, timeout: float = 30.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


# ---- a real server ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings_env(settings: Settings, temporal_address: str, port: int) -> dict[str, str]:
    """The environment that makes `python -m starter.api` use the test's world."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATELIER_") and k != "GEMINI_API_KEY"}
    env.update({
        "ATELIER_TEMPORAL_ADDRESS": temporal_address,
        "ATELIER_TEMPORAL_NAMESPACE": settings.temporal_namespace,
        "ATELIER_TASK_QUEUE": settings.task_queue,
        "ATELIER_AI_TASK_QUEUE": settings.ai_task_queue,
        "ATELIER_DATABASE_URL": settings.database_url,
        "ATELIER_BLOB_DIR": str(settings.blob_dir),
        "ATELIER_BLOB_FSYNC": "false",
        "ATELIER_ALLOW_PRIVATE_URLS": "true" if settings.allow_private_urls else "false",
        "ATELIER_API_HOST": "127.0.0.1",
        "ATELIER_API_PORT": str(port),
        "PYTHONUNBUFFERED": "1",
        "ATELIER_EVENTS_POLL_S": str(settings.events_poll_s),
        "ATELIER_EVENTS_KEEPALIVE_S": str(settings.events_keepalive_s),
    })
    if settings.admin_token:
        env["ATELIER_ADMIN_TOKEN"] = settings.admin_token.get_secret_value()
    if settings.webhook_secret:
        env["ATELIER_WEBHOOK_SECRET"] = settings.webhook_secret.get_secret_value()
    if settings.url_signing_secret:
        env["ATELIER_URL_SIGNING_SECRET"] = settings.url_signing_secret.get_secret_value()
    return env


@dataclass
class Served:
    base: str
    log_path: Path
    returncode: int | None = None  # set once the process has exited

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def uvicorn_process(settings: Settings, temporal_address: str, *, log_path: Path, startup_timeout: float = 30.0):
    """Run `python -m starter.api` on a free loopback port; yield a Served (its base URL), then
    stop it with SIGTERM as a process manager would."""
    port = free_port()
    served = Served(f"http://127.0.0.1:{port}", log_path)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "starter.api"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=settings_env(settings, temporal_address, port))
        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the API exited with {proc.returncode}:\n{served.log()[-3000:]}")
                try:
                    if httpx.get(f"{served.base}/healthz", timeout=1.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the API did not answer in {startup_timeout} s:\n{served.log()[-3000:]}")
                time.sleep(0.1)
            yield served
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            served.returncode = proc.returncode


# ---- what happened behind the API -----------------------------------------------------------


async def workflows_of(client, user_id: str) -> list:
    """Every workflow visibility knows for this user (any type)."""
    return [w async for w in client.list_workflows(f'UserId="{user_id}"', limit=100)]


async def settled_workflows_of(client, user_id: str, *, expect_at_least: int, settle_s: float = 1.0,
                               timeout: float = 15.0) -> list:
    """Visibility is eventually consistent: wait for `expect_at_least`, then a little more, and
    return what is there (so a second, late workflow would be seen)."""
    if expect_at_least:
        await wait_until(lambda: _at_least(client, user_id, expect_at_least), timeout=timeout)
    await asyncio.sleep(settle_s)
    return await workflows_of(client, user_id)


async def _at_least(client, user_id: str, n: int) -> bool:
    return len(await workflows_of(client, user_id)) >= n


def started(api: Api, kind: str | None = None) -> float:
    """generations started by this app, from its own metrics registry."""
    registry = api.app.state.atelier.metrics.registry
    kinds = [kind] if kind else ["photography", "fitting"]
    return sum(registry.get_sample_value("atelier_generations_started_total", {"kind": k}) or 0 for k in kinds)


async def ledger_entries(api: Api, headers: dict[str, str]) -> list[dict]:
    response = await api.http.get("/v1/credits", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["entries"]
