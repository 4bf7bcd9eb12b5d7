"""The ledger under concurrent workers, on PostgreSQL as on SQLite: the conditional debit
and the unique ledger rows hold with no read-then-write race. Checked on the ledger table.

PostgreSQL runs when a server answers (ATELIER_TEST_DATABASE_URL, or 127.0.0.1:5432 as
CI starts it) on a fresh database built by the migrations; skipped cleanly otherwise.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from sqlalchemy import func, select

from atelier import credits, migrate, users, works
from atelier.credits import Movement
from atelier.db import create_engine, ledger
from atelier.db import users as users_table
from atelier.errors import AlreadyRefunded, InsufficientCredits, InvalidRequest
from atelier.messages import StoredImage
from tests.postgres_db import create_database, drop_database, requires_postgres

CALLS = 200
BALANCE = 50
# Up to 2 x 25 connections: enough to make the 200 calls truly concurrent, and within
# PostgreSQL's default max_connections (100).
POOL_SIZE = 25


@pytest.fixture(params=[pytest.param("postgresql", marks=requires_postgres), "sqlite"])
async def engine(request, tmp_path):
    if request.param == "postgresql":
        url = await create_database("atelier_conc")
    else:
        url = f"sqlite+aiosqlite:///{tmp_path}/ledger.db"
    try:
        migrate.upgrade(url)  # the production path: migrations, not create_all
        eng = create_engine(url, pool_size=POOL_SIZE)
        try:
            yield eng
        finally:
            await eng.dispose()
    finally:
        if request.param == "postgresql":
            await drop_database(url)


async def _user_with(engine, amount: int) -> str:
    user = (await users.create_user(engine)).user_id
    await credits.grant(engine, user_id=user, amount=amount, reason="test", grant_id=f"grant-{user}")
    return user


async def _ledger_rows(engine, user_id: str) -> dict[str, tuple[int, int]]:
    """entry -> (row count, summed amount), read from the ledger itself."""
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(ledger.c.entry, func.count(), func.sum(ledger.c.amount))
                .where(ledger.c.user_id == user_id)
                .group_by(ledger.c.entry)
            )
        ).all()
    return {entry: (int(count), int(total)) for entry, count, total in rows}


async def _stored_balance(engine, user_id: str) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(users_table.c.balance).where(users_table.c.id == user_id))).scalar_one())


class BalanceWatch:
    """Reads the balance over and over while the calls run: it must never be seen negative."""

    def __init__(self, engine, user_id: str):
        self.engine, self.user_id = engine, user_id
        self.seen: list[int] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            self.seen.append(await _stored_balance(self.engine, self.user_id))
            await asyncio.sleep(0.005)

    async def __aenter__(self):
        self._task = asyncio.create_task(self.run())
        return self

    async def __aexit__(self, *exc):
        self._stop.set()
        await self._task


async def test_200_concurrent_charges_against_a_balance_of_50(engine):
    user = await _user_with(engine, BALANCE)

    async def charge(i: int):
        try:
            return await credits.charge(engine, task_id=f"task-{i:03d}", user_id=user, amount=1, reason="test")
        except InsufficientCredits as exc:
            return exc

    async with BalanceWatch(engine, user) as watch:
        outcomes = await asyncio.gather(*(charge(i) for i in range(CALLS)))

    charged = [o for o in outcomes if isinstance(o, Movement)]
    refused = [o for o in outcomes if isinstance(o, InsufficientCredits)]
    assert len(charged) == BALANCE and len(refused) == CALLS - BALANCE
    assert all(m.amount == 1 and not m.replayed for m in charged)
    # Each debit saw the one before it: the balances they left are 49, 48, ..., 0, once each.
    assert sorted(m.balance for m in charged) == list(range(BALANCE))

    assert await _stored_balance(engine, user) == 0
    rows = await _ledger_rows(engine, user)
    assert rows == {"grant": (1, BALANCE), "charge": (BALANCE, -BALANCE)}
    assert sum(total for _, total in rows.values()) == 0  # the ledger explains the balance
    assert watch.seen and min(watch.seen) >= 0


async def test_200_concurrent_retries_of_one_charge_charge_once(engine):
    user = await _user_with(engine, BALANCE)
    outcomes = await asyncio.gather(
        *(credits.charge(engine, task_id="task-retried", user_id=user, amount=7) for _ in range(CALLS))
    )
    assert sum(not m.replayed for m in outcomes) == 1
    assert all(m.amount == 7 for m in outcomes)
    assert await _stored_balance(engine, user) == BALANCE - 7
    assert (await _ledger_rows(engine, user))["charge"] == (1, -7)


async def test_200_concurrent_refunds_of_one_charge_refund_once(engine):
    user = await _user_with(engine, BALANCE)
    await credits.charge(engine, task_id="task-refunded", user_id=user, amount=7)
    assert await _stored_balance(engine, user) == BALANCE - 7

    outcomes = await asyncio.gather(
        *(credits.refund(engine, task_id="task-refunded", user_id=user, reason="failed") for _ in range(CALLS))
    )
    first = [m for m in outcomes if not m.replayed]
    assert len(first) == 1 and first[0].amount == 7
    assert all(m.amount == 0 for m in outcomes if m.replayed)

    assert await _stored_balance(engine, user) == BALANCE  # restored once, not 200 times
    rows = await _ledger_rows(engine, user)
    assert rows == {"grant": (1, BALANCE), "charge": (1, -7), "refund": (1, 7)}


RACED_TASKS = 60
COST = 3


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_charge_refund_and_save_racing_keep_the_ledger_invariant(engine, seed):
    """Issue 10 #3: a task's charge, refund and save start together in a random order and
    commit in whatever order the database gives. Whatever it is: charged - refunded is 0 or
    the cost, a refunded task ends with nothing charged and no work, and a work exists only
    for a task that stays charged."""
    rng = random.Random(seed)
    user = await _user_with(engine, RACED_TASKS * COST)
    image = StoredImage(key="b" * 64 + ".png", content_type="image/png", width=1, height=1, size=1)
    refunded_tasks = {f"race-{seed}-{i}" for i in range(RACED_TASKS) if rng.random() < 0.8}

    async def after(delay_s: float, call):
        await asyncio.sleep(delay_s)
        try:
            return await call()
        except (AlreadyRefunded, InvalidRequest) as refused:  # refused: the allowed outcomes
            return refused

    calls = []
    for i in range(RACED_TASKS):
        task_id = f"race-{seed}-{i}"
        calls.append(after(rng.uniform(0, 0.02), lambda t=task_id: credits.charge(
            engine, task_id=t, user_id=user, amount=COST)))
        calls.append(after(rng.uniform(0, 0.02), lambda t=task_id: works.save_work(
            engine, task_id=t, user_id=user, kind="photography", model="m", prompt="", images=[image])))
        if task_id in refunded_tasks:
            calls.append(after(rng.uniform(0, 0.02), lambda t=task_id: credits.refund(
                engine, task_id=t, user_id=user, reason="failed")))
    rng.shuffle(calls)
    outcomes = await asyncio.gather(*calls)
    assert not [o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, AlreadyRefunded | InvalidRequest)]

    net_charged = 0
    for i in range(RACED_TASKS):
        task_id = f"race-{seed}-{i}"
        charged, refunded = await credits.task_totals(engine, task_id)
        assert charged - refunded in (0, COST), task_id
        work = await works.work_for_task(engine, task_id)
        if task_id in refunded_tasks:
            assert charged == refunded, f"{task_id}: charged {charged}, refunded {refunded}"
            assert work is None, task_id
        elif work is not None:
            assert charged - refunded == COST, task_id
        net_charged += charged - refunded
    assert await _stored_balance(engine, user) == RACED_TASKS * COST - net_charged
    # The refunds that ran before their charge did happen somewhere in these runs.
    rows = await _ledger_rows(engine, user)
    assert rows["refund"][0] == len(refunded_tasks)
