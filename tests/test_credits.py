"""The ledger on its own: atomic, idempotent, never negative. Checked on the ledger rows."""

from __future__ import annotations

import asyncio
import os
import uuid
from datetime import timezone

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from sqlalchemy import func, select

from atelier import credits, users, works
from atelier.db import create_engine, create_schema_for_tests, ledger
from atelier.errors import AlreadyRefunded, InsufficientCredits, InvalidRequest, UnknownUser
from atelier.messages import StoredImage


@pytest.fixture
async def engine(tmp_path):
    url = os.environ.get("ATELIER_TEST_DATABASE_URL") or f"sqlite+aiosqlite:///{tmp_path}/ledger.db"
    eng = create_engine(url)
    await create_schema_for_tests(eng)
    yield eng
    await eng.dispose()


async def _user(engine, amount: int) -> str:
    u = await users.create_user(engine)
    if amount:
        await credits.grant(engine, user_id=u.user_id, amount=amount, reason="test")
    return u.user_id


async def _rows(engine, task_id: str) -> list[tuple[str, int]]:
    async with engine.connect() as conn:
        rows = (await conn.execute(select(ledger.c.entry, ledger.c.amount).where(ledger.c.task_id == task_id))).all()
    return sorted((r.entry, int(r.amount)) for r in rows)


async def test_charge_is_idempotent_by_task(engine):
    user = await _user(engine, 100)
    first = await credits.charge(engine, task_id="t1", user_id=user, amount=30)
    again = await credits.charge(engine, task_id="t1", user_id=user, amount=30)
    assert (first.amount, first.balance, first.replayed) == (30, 70, False)
    assert (again.amount, again.balance, again.replayed) == (30, 70, True)
    assert await credits.balance(engine, user) == 70
    assert await _rows(engine, "t1") == [("charge", -30)]


async def test_insufficient_credits_charges_nothing(engine):
    user = await _user(engine, 5)
    with pytest.raises(InsufficientCredits):
        await credits.charge(engine, task_id="t2", user_id=user, amount=10)
    assert await credits.balance(engine, user) == 5
    assert await _rows(engine, "t2") == []
    # And a later charge of the same task, once the user can pay, goes through.
    await credits.grant(engine, user_id=user, amount=5)
    moved = await credits.charge(engine, task_id="t2", user_id=user, amount=10)
    assert (moved.amount, moved.balance) == (10, 0)


async def test_refund_only_after_charge_and_only_once(engine):
    user = await _user(engine, 50)
    await credits.charge(engine, task_id="t3", user_id=user, amount=20)
    first = await credits.refund(engine, task_id="t3", user_id=user)
    second = await credits.refund(engine, task_id="t3", user_id=user)
    assert (first.amount, first.balance) == (20, 50)
    assert (second.amount, second.replayed) == (0, True)
    assert await _rows(engine, "t3") == [("charge", -20), ("refund", 20)]
    assert await credits.task_totals(engine, "t3") == (20, 20)


async def test_a_refund_before_its_charge_leaves_a_tombstone_that_bars_the_charge(engine):
    """Issue 10 #3: the charge's last attempt commits after the refund ran; it must refuse."""
    user = await _user(engine, 50)
    early = await credits.refund(engine, task_id="late", user_id=user, reason="DeadlineExceeded")
    assert (early.amount, early.balance) == (0, 50)
    assert await _rows(engine, "late") == [("refund", 0)]
    with pytest.raises(AlreadyRefunded) as caught:
        await credits.charge(engine, task_id="late", user_id=user, amount=20)
    assert caught.value.code == "AlreadyRefunded" and caught.value.retryable is False
    assert await credits.balance(engine, user) == 50
    assert await _rows(engine, "late") == [("refund", 0)]
    again = await credits.refund(engine, task_id="late", user_id=user)
    assert (again.amount, again.replayed) == (0, True)
    assert await credits.task_totals(engine, "late") == (0, 0)


async def test_a_refund_of_a_task_of_an_unknown_user_writes_nothing(engine):
    moved = await credits.refund(engine, task_id="ghost", user_id="nobody")
    assert moved.amount == 0 and await _rows(engine, "ghost") == []


IMAGE = StoredImage(key="a" * 64 + ".png", content_type="image/png", width=1, height=1, size=10)


