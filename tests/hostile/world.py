"""The world a hostile-input module sends its corpus into: the real API (a uvicorn process),
a real worker (a `python worker.py` process, or an in-process one where the test must inject
the URL guard's resolver and transport), the session's dev server, a database and a blob
folder of its own. One world per module: the corpus shares it, so the whole set stays fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from atelier import credits
from atelier.blobstore import BlobStore
from atelier.db import api_keys, ledger
from atelier.settings import Settings
from tests.chaos.processes import Process, api_process, clean_env, free_port, wait_http_ok, worker_process

TERMINAL = {"completed", "failed", "canceled", "rejected"}
# Statuses a refusal may have; a 5xx is never one.
REFUSALS = {400, 401, 402, 403, 404, 409, 413, 415, 422}


def settings_env(settings: Settings, temporal_address: str, **extra: str) -> dict[str, str]:
    """The environment that makes a worker or API process use these settings."""
    values = {
        "ATELIER_TEMPORAL_ADDRESS": temporal_address,
        "ATELIER_TASK_QUEUE": settings.task_queue,
        "ATELIER_AI_TASK_QUEUE": settings.ai_task_queue,
        "ATELIER_DATABASE_URL": settings.database_url,
        "ATELIER_BLOB_DIR": str(settings.blob_dir),
        "ATELIER_BLOB_FSYNC": "false",
        "ATELIER_ALLOW_PRIVATE_URLS": "true" if settings.allow_private_urls else "false",
        "ATELIER_AI_PROVIDER": settings.provider,
        "ATELIER_LOCAL_AI_DELAY_S": str(settings.local_ai_delay_s),
        "ATELIER_MAX_DOWNLOAD_BYTES": str(settings.max_download_bytes),
        "ATELIER_DOWNLOAD_TOTAL_TIMEOUT_S": str(settings.download_total_timeout_s),
        "ATELIER_CONNECT_TIMEOUT_S": str(settings.connect_timeout_s),
        "ATELIER_READ_TIMEOUT_S": str(settings.read_timeout_s),
        "ATELIER_SHORT_TIMEOUT_S": str(settings.short_timeout_s),
        "ATELIER_DOWNLOAD_TIMEOUT_S": str(settings.download_timeout_s),
        "ATELIER_DOWNLOAD_HEARTBEAT_S": str(settings.download_heartbeat_s),
        "ATELIER_AI_TIMEOUT_S": str(settings.ai_timeout_s),
        "ATELIER_AI_HEARTBEAT_S": str(settings.ai_heartbeat_s),
        "ATELIER_GENERATION_DEADLINE_S": str(settings.generation_deadline_s),
    }
    if settings.admin_token:
        values["ATELIER_ADMIN_TOKEN"] = settings.admin_token.get_secret_value()
    if settings.webhook_secret:
        values["ATELIER_WEBHOOK_SECRET"] = settings.webhook_secret.get_secret_value()
    if settings.gemini_api_key:
        values["GEMINI_API_KEY"] = settings.gemini_api_key.get_secret_value()
        values["GEMINI_BASE_URL"] = settings.gemini_base_url
    values.update(extra)
    return clean_env(**values)


@dataclass
class User:
    user_id: str
    api_key: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@dataclass
class World:
    settings: Settings
    client: Client
    engine: AsyncEngine
    blobs: BlobStore
    http: httpx.AsyncClient
    api: Process | None
    logs: Path
    worker: Process | None = None
    answers: list[tuple[str, str, int]] = field(default_factory=list)  # every (method, path, status) the API gave

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.settings.admin_token.get_secret_value()}"}

    async def request(self, method: str, path: str, **kw) -> httpx.Response:
        response = await self.http.request(method, path, **kw)
        self.answers.append((method, path, response.status_code))
        return response

    async def new_user(self, credits_: int = 100) -> User:
        created = await self.request("POST", "/v1/admin/users", headers=self.admin)
        assert created.status_code == 201, created.text
        user = User(created.json()["user_id"], created.json()["api_key"])
        if credits_:
            granted = await self.request("POST", f"/v1/admin/users/{user.user_id}/credits", headers=self.admin,
                                         json={"amount": credits_, "reason": "hostile corpus"})
            assert granted.status_code == 200, granted.text
        return user

    async def upload(self, user: User, data: bytes, name: str = "photo.jpg") -> httpx.Response:
        return await self.request("POST", "/v1/uploads", headers=user.auth,
                                  files={"file": (name, data, "application/octet-stream")})

    async def revoke(self, user: User) -> None:
        from atelier.users import hash_key
        from datetime import datetime, timezone

        async with self.engine.begin() as conn:
            await conn.execute(update(api_keys).where(api_keys.c.key_hash == hash_key(user.api_key))
                               .values(revoked_at=datetime.now(timezone.utc)))

    async def wait_terminal(self, user: User, task_id: str, *, timeout: float) -> dict:
        """GET the generation until it is terminal (bounded); every answer must be 200."""
        deadline = time.monotonic() + timeout
        view: dict = {}
        while time.monotonic() < deadline:
            r = await self.request("GET", f"/v1/generations/{task_id}", headers=user.auth)
            assert r.status_code == 200, r.text
            view = r.json()
            if view["status"] in TERMINAL:
                return view
            await asyncio.sleep(0.3)
        raise TimeoutError(f"generation {task_id} still {view.get('status')} after {timeout} s "
                           f"(stage {view.get('stage')}, error {view.get('error')})")

    async def ledger(self, task_id: str) -> tuple[int, int]:
        return await credits.task_totals(self.engine, task_id)

    async def movements_of(self, user_id: str) -> list[str]:
        """Every ledger entry of a user other than the grants it was given."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(ledger.c.entry).where(ledger.c.user_id == user_id,
                                                                    ledger.c.entry != "grant"))).all()
        return [r.entry for r in rows]

    async def workflows_of(self, user_id: str) -> list:
        return [w async for w in self.client.list_workflows(f'UserId="{user_id}"', limit=20)]


@contextlib.asynccontextmanager
async def api_server(settings: Settings, temporal_address: str, logs: Path):
    """`python -m starter.api` on a free loopback port, stopped with SIGTERM afterwards."""
    port = free_port()
    proc = api_process(settings_env(settings, temporal_address, ATELIER_API_HOST="127.0.0.1",
                                    ATELIER_API_PORT=str(port)), logs / "api.log")
    proc.start()
    try:
        await wait_http_ok(f"http://127.0.0.1:{port}/readyz", proc, timeout_s=60)
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        await asyncio.to_thread(proc.stop, 15.0)


@contextlib.asynccontextmanager
async def worker_server(settings: Settings, temporal_address: str, logs: Path):
    proc = worker_process("worker", settings_env(settings, temporal_address), logs / "worker.log")
    proc.start()
    try:
        yield proc
    finally:
        await asyncio.to_thread(proc.stop, 15.0)
