"""The schema comes from Alembic migrations, and they build exactly `atelier.db.metadata`:
on a fresh SQLite file and on a fresh PostgreSQL database (skipped when none answers)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, insert, select, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from atelier import migrate
from atelier.db import metadata, users
from tests.postgres_db import create_database, drop_database, requires_postgres

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=requires_postgres)])
async def fresh_url(request, tmp_path):
    if request.param == "sqlite":
        # A folder that does not exist yet: the migration must create it, as `make run` needs.
        yield f"sqlite+aiosqlite:///{tmp_path}/var/atelier.db"
        return
    url = await create_database("atelier_migr")
    try:
        yield url
    finally:
        await drop_database(url)


async def _on_sync_connection(url: str, fn):
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(fn)
    finally:
        await engine.dispose()


def _diff(sync_conn) -> list:
    ctx = MigrationContext.configure(
        sync_conn, opts={"compare_type": True, "compare_server_default": migrate.compare_server_default}
    )
    return compare_metadata(ctx, metadata)


def _snapshot(sync_conn) -> dict:
    insp = inspect(sync_conn)
    return {
        table: (
            [(c["name"], str(c["type"]), c["nullable"]) for c in insp.get_columns(table)],
            sorted(i["name"] for i in insp.get_indexes(table)),
            sorted(str(u["name"]) for u in insp.get_unique_constraints(table)),
            sorted(str(f["name"]) for f in insp.get_foreign_keys(table)),
        )
        for table in sorted(insp.get_table_names())
    }


def test_scripts_are_found_from_the_package_not_the_working_directory():
    location = migrate.script_location()
    assert location.is_absolute()
    assert location == REPO / "migrations"
    revisions = {line.split('"')[1] for path in (location / "versions").glob("*.py")
                 for line in path.read_text().splitlines() if line.startswith("revision: str = ")}
    assert "0001" in revisions and migrate.head() in revisions


async def test_upgrade_builds_exactly_the_metadata(fresh_url):
    assert migrate.current(fresh_url) is None
    migrate.upgrade(fresh_url)
    assert migrate.current(fresh_url) == migrate.head()
    assert await _on_sync_connection(fresh_url, _diff) == []
    tables = set((await _on_sync_connection(fresh_url, _snapshot)).keys())
    assert tables == set(metadata.tables) | {"alembic_version"}


async def test_upgrade_twice_is_a_noop(fresh_url):
    migrate.upgrade(fresh_url)
    before = await _on_sync_connection(fresh_url, _snapshot)
    engine = create_async_engine(fresh_url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            await conn.execute(insert(users).values(id="u-keep", balance=7, created_at=datetime.now(timezone.utc)))
        migrate.upgrade(fresh_url)
        async with engine.connect() as conn:
            kept = (await conn.execute(select(users.c.balance).where(users.c.id == "u-keep"))).scalar_one()
            versions = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalars().all()
    finally:
        await engine.dispose()
    assert kept == 7
    assert versions == [migrate.head()]
    assert await _on_sync_connection(fresh_url, _snapshot) == before


async def test_the_comparison_would_see_a_drifted_schema(fresh_url):
    """The empty diff above means something: drop an index and the comparison reports it."""
    migrate.upgrade(fresh_url)
    engine = create_async_engine(fresh_url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("DROP INDEX ix_works_user_created"))
    finally:
        await engine.dispose()
    diff = await _on_sync_connection(fresh_url, _diff)
    assert [(op[0], op[1].name) for op in diff] == [("add_index", "ix_works_user_created")]


async def test_downgrade_to_base_and_up_again(fresh_url):
    migrate.upgrade(fresh_url)
    migrate.downgrade(fresh_url, "base")
    assert migrate.current(fresh_url) is None
    assert set((await _on_sync_connection(fresh_url, _snapshot)).keys()) == {"alembic_version"}
    migrate.upgrade(fresh_url)
    assert await _on_sync_connection(fresh_url, _diff) == []


def test_upgrade_from_plain_sync_code(tmp_path):
    """No event loop runs here: the CLI's situation."""
    url = f"sqlite+aiosqlite:///{tmp_path}/plain.db"
    migrate.upgrade(url)
    migrate.upgrade(url)
    assert migrate.current(url) == migrate.head()


@requires_postgres
async def test_two_migrators_at_once_take_turns(tmp_path):
    """Several migrate jobs started together (separate processes, as replicas are): all
    succeed and the schema is built once; the advisory lock in env.py makes them take turns."""
    url = await create_database("atelier_migr")
    try:
        procs = [
            subprocess.Popen([sys.executable, "-m", "atelier.migrate", "upgrade", "--url", url], cwd=tmp_path,
                             env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(3)
        ]
        outcomes = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
        for p in procs:
            p.stdout.close()
            p.stderr.close()
        assert [code for code, _ in outcomes] == [0, 0, 0], [err for _, err in outcomes]
        assert sum("Running upgrade  -> 0001" in err for _, err in outcomes) == 1
        assert migrate.current(url) == migrate.head()
        assert await _on_sync_connection(url, _diff) == []
    finally:
        await drop_database(url)


def test_migrations_in_one_process_take_turns(tmp_path):
    """Alembic's context is global to a process: threads calling upgrade() must not mix."""
    urls = [f"sqlite+aiosqlite:///{tmp_path}/t{i}.db" for i in range(3)]
    errors: list[BaseException] = []

    def run(url: str) -> None:
        try:
            migrate.upgrade(url)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(u,)) for u in urls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert [migrate.current(u) for u in urls] == [migrate.head()] * 3


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATELIER_", "GEMINI_"))}
    env.update(extra)
    return env


def test_cli_upgrade_from_another_directory(tmp_path):
    db = tmp_path / "cli" / "atelier.db"
    env = _clean_env(ATELIER_DATABASE_URL=f"sqlite:///{db}")  # the plain form: normalised by the settings
    run = subprocess.run([sys.executable, "-m", "atelier.migrate", "upgrade"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"at revision {migrate.head()}" in run.stdout
    cur = subprocess.run([sys.executable, "-m", "atelier.migrate", "current"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert cur.stdout.strip() == migrate.head()


def test_alembic_ini_works_from_another_directory(tmp_path):
    """Developers' `alembic` command: the ini finds the scripts by its own location and the
    URL comes from the settings."""
    env = _clean_env(ATELIER_DATABASE_URL=f"sqlite:///{tmp_path}/dev.db")
    alembic = [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini")]
    up = subprocess.run(alembic + ["upgrade", "head"], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=120)
    assert up.returncode == 0, up.stderr
    check = subprocess.run(alembic + ["check"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No new upgrade operations detected" in check.stdout + check.stderr


def test_a_bad_setting_stops_the_cli_before_touching_a_database(tmp_path):
    env = _clean_env(ATELIER_DATABASE_URL=f"sqlite:///{tmp_path}/never.db", ATELIER_API_PORT="abc")
    run = subprocess.run([sys.executable, "-m", "atelier.migrate", "upgrade"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "ATELIER_API_PORT" in run.stderr
    assert not (tmp_path / "never.db").exists()
