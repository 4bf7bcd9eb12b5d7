"""Settings are read once, typed and validated: a wrong value stops the process with a
message naming the variable; an empty environment gives defaults that work on one machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from atelier import settings_doc
from atelier.settings import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
LOAD = "from atelier.settings import load_settings; load_settings(); print('loaded')"


def _env(**values: str) -> dict[str, str]:
    """The test process's environment without any setting of ours, plus `values`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATELIER_", "GEMINI_"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(values)
    return env


def _load_in_subprocess(tmp_path: Path, **values: str) -> subprocess.CompletedProcess:
    # Another working directory: nothing there (no .env) may change the outcome.
    return subprocess.run([sys.executable, "-c", LOAD], cwd=tmp_path, env=_env(**values),
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def empty_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("ATELIER_", "GEMINI_")):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ATELIER_API_PORT", "abc"),
        ("ATELIER_API_PORT", "70000"),
        ("ATELIER_AI_PROVIDER", "openai"),
        ("ATELIER_DATABASE_POOL_SIZE", "0"),
        ("ATELIER_BLOB_FSYNC", "perhaps"),
        ("ATELIER_AI_TIMEOUT_S", "-5"),
    ],
)
def test_a_wrong_value_stops_the_process_naming_the_variable(tmp_path, variable, value):
    run = _load_in_subprocess(tmp_path, **{variable: value})
    assert run.returncode != 0
    assert "loaded" not in run.stdout
    assert variable in run.stderr
    assert "Traceback" not in run.stderr  # a message for a person, not a stack


def test_every_wrong_value_is_named_at_once(tmp_path):
    run = _load_in_subprocess(tmp_path, ATELIER_API_PORT="abc", ATELIER_AI_PROVIDER="openai")
    assert run.returncode != 0
    assert "ATELIER_API_PORT" in run.stderr and "ATELIER_AI_PROVIDER" in run.stderr


def test_a_secret_is_never_echoed_in_the_error(tmp_path):
    secret = "sk-this-must-not-appear-123"
    run = _load_in_subprocess(tmp_path, ATELIER_API_PORT="abc", GEMINI_API_KEY=secret, ATELIER_ADMIN_TOKEN=secret)
    assert run.returncode != 0
    assert secret not in run.stderr + run.stdout


def test_an_empty_environment_loads_in_a_subprocess(tmp_path):
    run = _load_in_subprocess(tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "loaded"


def test_defaults_work_on_one_machine(empty_env):
    s = load_settings()
    assert s.database_url.startswith("sqlite+aiosqlite:///")
    assert s.temporal_address == "127.0.0.1:7233"
    assert s.api_port == 8000
    assert s.provider == "local"  # no key: the labelled local compositor, never a silent network call
    assert s.gemini_api_key is None and s.admin_token is None


def test_every_setting_has_a_default(empty_env):
    required = [name for name, field in Settings.model_fields.items() if field.is_required()]
    assert required == []


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://app:pw@db:5432/atelier", "postgresql+asyncpg://app:pw@db:5432/atelier"),
        ("postgres://app:pw@db/atelier", "postgresql+asyncpg://app:pw@db/atelier"),
        ("postgresql+asyncpg://app@db/atelier", "postgresql+asyncpg://app@db/atelier"),
        ("sqlite:///var/x.db", "sqlite+aiosqlite:///var/x.db"),
    ],
)
def test_database_urls_get_the_async_driver(empty_env, monkeypatch, given, expected):
    monkeypatch.setenv("ATELIER_DATABASE_URL", given)
    assert load_settings().database_url == expected


def test_the_gemini_key_is_read_from_its_usual_name(empty_env, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", "k-123")
    s = load_settings()
    assert s.gemini_api_key.get_secret_value() == "k-123"
    assert s.provider == "gemini"
    assert "k-123" not in repr(s)


def test_the_settings_table_lists_every_variable():
    table = settings_doc.render_table()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) == len(Settings.model_fields)
    for variable in settings_doc.all_env_names():
        assert f"`{variable}`" in table
    assert "| `ATELIER_API_PORT` | int (≥ 1, ≤ 65535) | `8000` |" in table
    assert "`GEMINI_API_KEY` or `ATELIER_GEMINI_API_KEY` | secret, optional | (none) |" in table


def test_every_setting_is_described_and_the_readme_table_is_current():
    from pathlib import Path

    assert all(field.description for field in Settings.model_fields.values())
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    begin, end = "<!-- settings:begin -->\n", "<!-- settings:end -->"
    table = readme[readme.index(begin) + len(begin):readme.index(end)]
    assert table == settings_doc.render_table(), "regenerate it: python -m atelier.settings_doc"
