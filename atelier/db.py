"""The product's own data: users, the credit ledger, works, uploads, model health, idempotency keys.

SQLAlchemy 2 async, SQLite on one machine, PostgreSQL in production. The schema is created
by Alembic migrations (`atelier db upgrade`); `metadata` here is their source of truth.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    event,
    text,
)
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

users = Table(
    "users",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("balance", BigInteger, nullable=False, server_default="0"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # The highest priority lane (high | normal | low) this user's generations may ask for.
    Column("max_priority", String(8), nullable=False, server_default="normal"),
    CheckConstraint("balance >= 0", name="balance_not_negative"),
)

api_keys = Table(
    "api_keys",
    metadata,
    # sha256 of the key; the key itself is shown once and never stored.
    Column("key_hash", String(64), primary_key=True),
    Column("user_id", String(64), ForeignKey("users.id"), nullable=False, index=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)

# One row per money movement. (task_id, entry) is unique: a retried charge or refund
# finds its row and does nothing. Grants use a fresh id as task_id.
ledger = Table(
    "ledger",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("user_id", String(64), ForeignKey("users.id"), nullable=False),
    Column("task_id", String(128), nullable=False),
    Column("entry", String(16), nullable=False),  # charge | refund | grant
    Column("amount", BigInteger, nullable=False),  # signed: charge < 0, refund/grant > 0
    Column("reason", Text, nullable=False, server_default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("task_id", "entry", name="uq_ledger_task_entry"),
    CheckConstraint("entry IN ('charge', 'refund', 'grant')", name="entry_kind"),
    Index("ix_ledger_user_created", "user_id", "id"),
)

works = Table(
    "works",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("task_id", String(128), nullable=False, unique=True),
    Column("user_id", String(64), ForeignKey("users.id"), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("model", String(128), nullable=False),
    Column("prompt", Text, nullable=False, server_default=""),
    Column("images", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_works_user_created", "user_id", "created_at"),
)

# Who may read which blob: uploads (file_id given to the client) and generated outputs.
files = Table(
    "files",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("user_id", String(64), ForeignKey("users.id"), nullable=False),
    Column("blob_key", String(80), nullable=False),
    Column("content_type", String(32), nullable=False),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("size", Integer, nullable=False),
    Column("origin", String(16), nullable=False),  # upload | output
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("user_id", "blob_key", "origin", name="uq_files_owner_blob"),
    Index("ix_files_user_blob", "user_id", "blob_key"),
)

# Who holds each blob: an upload (owner_id: the file id), a generation's input or output (owner_id:
# the task id). The blob store is content-addressed, so several users or generations can hold the
# same bytes; a blob is deleted only when its last reference goes.
blob_refs = Table(
    "blob_refs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("blob_key", String(80), nullable=False),
    Column("user_id", String(64), nullable=False),
    Column("kind", String(16), nullable=False),  # upload | input | output
    Column("owner_id", String(128), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("blob_key", "kind", "owner_id", name="uq_blob_refs_blob_owner"),
    CheckConstraint("kind IN ('upload', 'input', 'output')", name="ref_kind"),
    Index("ix_blob_refs_blob_key", "blob_key"),
    Index("ix_blob_refs_user_kind", "user_id", "kind"),
    Index("ix_blob_refs_kind_owner", "kind", "owner_id"),
    Index("ix_blob_refs_kind_created", "kind", "created_at"),
)

model_failures = Table(
    "model_failures",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model", String(128), nullable=False),
    Column("error_code", String(64), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Index("ix_model_failures_model_at", "model", "at"),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("user_id", String(64), ForeignKey("users.id"), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("body_hash", String(64), nullable=False),
    Column("task_id", String(128), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)


def create_engine(url: str, *, pool_size: int = 20) -> AsyncEngine:
    """One engine per process. SQLite gets WAL, a busy timeout and BEGIN IMMEDIATE so that
    concurrent writers queue instead of failing; PostgreSQL a sized pool."""
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            from pathlib import Path

            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - driver hook
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _begin_immediate(conn):  # pragma: no cover - driver hook
            if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
                return  # a reader (see `reading`): WAL gives it a snapshot, no lock needed
            # A writer takes the write lock up front: no deadlock when two transactions that
            # read first both try to write.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_async_engine(
        url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True
    )


def reading(engine: AsyncEngine):
    """A connection for reads only (`async with reading(engine) as conn: await conn.execute(...)`).
    On SQLite it takes no write lock, so readers never queue behind writers, and each statement
    runs whole on a reader thread (see _ThreadedReader); elsewhere it is a plain connection."""
    if engine.dialect.name != "sqlite":
        return engine.connect()
    return _reader(engine).connect()


def _reader(engine: AsyncEngine):
    """A SQLite engine's reader, made on first use."""
    reader = getattr(engine.sync_engine, "_atelier_reader", None)
    if reader is None:
        database = engine.url.database
        if not database or database == ":memory:":
            # A private in-memory database is only visible to its own connection: stay on it.
            reader = _AsyncReader(engine.execution_options(isolation_level="AUTOCOMMIT"))
        else:
            reader = _ThreadedReaderFactory(engine)
        engine.sync_engine._atelier_reader = reader
    return reader


