"""What a new generation reads before it starts (`read_facts`): the caller's balance and lane,
which file ids are the caller's own uploads, and a live Idempotency-Key row. Plain SQL in one
snapshot; checked against the rows themselves, on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import event, update

from atelier import credits, users
from atelier.db import create_engine, create_schema_for_tests, files, idempotency_keys
from starter.api import idempotency
from starter.api.submission import read_facts


@pytest.fixture
async def engine(tmp_path):
    url = os.environ.get("ATELIER_TEST_DATABASE_URL") or f"sqlite+aiosqlite:///{tmp_path}/submit.db"
    eng = create_engine(url)
    await create_schema_for_tests(eng)
    yield eng
    await eng.dispose()


async def _file(engine, user_id: str, file_id: str, origin: str = "upload") -> None:
    async with engine.begin() as conn:
        await conn.execute(files.insert().values(
            id=file_id, user_id=user_id, blob_key=f"blob-{file_id}", content_type="image/jpeg", width=8,
            height=8, size=100, origin=origin, created_at=datetime.now(timezone.utc)))


async def test_the_facts_are_the_callers_own_rows(engine):
    me = (await users.create_user(engine, max_priority="high")).user_id
    other = (await users.create_user(engine)).user_id
    await credits.grant(engine, user_id=me, amount=70, reason="test")
    await _file(engine, me, "f-mine")
    await _file(engine, me, "f-output", origin="output")
    await _file(engine, other, "f-theirs")

    facts = await read_facts(engine, user_id=me, file_ids=["f-mine", "f-output", "f-theirs", "f-none", "f-mine"],
                             idempotency_key=None, ttl_hours=24)
    assert (facts.balance, facts.max_priority) == (70, "high")
    assert facts.uploads == {"f-mine": "blob-f-mine"}  # not an output, not another user's, not a missing id
    assert facts.key_record is None

    nobody = await read_facts(engine, user_id="usr_nobody", file_ids=["f-mine"], idempotency_key="k", ttl_hours=24)
    assert (nobody.balance, nobody.max_priority, nobody.uploads, nobody.key_record) == (0, "normal", {}, None)


async def test_a_key_row_is_found_while_it_lives_and_ignored_once_it_expired(engine):
    me = (await users.create_user(engine)).user_id
    other = (await users.create_user(engine)).user_id
    won = await idempotency.claim(engine, user_id=me, key="order-1", body_hash="h1", task_id="gen-1", ttl_hours=24)
    assert won.won

    facts = await read_facts(engine, user_id=me, file_ids=[], idempotency_key="order-1", ttl_hours=24)
    assert facts.key_record == idempotency.KeyRecord("gen-1", "h1", won=False)
    assert (await read_facts(engine, user_id=other, file_ids=[], idempotency_key="order-1",
                             ttl_hours=24)).key_record is None  # keys are per user
    assert (await read_facts(engine, user_id=me, file_ids=[], idempotency_key="order-2",
                             ttl_hours=24)).key_record is None

    async with engine.begin() as conn:  # the row is now 25 hours old
        await conn.execute(update(idempotency_keys).where(idempotency_keys.c.user_id == me).values(
            created_at=datetime.now(timezone.utc) - timedelta(hours=25)))
    assert (await read_facts(engine, user_id=me, file_ids=[], idempotency_key="order-1",
                             ttl_hours=24)).key_record is None
    assert (await read_facts(engine, user_id=me, file_ids=[], idempotency_key="order-1",
                             ttl_hours=26)).key_record == idempotency.KeyRecord("gen-1", "h1", won=False)


async def test_on_sqlite_a_submissions_reads_skip_sqlalchemy(tmp_path):
    """On a SQLite file the reads go straight to the DB-API cursor: SQLAlchemy's per-statement
    work was most of what a submission spent on them (docs/benchmarks.md, issue 13, fourth pass)."""
    eng = create_engine(f"sqlite+aiosqlite:///{tmp_path}/raw.db")
    await create_schema_for_tests(eng)
    try:
        me = (await users.create_user(eng)).user_id
        await credits.grant(eng, user_id=me, amount=5, reason="test")
        await _file(eng, me, "f-1")
        await idempotency.claim(eng, user_id=me, key="k", body_hash="h", task_id="gen-k", ttl_hours=24)
        assert await credits.balance(eng, me) == 5  # makes the reader
        statements: list[str] = []
        for sync in (eng.sync_engine, eng.sync_engine._atelier_reader.engine):
            event.listen(sync, "before_cursor_execute", lambda *a: statements.append(a[2]))
        facts = await read_facts(eng, user_id=me, file_ids=["f-1"], idempotency_key="k", ttl_hours=24)
        assert statements == []
        assert (facts.balance, facts.uploads, facts.key_record) == (5, {"f-1": "blob-f-1"},
                                                                     idempotency.KeyRecord("gen-k", "h", won=False))
    finally:
        await eng.dispose()
