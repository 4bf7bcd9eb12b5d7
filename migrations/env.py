"""Alembic environment for Atelier.

The database URL comes from, in order: `config.attributes["database_url"]` (set by
`atelier.migrate`), `-x database_url=...` on the alembic command line, then the settings
(`ATELIER_DATABASE_URL`). Async drivers (aiosqlite, asyncpg) run through Alembic's
`run_async` pattern; SQLite uses batch mode so that ALTERs become table copies.
"""

from __future__ import annotations

import asyncio
import logging.config

from alembic import context
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import create_async_engine

from atelier.db import metadata
from atelier.migrate import compare_server_default

config = context.config
target_metadata = metadata

# A fixed key: two migrators started at once (several replicas, a retried job) take turns.
_PG_LOCK_KEY = 0x61746C72  # "atlr"

if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)


def _database_url() -> str:
    url = config.attributes.get("database_url") or context.get_x_argument(as_dictionary=True).get("database_url")
    if url:
        return url
    from atelier.settings import load_settings

    return load_settings().database_url


def _configure(connection: Connection | None = None, url: str | None = None) -> None:
    dialect = connection.dialect.name if connection is not None else make_url(url).get_backend_name()
    context.configure(
        connection=connection,
        url=url,
        target_metadata=target_metadata,
        render_as_batch=dialect == "sqlite",
        compare_type=True,
        compare_server_default=compare_server_default,
        literal_binds=connection is None,
        dialect_opts={"paramstyle": "named"} if connection is None else {},
    )


def run_migrations_offline() -> None:
    """`alembic upgrade head --sql`: print the SQL instead of running it."""
    _configure(url=_database_url())
    with context.begin_transaction():
        context.run_migrations()


def _run_on(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        context.run_migrations()


def _engine_for(url: str):
    """The project's own engine factory: SQLite gets the same pragmas and BEGIN IMMEDIATE
    (so the DDL is one transaction), and the folder of a SQLite file is created."""
    from atelier.db import create_engine

    if make_url(url).get_backend_name() == "sqlite":
        return create_engine(url)
    return create_async_engine(url, poolclass=pool.NullPool)


async def _run_async(url: str) -> None:
    engine = _engine_for(url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_on)
            await connection.commit()
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # a caller lent us an open connection (tests, embedding)
        _run_on(connection)
        return
    url = _database_url()
    if make_url(url).get_dialect().is_async:
        asyncio.run(_run_async(url))
        return
    from sqlalchemy import create_engine

    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.begin() as connection:
            _run_on(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