async def read_rows(engine: AsyncEngine, statements: Sequence[tuple[str, Mapping[str, Any]]]) -> list[list[tuple]]:
    """Plain SELECTs, each a SQL string with `:named` parameters, read from one snapshot; the
    rows of each, as tuples. For the hottest reads (a generation's money, an account page).

    On a SQLite file they run straight on the DB-API cursor, on the event loop unless the
    database is busy (see _ThreadedReaderFactory.raw): SQLAlchemy's per-statement work (cache
    key, execution context, result) costs some 30 times the indexed lookup itself
    (docs/benchmarks.md, "Issue 13, third pass"). Elsewhere they run through `reading`. Values
    come back as the driver gives them: on SQLite a DateTime is its stored text (`as_datetime`
    reads it)."""
    reader = _reader(engine) if engine.dialect.name == "sqlite" else None
    if isinstance(reader, _ThreadedReaderFactory) and reader.raw_path is not None:
        return await reader.raw(statements)
    async with reading(engine) as conn:
        if len(statements) > 1 and engine.dialect.name != "sqlite":
            # One snapshot for all of them (a SQLite reader runs each statement on its own).
            await conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"))
        return [[tuple(row) for row in (await conn.execute(text(sql), dict(params))).all()]
                for sql, params in statements]


def as_datetime(value: Any) -> datetime:
    """A DateTime column's value from `read_rows`: SQLite keeps it as text, in UTC."""
    if isinstance(value, datetime):
        return value
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


class _AsyncReader:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    def connect(self):
        return self._engine.connect()


