"""Users and their API keys. Keys are shown once and stored only as a SHA-256 hash."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from atelier.db import api_keys, read_rows, reading, users
from atelier.errors import UnknownUser
from atelier.messages import Priority

KEY_PREFIX = "atl_"


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class NewUser:
    user_id: str
    api_key: str


# Lanes from the highest; a user may ask for their own lane or any lower one.
LANE_RANK = {Priority.HIGH.value: 0, Priority.NORMAL.value: 1, Priority.LOW.value: 2}


def allows(max_priority: str, asked: str) -> bool:
    """Whether a user whose highest lane is `max_priority` may ask for lane `asked`."""
    return LANE_RANK[asked] >= LANE_RANK.get(max_priority, LANE_RANK[Priority.NORMAL.value])


async def create_user(engine: AsyncEngine, *, user_id: str | None = None,
                      max_priority: str = Priority.NORMAL.value) -> NewUser:
    user_id = user_id or f"usr_{uuid.uuid4().hex[:20]}"
    api_key = KEY_PREFIX + secrets.token_urlsafe(32)
    now = datetime.now(timezone.utc)
    max_priority = Priority(max_priority).value
    async with engine.begin() as conn:
        await conn.execute(insert(users).values(id=user_id, balance=0, created_at=now, max_priority=max_priority))
        await conn.execute(insert(api_keys).values(key_hash=hash_key(api_key), user_id=user_id, created_at=now))
    return NewUser(user_id=user_id, api_key=api_key)


async def user_for_key(engine: AsyncEngine, api_key: str) -> str | None:
    """The user an API key belongs to, or None (unknown, malformed or revoked)."""
    if not api_key.startswith(KEY_PREFIX) or len(api_key) > 200:
        return None
    # Plain SQL through read_rows: on SQLite it runs on the DB-API cursor, on the event loop,
    # with none of SQLAlchemy's per-statement work (the API's first read of every new key).
    [rows] = await read_rows(engine, [("SELECT user_id, revoked_at FROM api_keys WHERE key_hash = :h",
                                       {"h": hash_key(api_key)})])
    if not rows or rows[0][1] is not None:
        return None
    return str(rows[0][0])


async def user_exists(engine: AsyncEngine, user_id: str) -> bool:
    async with reading(engine) as conn:
        return (await conn.execute(select(users.c.id).where(users.c.id == user_id))).first() is not None


async def set_max_priority(engine: AsyncEngine, user_id: str, max_priority: str) -> None:
    """Set the highest lane a user may ask for. Raises UnknownUser."""
    value = Priority(max_priority).value
    async with engine.begin() as conn:
        changed = (await conn.execute(update(users).where(users.c.id == user_id).values(max_priority=value))).rowcount
    if not changed:
        raise UnknownUser(f"no user {user_id!r}")


async def max_priority_of(engine: AsyncEngine, user_id: str) -> str | None:
    async with reading(engine) as conn:
        return (await conn.execute(select(users.c.max_priority).where(users.c.id == user_id))).scalar()
