"""A fresh PostgreSQL database for one test, dropped afterwards.

The server is the one `ATELIER_TEST_DATABASE_URL` points at when that is a PostgreSQL URL,
else 127.0.0.1:5432 as user postgres (trust auth, as CI starts it). Tests skip cleanly when
no server answers.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest
from sqlalchemy.engine import URL, make_url

DEFAULT_SERVER = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"


def server_url() -> URL:
    configured = os.environ.get("ATELIER_TEST_DATABASE_URL", "")
    if configured.startswith(("postgresql", "postgres")):
        url = make_url(configured.replace("postgres://", "postgresql://", 1))
    else:
        url = make_url(DEFAULT_SERVER)
    return url.set(drivername="postgresql+asyncpg")


def reachable(url: URL | None = None, timeout: float = 1.0) -> bool:
    url = url or server_url()
    try:
        with socket.create_connection((url.host or "127.0.0.1", url.port or 5432), timeout=timeout):
            return True
    except OSError:
        return False


requires_postgres = pytest.mark.skipif(
    not reachable(), reason=f"no PostgreSQL server at {server_url().host}:{server_url().port or 5432}"
)


async def _admin(url: URL):
    import asyncpg

    return await asyncpg.connect(
        host=url.host or "127.0.0.1", port=url.port or 5432, user=url.username or "postgres",
        password=url.password, database="postgres",
    )


async def create_database(prefix: str = "atelier_test") -> str:
    """Create a uniquely named database; return its SQLAlchemy (asyncpg) URL."""
    base = server_url()
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    conn = await _admin(base)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return base.set(database=name).render_as_string(hide_password=False)


async def drop_database(url: str) -> None:
    name = make_url(url).database
    conn = await _admin(server_url())
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
