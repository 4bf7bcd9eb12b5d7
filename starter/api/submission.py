"""What a new generation needs to know from the database, read in one round trip: the
caller's balance, which of the given file ids are the caller's uploads, and any live row
for the request's Idempotency-Key."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from atelier.db import files, users, reading
from atelier.messages import Priority
from starter.api import idempotency


@dataclass
class SubmissionFacts:
    balance: int
    max_priority: str
    uploads: dict[str, str]  # file id -> blob key, only the caller's own uploads
    key_record: idempotency.KeyRecord | None


async def read_facts(engine: AsyncEngine, *, user_id: str, file_ids: list[str], idempotency_key: str | None,
                     ttl_hours: float) -> SubmissionFacts:
    async with reading(engine) as conn:
        row = (await conn.execute(select(users.c.balance, users.c.max_priority).where(users.c.id == user_id))).first()
        uploads: dict[str, str] = {}
        if file_ids:
            rows = await conn.execute(
                select(files.c.id, files.c.blob_key).where(
                    files.c.id.in_(set(file_ids)), files.c.user_id == user_id, files.c.origin == "upload")
            )
            uploads = {r.id: r.blob_key for r in rows}
        record = None
        if idempotency_key is not None:
            record = await idempotency.find(conn, user_id=user_id, key=idempotency_key, ttl_hours=ttl_hours)
    return SubmissionFacts(balance=int(row.balance or 0) if row else 0,
                           max_priority=row.max_priority if row else Priority.NORMAL.value,
                           uploads=uploads, key_record=record)
