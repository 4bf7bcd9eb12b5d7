"""What a new generation needs to know from the database, read in one round trip: the
caller's balance, which of the given file ids are the caller's uploads, and any live row
for the request's Idempotency-Key."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from atelier.db import as_datetime, read_rows
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
    """One snapshot, plain SQL through `read_rows`: on SQLite these run on the DB-API cursor, with
    none of SQLAlchemy's per-statement work (most of what a submission spent on its reads)."""
    statements: list[tuple[str, dict]] = [
        ("SELECT balance, max_priority FROM users WHERE id = :u", {"u": user_id})]
    wanted = sorted(set(file_ids))
    if wanted:
        marks = ", ".join(f":f{i}" for i in range(len(wanted)))
        statements.append((f"SELECT id, blob_key FROM files WHERE user_id = :u AND origin = 'upload' "
                           f"AND id IN ({marks})", {"u": user_id, **{f"f{i}": f for i, f in enumerate(wanted)}}))
    if idempotency_key is not None:
        # The TTL is checked here rather than in SQL: SQLite keeps the time as text.
        statements.append(("SELECT task_id, body_hash, created_at FROM idempotency_keys "
                           "WHERE user_id = :u AND key = :k", {"u": user_id, "k": idempotency_key}))
    results = await read_rows(engine, statements)
    user = results[0][0] if results[0] else None
    uploads = {str(r[0]): str(r[1]) for r in results[1]} if wanted else {}
    record = None
    if idempotency_key is not None and results[-1]:
        task_id, digest, created_at = results[-1][0]
        if as_datetime(created_at) >= idempotency.cutoff(ttl_hours):
            record = idempotency.KeyRecord(task_id, digest, won=False)
    return SubmissionFacts(balance=int(user[0] or 0) if user else 0,
                           max_priority=user[1] if user else Priority.NORMAL.value,
                           uploads=uploads, key_record=record)