async def _save(engine, task_id: str, user: str):
    return await works.save_work(engine, task_id=task_id, user_id=user, kind="photography", model="m",
                                 prompt="p", images=[IMAGE])


async def test_a_save_after_the_refund_refuses(engine):
    user = await _user(engine, 50)
    await credits.charge(engine, task_id="s1", user_id=user, amount=10)
    await credits.refund(engine, task_id="s1", user_id=user)
    with pytest.raises(AlreadyRefunded):
        await _save(engine, "s1", user)
    assert await works.work_for_task(engine, "s1") is None
    # A refund that found no charge bars the save just as well.
    await credits.refund(engine, task_id="s2", user_id=user)
    with pytest.raises(AlreadyRefunded):
        await _save(engine, "s2", user)
    assert await works.work_for_task(engine, "s2") is None


async def test_a_work_is_saved_only_for_a_task_charged_to_its_user(engine):
    a, b = await _user(engine, 50), await _user(engine, 50)
    with pytest.raises(InvalidRequest, match="not charged"):
        await _save(engine, "never-charged", a)
    await credits.charge(engine, task_id="of-a", user_id=a, amount=10)
    with pytest.raises(InvalidRequest, match="not charged"):
        await _save(engine, "of-a", b)
    work_id, replayed = await _save(engine, "of-a", a)
    assert (await _save(engine, "of-a", a)) == (work_id, True) and replayed is False
    assert await works.work_for_task(engine, "never-charged") is None


async def test_a_refund_after_the_save_withdraws_the_work(engine):
    """The save committed but the workflow never heard of it and refunded: no unpaid work is left."""
    user = await _user(engine, 50)
    await credits.charge(engine, task_id="s3", user_id=user, amount=10)
    await _save(engine, "s3", user)
    await credits.refund(engine, task_id="s3", user_id=user)
    assert await works.work_for_task(engine, "s3") is None
    assert await credits.task_totals(engine, "s3") == (10, 10)
    assert await credits.balance(engine, user) == 50


async def test_unknown_user_and_bad_amounts(engine):
    with pytest.raises(UnknownUser):
        await credits.charge(engine, task_id="t4", user_id="nobody", amount=1)
    assert await _rows(engine, "t4") == []
    user = await _user(engine, 0)
    with pytest.raises(InvalidRequest):
        await credits.grant(engine, user_id=user, amount=0)
    with pytest.raises(InvalidRequest):
        await credits.charge(engine, task_id="t5", user_id=user, amount=-5)


async def test_charge_of_a_task_by_another_user_is_refused(engine):
    a, b = await _user(engine, 50), await _user(engine, 50)
    await credits.charge(engine, task_id="shared", user_id=a, amount=10)
    with pytest.raises(InvalidRequest):
        await credits.charge(engine, task_id="shared", user_id=b, amount=10)
    assert await credits.balance(engine, b) == 50


async def test_concurrent_charges_never_overdraw(engine):
    """40 concurrent charges of 10 against a balance of 100: exactly 10 succeed."""
    user = await _user(engine, 100)

    async def one(i: int):
        try:
            return await credits.charge(engine, task_id=f"c{i}", user_id=user, amount=10)
        except InsufficientCredits:
            return None

    results = await asyncio.gather(*(one(i) for i in range(40)))
    assert sum(1 for r in results if r is not None) == 10
    assert await credits.balance(engine, user) == 0
    async with engine.connect() as conn:
        charged = (await conn.execute(
            select(func.count()).select_from(ledger).where(ledger.c.user_id == user, ledger.c.entry == "charge")
        )).scalar_one()
    assert charged == 10


async def test_concurrent_refunds_of_one_charge_refund_once(engine):
    user = await _user(engine, 30)
    await credits.charge(engine, task_id="r1", user_id=user, amount=30)
    results = await asyncio.gather(*(credits.refund(engine, task_id="r1", user_id=user) for _ in range(30)))
    assert sum(r.amount for r in results) == 30
    assert await credits.balance(engine, user) == 30
    assert await _rows(engine, "r1") == [("charge", -30), ("refund", 30)]


@hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["charge", "refund", "save"]), st.integers(0, 5), st.integers(0, 40)),
                    min_size=1, max_size=25),
       start=st.integers(0, 100))