class _ThreadedReaderFactory:
    """Synchronous SQLite connections to the same file, used on a few threads of their own.

    Through aiosqlite every step of a statement (check-out, cursor, execute, fetch, close,
    the reset on check-in) is a hop to the connection's thread and back: about 20 hops for
    two small SELECTs, 2-5 ms of CPU in all (docs/benchmarks.md, "Reads"). Here a statement
    is one hop: check-out, execute, fetch every row, check-in, on a reader thread.
    Autocommit, so a read never takes SQLite's write lock (WAL gives each statement a snapshot,
    as the aiosqlite readers had)."""

    THREADS = 4

    def __init__(self, engine: AsyncEngine) -> None:
        import concurrent.futures

        from sqlalchemy import create_engine as create_sync_engine

        url = engine.url.set(drivername="sqlite")
        sync = create_sync_engine(url, connect_args={"timeout": 60, "check_same_thread": False},
                                  pool_size=self.THREADS, max_overflow=0)

        @event.listens_for(sync, "connect")
        def _pragmas(dbapi_conn, _record):  # pragma: no cover - driver hook
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        self.engine = sync.execution_options(isolation_level="AUTOCOMMIT")
        self.executor = concurrent.futures.ThreadPoolExecutor(self.THREADS, thread_name_prefix="atelier-db-read")
        # `read_rows` on the DB-API: one sqlite3 connection per reader thread, to the same
        # file (None: a URL with options of its own, read through SQLAlchemy as the rest).
        self.raw_path = url.database if not url.query else None
        self._raw_local = threading.local()
        self._raw_connections: list[sqlite3.Connection] = []
        # Disposing the async engine (end of a process or test) closes these connections and
        # threads too; a later read (an engine may be used again) makes new ones.
        owner = engine.sync_engine

        def _disposed(_engine) -> None:
            if getattr(owner, "_atelier_reader", None) is self:
                del owner._atelier_reader
            self.engine.dispose()
            self.executor.shutdown(wait=False)
            for raw in self._raw_connections:
                raw.close()
            self._raw_connections.clear()

        event.listen(owner, "engine_disposed", _disposed)

    def connect(self) -> "_ThreadedReader":
        return _ThreadedReader(self)

    def _raw_connection(self, *, wait: bool) -> sqlite3.Connection:
        """This thread's connection: one that waits for a lock (reader threads), or one that
        never does (the event loop's: busy at once)."""
        name = "waiting" if wait else "at_once"
        conn = getattr(self._raw_local, name, None)
        if conn is None:
            # Autocommit (isolation_level None): a read takes no write lock; WAL gives snapshots.
            # `timeout` is SQLite's busy timeout: 0 answers busy at once.
            conn = sqlite3.connect(self.raw_path, timeout=60 if wait else 0, isolation_level=None,
                                   check_same_thread=False)
            setattr(self._raw_local, name, conn)
            self._raw_connections.append(conn)
        return conn

    def _raw_rows(self, statements, wait: bool = True) -> list[list[tuple]]:
        conn = self._raw_connection(wait=wait)
        if len(statements) == 1:
            sql, params = statements[0]
            return [conn.execute(sql, dict(params)).fetchall()]
        conn.execute("BEGIN")  # deferred: a read snapshot shared by the statements, no lock
        try:
            return [conn.execute(sql, dict(params)).fetchall() for sql, params in statements]
        finally:
            conn.execute("COMMIT")

    async def raw(self, statements) -> list[list[tuple]]:
        """Run on the event loop itself when SQLite answers at once, which in WAL mode a read
        nearly always does (readers never wait for writers): a few indexed lookups take tens of
        microseconds, and a hop to a reader thread and back costs the API more than ten times
        that in thread switches (docs/benchmarks.md, "Issue 13, third pass"). If the database
        is busy (a lock a read must wait for: recovery, an exclusive lock), the loop does not
        wait: the read goes to a reader thread, which does."""
        import asyncio

        statements = list(statements)
        try:
            return self._raw_rows(statements, wait=False)
        except sqlite3.OperationalError as err:
            if getattr(err, "sqlite_errorcode", None) not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._raw_rows, statements)


class _ThreadedReader:
    """What `reading()` yields on SQLite: `execute` returns a buffered Result (every row read)."""

    def __init__(self, factory: _ThreadedReaderFactory) -> None:
        self._factory = factory

    async def __aenter__(self) -> "_ThreadedReader":
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def _run(self, statement, parameters):
        with self._factory.engine.connect() as conn:
            return conn.execute(statement, parameters).freeze()

    async def execute(self, statement, parameters=None):
        import asyncio

        loop = asyncio.get_running_loop()
        frozen = await loop.run_in_executor(self._factory.executor, self._run, statement, parameters)
        return frozen()

    async def scalar(self, statement, parameters=None):
        return (await self.execute(statement, parameters)).scalar()


async def create_schema_for_tests(engine: AsyncEngine) -> None:
    """Bring a test or benchmark database to the newest schema, through the Alembic
    migrations exactly as production does (there is no create_all anywhere)."""
    import asyncio

    from atelier import migrate

    await asyncio.to_thread(migrate.upgrade, engine.url.render_as_string(hide_password=False))
