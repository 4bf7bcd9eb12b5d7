"""Users and their API keys. Keys are shown once and stored only as a SHA-256 hash."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from atelier.db import api_keys, users, reading

KEY_PREFIX = "atl_"


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class NewUser:
    user_id: str
    api_key: str


async def create_user(engine: AsyncEngine, *, user_id: str | None = None) -> NewUser:
    user_id = user_id or f"usr_{uuid.uuid4().hex[:20]}"
    api_key = KEY_PREFIX + secrets.token_urlsafe(32)
    now = datetime.now(timezone.utc)
    async with engine.begin() as conn:
        await conn.execute(insert(users).values(id=user_id, balance=0, created_at=now))
        await conn.execute(insert(api_keys).values(key_hash=hash_key(api_key), user_id=user_id, created_at=now))
    return NewUser(user_id=user_id, api_key=api_key)


async def user_for_key(engine: AsyncEngine, api_key: str) -> str | None:
    """The user an API key belongs to, or None (unknown, malformed or revoked)."""
    if not api_key.startswith(KEY_PREFIX) or len(api_key) > 200:
        return None
    async with reading(engine) as conn:
        row = (
            await conn.execute(
                select(api_keys.c.user_id, api_keys.c.revoked_at).where(api_keys.c.key_hash == hash_key(api_key))
            )
        ).one_or_none()
    if row is None or row.revoked_at is not None:
        return None
    return row.user_id


async def user_exists(engine: AsyncEngine, user_id: str) -> bool:
    async with reading(engine) as conn:
        return (await conn.execute(select(users.c.id).where(users.c.id == user_id))).first() is not None
