"""The credit ledger. Money is sacred: every movement is one transaction holding a
conditional balance update and a ledger row unique per (task, entry), so a retried
charge or refund is a no-op.

A refund always leaves its row, even when it finds no charge (a tombstone of amount 0):
a charge or a saved work that commits after it refuses with AlreadyRefunded. So whatever
the order in which a task's charge, refund and save commit, charged - refunded is 0 or
the cost, and a work exists only for a task that stays charged. A task's ledger
transactions are serialised: by SQLite's single writer (BEGIN IMMEDIATE), and on
PostgreSQL by a transaction-scoped advisory lock on the task id."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from atelier.db import as_datetime, ledger, read_rows, reading, users, works
from atelier.errors import AlreadyRefunded, InsufficientCredits, InvalidRequest, UnknownUser


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class Movement:
    amount: int  # credits moved by this call (0 when it was already done)
    balance: int
    replayed: bool


@dataclass
class LedgerEntry:
    id: int
    task_id: str
    entry: str
    amount: int
    reason: str
    created_at: datetime


def _insert_ignoring_duplicate(conn: AsyncConnection, **values):
    """INSERT ... ON CONFLICT (task_id, entry) DO NOTHING, in the dialect at hand."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(ledger).values(**values).on_conflict_do_nothing(
        index_elements=["task_id", "entry"]
    )


