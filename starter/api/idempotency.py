"""Idempotency-Key for POST /v1/generations: the same user and key give the same generation.

The key row is written *before* the workflow starts, holding the task id the workflow will
get. The table's primary key (user, key) decides the winner among concurrent requests: one
insert succeeds, every other request reads the winner's row and answers with its task id.
Everyone then makes sure that workflow exists (`start_workflow` with the same id, where
"already started" is success), so a winner that died between its insert and its start is
finished by the client's retry. The workflow's charge is itself idempotent by task id.
Rows older than the TTL are ignored, and overwritten by the next request with that key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from atelier.db import idempotency_keys
from starter.api.errors import ApiError

MAX_KEY_CHARS = 255


@dataclass
class KeyRecord:
    task_id: str
    body_hash: str
    won: bool  # this request wrote the row (a first request, not a replay)


def check_key(key: str) -> str:
    if not key or len(key) > MAX_KEY_CHARS:
        raise ApiError(400, "BadIdempotencyKey", f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} characters")
    if not all(" " <= c <= "~" for c in key):
        raise ApiError(400, "BadIdempotencyKey", "Idempotency-Key must be printable ASCII")
    return key


def body_hash(body: BaseModel) -> str:
    """The request as parsed, not as typed: whitespace, key order and defaults do not matter."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def cutoff(ttl_hours: float) -> datetime:
    return datetime.now(timezone.utc) - timedelta(hours=ttl_hours)


async def claim(engine: AsyncEngine, *, user_id: str, key: str, body_hash: str, task_id: str,
                ttl_hours: float) -> KeyRecord:
    """Write (user, key) -> task_id unless a live row exists; return the row that won."""
    now = datetime.now(timezone.utc)
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    insert = dialect.insert(idempotency_keys).values(
        user_id=user_id, key=key, body_hash=body_hash, task_id=task_id, created_at=now
    )
    # An expired row is taken over; a live one is left alone (and then read back).
    statement = insert.on_conflict_do_update(
        index_elements=["user_id", "key"],
        set_={"body_hash": insert.excluded.body_hash, "task_id": insert.excluded.task_id,
              "created_at": insert.excluded.created_at},
        where=idempotency_keys.c.created_at < cutoff(ttl_hours),
    )
    async with engine.begin() as conn:
        written = await conn.execute(statement)
        if written.rowcount == 1:
            return KeyRecord(task_id, body_hash, won=True)
        row = (await conn.execute(
            select(idempotency_keys.c.task_id, idempotency_keys.c.body_hash).where(
                idempotency_keys.c.user_id == user_id, idempotency_keys.c.key == key)
        )).one()
    return KeyRecord(row.task_id, row.body_hash, won=False)