async def test_ledger_property_balance_equals_sum_of_entries(engine, ops, start):
    """Any sequence of (possibly repeated) charges, refunds and saves keeps: balance = grants -
    charges + refunds, balance >= 0, at most one charge and one refund per task, a refund is
    the charge or a tombstone of 0 with no charge, and a work only for a task charged and not
    refunded."""
    user = await _user(engine, start)
    prefix = uuid.uuid4().hex[:8]
    for op, task, amount in ops:
        task_id = f"{prefix}-{task}"
        if op == "charge":
            try:
                await credits.charge(engine, task_id=task_id, user_id=user, amount=amount)
            except (InsufficientCredits, InvalidRequest, AlreadyRefunded):
                pass
        elif op == "refund":
            await credits.refund(engine, task_id=task_id, user_id=user)
        else:
            try:
                await _save(engine, task_id, user)
            except (AlreadyRefunded, InvalidRequest):
                pass
    async with engine.connect() as conn:
        rows = (await conn.execute(select(ledger.c.task_id, ledger.c.entry, ledger.c.amount)
                                   .where(ledger.c.user_id == user))).all()
    total = sum(int(r.amount) for r in rows)
    bal = await credits.balance(engine, user)
    assert bal == total and bal >= 0
    per_task: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        per_task.setdefault((r.task_id, r.entry), []).append(int(r.amount))
    assert all(len(v) == 1 for v in per_task.values())
    for (task_id, entry), (amount,) in per_task.items():
        if entry == "refund":
            assert per_task.get((task_id, "charge"), [0]) == [-amount]
    for task in {t for _, t, _ in ops}:
        task_id = f"{prefix}-{task}"
        charged, refunded = await credits.task_totals(engine, task_id)
        refund_row = (task_id, "refund") in per_task
        charge_row = (task_id, "charge") in per_task
        assert charged - refunded in (0, charged)
        work = await works.work_for_task(engine, task_id)
        if work is not None:
            assert charge_row and not refund_row
        if refund_row and charge_row:
            assert charged == refunded


async def test_on_sqlite_a_reader_does_not_queue_behind_a_writer(tmp_path):
    """Reads take no write lock: a balance is readable while another transaction holds it."""
    eng = create_engine(f"sqlite+aiosqlite:///{tmp_path}/locks.db")
    await create_schema_for_tests(eng)
    try:
        user = await _user(eng, 40)
        async with eng.begin() as writer:  # holds SQLite's write lock until the block ends
            await writer.execute(ledger.insert().values(user_id=user, task_id="held", entry="grant", amount=1,
                                                        reason="", created_at=__import__("datetime").datetime.now()))
            # Would wait for the lock (60 s busy timeout) if reads took it too.
            assert await asyncio.wait_for(credits.balance(eng, user), timeout=10) == 40
    finally:
        await eng.dispose()


async def test_the_activities_raise_already_refunded_as_non_retryable(engine):
    """The charge and save activities turn the refusal into ApplicationError(type AlreadyRefunded,
    non_retryable): retrying cannot undo a refund."""
    from temporalio.exceptions import ApplicationError
    from temporalio.testing import ActivityEnvironment

    from activities.credits import CreditActivities
    from activities.works import WorkActivities
    from atelier.messages import ChargeRequest, SaveWorkRequest

    user = await _user(engine, 50)
    await credits.refund(engine, task_id="act", user_id=user)
    env = ActivityEnvironment()
    with pytest.raises(ApplicationError) as charged:
        await env.run(CreditActivities(engine).charge_credits, ChargeRequest(task_id="act", user_id=user, amount=5))
    with pytest.raises(ApplicationError) as saved:
        await env.run(WorkActivities(engine).save_work,
                      SaveWorkRequest(task_id="act", user_id=user, kind="photography", model="m", images=[IMAGE]))
    for caught in (charged, saved):
        assert caught.value.type == "AlreadyRefunded"
        assert caught.value.non_retryable is True
    assert await credits.balance(engine, user) == 50


