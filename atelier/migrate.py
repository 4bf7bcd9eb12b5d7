"""Database migrations: the only way the product's schema is created or changed.

    python -m atelier.migrate upgrade            # to the newest revision, URL from settings
    python -m atelier.migrate upgrade --url URL  # another database
    python -m atelier.migrate current            # the revision the database is at

`atelier db upgrade` calls `upgrade(settings.database_url)`. The Alembic scripts are found
next to this package (a checkout or an editable install) or under `<prefix>/share/atelier`
(the Docker image), never relative to the working directory.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import re
import sys
import threading
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

_CANDIDATES = (
    Path(__file__).resolve().parent.parent / "migrations",  # source checkout, editable install
    Path(sys.prefix) / "share" / "atelier" / "migrations",  # installed image (see Dockerfile)
)


def script_location() -> Path:
    for candidate in _CANDIDATES:
        if (candidate / "env.py").is_file():
            return candidate
    raise RuntimeError("migrations not found; looked in " + ", ".join(str(c) for c in _CANDIDATES))


def alembic_config(database_url: str) -> Config:
    """A Config built in code: no alembic.ini needed, and the URL never goes through ini
    interpolation (a '%' in a password would break it)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    cfg.attributes["database_url"] = database_url
    return cfg


def _bare_default(sql: str) -> str:
    sql = sql.strip()
    while sql.startswith("(") and sql.endswith(")"):
        sql = sql[1:-1].strip()
    sql = re.sub(r"::[a-z ]+$", "", sql)  # PostgreSQL reports '0'::bigint
    if len(sql) >= 2 and sql[0] == sql[-1] == "'":
        sql = sql[1:-1].replace("''", "'")
    return sql


def compare_server_default(_context, _inspected_column, _metadata_column, inspected_default,
                           _metadata_default, rendered_metadata_default):
    """Autogenerate's server-default comparison without false alarms: the database reports
    SQL (SQLite: ('') for '', PostgreSQL: '0'::bigint), the metadata a bare value.
    True means the defaults differ; None lets Alembic decide."""
    if inspected_default is None or rendered_metadata_default is None:
        return None
    return _bare_default(inspected_default) != _bare_default(rendered_metadata_default)


def head() -> str | None:
    return ScriptDirectory.from_config(alembic_config("")).get_current_head()


def _outside_event_loop(fn, *args):
    """Alembic's env.py runs its own event loop for async drivers; inside a running loop
    (an async test, an async CLI) do the work on a thread that has none."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn(*args)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn, *args).result()


# Alembic's `context` is one global per process: two migrations in one process take turns.
_one_at_a_time = threading.Lock()


def _locked(fn, *args):
    with _one_at_a_time:
        return fn(*args)


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the database to `revision`. Running it again is a no-op."""
    _outside_event_loop(_locked, command.upgrade, alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    _outside_event_loop(_locked, command.downgrade, alembic_config(database_url), revision)


def _read_revision(sync_conn) -> str | None:
    return MigrationContext.configure(sync_conn).get_current_revision()


def _current(database_url: str) -> str | None:
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        if not Path(url.database).exists():
            return None  # never migrated; do not create the file just to look
    if not url.get_dialect().is_async:
        engine = create_sync_engine(url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                return _read_revision(conn)
        finally:
            engine.dispose()

    async def read() -> str | None:
        engine = create_async_engine(url, poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(_read_revision)
        finally:
            await engine.dispose()

    return asyncio.run(read())


def current(database_url: str) -> str | None:
    """The revision the database is at, or None when it has never been migrated."""
    return _outside_event_loop(_current, database_url)


def _safe(database_url: str) -> str:
    return make_url(database_url).render_as_string(hide_password=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m atelier.migrate", description="Atelier database migrations.")
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("upgrade", help="migrate the database to a revision (default: head)")
    up.add_argument("revision", nargs="?", default="head")
    cur = sub.add_parser("current", help="print the revision the database is at")
    sub.add_parser("head", help="print the newest revision")
    for p in (up, cur):
        p.add_argument("--url", help="database URL (default: ATELIER_DATABASE_URL from the settings)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.action == "head":
        print(head())
        return 0
    from atelier.settings import load_settings

    # The settings also normalise a pasted URL (postgresql:// -> postgresql+asyncpg://).
    url = load_settings(**({"database_url": args.url} if args.url else {})).database_url
    if args.action == "upgrade":
        upgrade(url, args.revision)
        print(f"database {_safe(url)} is at revision {current(url)}")
    else:
        print(current(url) or "(none)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