async def lock_task(conn: AsyncConnection, task_id: str) -> None:
    """Serialise this transaction with every other ledger or work transaction of `task_id`
    until it ends. Under READ COMMITTED, statements after the lock see what the previous
    holder committed. SQLite needs nothing: BEGIN IMMEDIATE already admits one writer."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
                           {"key": f"atelier-task:{task_id}"})


async def refuse_if_refunded(conn: AsyncConnection, task_id: str, doing: str) -> None:
    """Raise AlreadyRefunded if `task_id` has a refund row (a real refund or a tombstone)."""
    refunded = (await conn.execute(
        select(func.count()).select_from(ledger).where(ledger.c.task_id == task_id, ledger.c.entry == "refund")
    )).scalar_one()
    if refunded:
        raise AlreadyRefunded(f"task {task_id!r} was refunded: it cannot be {doing}")


async def charged_to(conn: AsyncConnection, task_id: str, user_id: str) -> bool:
    """Whether `task_id` has a charge row of `user_id`."""
    return (await conn.execute(
        select(func.count()).select_from(ledger).where(
            ledger.c.task_id == task_id, ledger.c.entry == "charge", ledger.c.user_id == user_id)
    )).scalar_one() > 0


async def _balance(conn: AsyncConnection, user_id: str) -> int:
    balance = (await conn.execute(select(users.c.balance).where(users.c.id == user_id))).scalar()
    if balance is None:
        raise UnknownUser(f"unknown user {user_id!r}")
    return int(balance)


async def charge(engine: AsyncEngine, *, task_id: str, user_id: str, amount: int, reason: str = "") -> Movement:
    """Debit `amount` for `task_id`, once. Raises InsufficientCredits with nothing charged,
    and AlreadyRefunded if a refund of the task (even one that found nothing) came first."""
    if amount < 0:
        raise InvalidRequest("a charge cannot be negative")
    async with engine.begin() as conn:
        await lock_task(conn, task_id)
        await refuse_if_refunded(conn, task_id, "charged")
        await _balance(conn, user_id)  # unknown user: a clear error, not a foreign-key failure
        inserted = await conn.execute(
            _insert_ignoring_duplicate(
                conn, user_id=user_id, task_id=task_id, entry="charge", amount=-amount,
                reason=reason, created_at=_now(),
            )
        )
        if inserted.rowcount == 0:
            # Already charged: a retry. Report what the first call did.
            row = (
                await conn.execute(
                    select(ledger.c.amount, ledger.c.user_id).where(
                        ledger.c.task_id == task_id, ledger.c.entry == "charge"
                    )
                )
            ).one()
            if row.user_id != user_id:
                raise InvalidRequest(f"task {task_id!r} was charged to another user")
            return Movement(amount=-int(row.amount), balance=await _balance(conn, user_id), replayed=True)
        # One atomic conditional debit: no read-then-write race, on SQLite or PostgreSQL.
        debited = await conn.execute(
            update(users)
            .where(users.c.id == user_id, users.c.balance >= amount)
            .values(balance=users.c.balance - amount)
            .returning(users.c.balance)
        )
        new_balance = debited.scalar()
        if new_balance is None:
            balance = await _balance(conn, user_id)  # raises UnknownUser
            await conn.rollback()  # drop the ledger row: nothing was charged
            raise InsufficientCredits(f"balance {balance} is lower than the cost {amount}")
        return Movement(amount=amount, balance=int(new_balance), replayed=False)


async def refund(engine: AsyncEngine, *, task_id: str, user_id: str, reason: str = "") -> Movement:
    """Give back what `task_id` was charged, at most once. With no charge yet, leave a
    tombstone (a refund row of 0) that bars a later charge. A work saved for the task is
    withdrawn: a refunded generation leaves none (its output files stay the user's)."""
    async with engine.begin() as conn:
        await lock_task(conn, task_id)
        await conn.execute(delete(works).where(works.c.task_id == task_id))
        charged = (
            await conn.execute(
                select(ledger.c.amount, ledger.c.user_id).where(
                    ledger.c.task_id == task_id, ledger.c.entry == "charge"
                )
            )
        ).one_or_none()
        if charged is None:
            if not user_id:
                return Movement(amount=0, balance=0, replayed=False)
            try:
                balance = await _balance(conn, user_id)
            except UnknownUser:
                # No such user: no charge can ever succeed for it, so no tombstone is needed.
                return Movement(amount=0, balance=0, replayed=False)
            tombstone = await conn.execute(
                _insert_ignoring_duplicate(
                    conn, user_id=user_id, task_id=task_id, entry="refund", amount=0,
                    reason=reason, created_at=_now(),
                )
            )
            return Movement(amount=0, balance=balance, replayed=tombstone.rowcount == 0)
        amount = -int(charged.amount)
        inserted = await conn.execute(
            _insert_ignoring_duplicate(
                conn, user_id=charged.user_id, task_id=task_id, entry="refund", amount=amount,
                reason=reason, created_at=_now(),
            )
        )
        if inserted.rowcount == 0:
            return Movement(amount=0, balance=await _balance(conn, charged.user_id), replayed=True)
        credited = await conn.execute(
            update(users)
            .where(users.c.id == charged.user_id)
            .values(balance=users.c.balance + amount)
            .returning(users.c.balance)
        )
        return Movement(amount=amount, balance=int(credited.scalar_one()), replayed=False)


async def grant(engine: AsyncEngine, *, user_id: str, amount: int, reason: str = "", grant_id: str | None = None) -> Movement:
    """Add credits (an operator's top-up). Idempotent when the caller passes a grant_id."""
    if amount <= 0:
        raise InvalidRequest("a grant must be a positive number of credits")
    grant_id = grant_id or f"grant-{uuid.uuid4()}"
    async with engine.begin() as conn:
        await _balance(conn, user_id)
        inserted = await conn.execute(
            _insert_ignoring_duplicate(
                conn, user_id=user_id, task_id=grant_id, entry="grant", amount=amount,
                reason=reason, created_at=_now(),
            )
        )
        if inserted.rowcount == 0:
            return Movement(amount=0, balance=await _balance(conn, user_id), replayed=True)
        credited = await conn.execute(
            update(users).where(users.c.id == user_id)
            .values(balance=users.c.balance + amount).returning(users.c.balance)
        )
        return Movement(amount=amount, balance=int(credited.scalar_one()), replayed=False)


async def balance(engine: AsyncEngine, user_id: str) -> int:
    async with reading(engine) as conn:
        return await _balance(conn, user_id)


async def entries(engine: AsyncEngine, user_id: str, *, limit: int = 50, task_id: str | None = None) -> list[LedgerEntry]:
    query = select(ledger).where(ledger.c.user_id == user_id)
    if task_id is not None:
        query = query.where(ledger.c.task_id == task_id)
    query = query.order_by(ledger.c.id.desc()).limit(limit)
    async with reading(engine) as conn:
        rows = (await conn.execute(query)).all()
    return [LedgerEntry(r.id, r.task_id, r.entry, int(r.amount), r.reason, r.created_at) for r in rows]


# The two hottest reads (every read of a generation, every account page), as plain SQL for
# db.read_rows: on SQLite they skip SQLAlchemy's per-statement work.
_TASK_TOTALS_SQL = "SELECT entry, amount FROM ledger WHERE task_id = :task_id"
_BALANCE_SQL = "SELECT balance FROM users WHERE id = :user_id"
_ENTRIES_SQL = ("SELECT id, task_id, entry, amount, reason, created_at FROM ledger WHERE user_id = :user_id "
                "ORDER BY id DESC LIMIT :limit")


async def task_totals(engine: AsyncEngine, task_id: str) -> tuple[int, int]:
    """(charged, refunded) for one task, read from the ledger itself."""
    [rows] = await read_rows(engine, [(_TASK_TOTALS_SQL, {"task_id": task_id})])
    charged = sum(-int(amount) for entry, amount in rows if entry == "charge")
    refunded = sum(int(amount) for entry, amount in rows if entry == "refund")
    return charged, refunded


async def account(engine: AsyncEngine, user_id: str, *, limit: int = 50) -> tuple[int, list[LedgerEntry]]:
    """A user's balance and newest `limit` ledger entries, from one snapshot (the balance is
    the sum of every entry, so the two always agree)."""
    balance_rows, entry_rows = await read_rows(engine, [(_BALANCE_SQL, {"user_id": user_id}),
                                                        (_ENTRIES_SQL, {"user_id": user_id, "limit": int(limit)})])
    if not balance_rows:
        raise UnknownUser(f"unknown user {user_id!r}")
    return int(balance_rows[0][0]), [LedgerEntry(int(i), t, e, int(a), r, as_datetime(c))
                                     for i, t, e, a, r, c in entry_rows]