async def test_an_account_page_reads_what_balance_and_entries_read(engine):
    """`account` (one snapshot, plain SQL: the /v1/credits page) agrees with `balance` and
    `entries` (SQLAlchemy) on every field, on SQLite and on PostgreSQL."""
    user = await _user(engine, 100)
    await credits.charge(engine, task_id="acct-1", user_id=user, amount=30)
    await credits.charge(engine, task_id="acct-2", user_id=user, amount=20)
    await credits.refund(engine, task_id="acct-1", user_id=user)
    balance, page = await credits.account(engine, user, limit=3)
    assert balance == await credits.balance(engine, user) == 80
    expected = await credits.entries(engine, user, limit=3)
    assert [(e.id, e.task_id, e.entry, e.amount, e.reason) for e in page] == \
        [(e.id, e.task_id, e.entry, e.amount, e.reason) for e in expected]
    assert [e.entry for e in page] == ["refund", "charge", "charge"]
    utc = lambda d: d if d.tzinfo else d.replace(tzinfo=timezone.utc)  # noqa: E731 - SQLite's are naive UTC
    assert [e.created_at for e in page] == [utc(e.created_at) for e in expected]
    assert all(e.created_at.tzinfo is not None for e in page)
    assert await credits.task_totals(engine, "acct-1") == (30, 30)
    assert await credits.task_totals(engine, "acct-2") == (20, 0)
    assert await credits.task_totals(engine, "no-such-task") == (0, 0)
    with pytest.raises(UnknownUser):
        await credits.account(engine, "no-such-user")


async def test_on_sqlite_the_hot_reads_skip_sqlalchemy_and_take_no_lock(tmp_path):
    """A generation's money and an account page are read on the DB-API cursor: no statement goes
    through SQLAlchemy (counted on both engines), and none waits for a writer's lock."""
    from sqlalchemy import event

    eng = create_engine(f"sqlite+aiosqlite:///{tmp_path}/raw.db")
    await create_schema_for_tests(eng)
    try:
        user = await _user(eng, 40)
        await credits.charge(eng, task_id="raw-1", user_id=user, amount=10)
        assert await credits.balance(eng, user) == 30  # makes the reader
        statements: list[str] = []
        for sync in (eng.sync_engine, eng.sync_engine._atelier_reader.engine):
            event.listen(sync, "before_cursor_execute", lambda *a: statements.append(a[2]))
        async with eng.begin() as writer:  # holds SQLite's write lock until the block ends
            await writer.execute(ledger.insert().values(user_id=user, task_id="held", entry="grant", amount=1,
                                                        reason="", created_at=__import__("datetime").datetime.now()))
            statements.clear()
            balance, page = await asyncio.wait_for(credits.account(eng, user, limit=5), timeout=10)
            totals = await asyncio.wait_for(credits.task_totals(eng, "raw-1"), timeout=10)
            assert statements == []
        assert balance == 30 and [e.entry for e in page] == ["charge", "grant"] and totals == (10, 0)
        await eng.dispose()  # closes the readers' connections; the engine stays usable
        _, after = await credits.account(eng, user)
        assert [(e.task_id, e.amount) for e in after][:2] == [("held", 1), ("raw-1", -10)]  # committed: seen
    finally:
        await eng.dispose()


async def test_on_sqlite_a_busy_database_sends_the_read_to_a_thread_and_the_loop_keeps_running(tmp_path):
    """The hot reads run on the event loop only when SQLite answers at once. Under a lock a
    read must wait for (here another connection's exclusive lock), the loop does not wait: the
    read waits on a reader thread, the loop keeps serving, and the read answers once the lock
    is gone."""
    import sqlite3
    import time

    path = tmp_path / "busy.db"
    eng = create_engine(f"sqlite+aiosqlite:///{path}")
    await create_schema_for_tests(eng)
    try:
        user = await _user(eng, 40)
        await eng.dispose()  # no connection of ours left open: the lock below can be taken
        holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("SELECT count(*) FROM users").fetchall()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            for _ in range(200):  # bounded: 10 s at most
                await asyncio.sleep(0.05)
                ticks += 1

        async def release_later() -> None:
            await asyncio.sleep(1.0)
            holder.execute("COMMIT")
            holder.execute("PRAGMA locking_mode=NORMAL")
            holder.execute("SELECT count(*) FROM users").fetchall()  # drops the exclusive lock
            holder.close()

        tick_task = asyncio.create_task(ticker())
        release = asyncio.create_task(release_later())
        started = time.monotonic()
        balance, _ = await asyncio.wait_for(credits.account(eng, user), timeout=30)
        waited = time.monotonic() - started
        await release
        tick_task.cancel()
        assert balance == 40
        assert waited >= 0.9, "the read did not wait for the lock: it was not held"
        assert ticks >= 10, f"the event loop stalled while the read waited ({ticks} ticks in {waited:.1f} s)"
    finally:
        await eng.dispose()
