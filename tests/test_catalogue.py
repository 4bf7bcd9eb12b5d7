"""The model catalogue: defaults, the models file and its errors, and ranking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atelier.catalogue import CatalogueError, ModelEntry, load_catalogue, rank
from atelier.settings import Settings

EXAMPLE = Path(__file__).resolve().parent.parent / "models.example.json"


def _names(entries: list[ModelEntry]) -> list[str]:
    return [e.name for e in entries]


def test_default_catalogues():
    gemini = load_catalogue(Settings(ai_provider="gemini"))
    assert [(e.name, e.provider, e.priority) for e in gemini] == [
        ("gemini-2.5-flash-image", "gemini", 1), ("gemini-3-pro-image-preview", "gemini", 2)]
    local = load_catalogue(Settings(ai_provider="local"))
    assert [(e.name, e.provider, e.priority) for e in local] == [
        ("local-studio", "local", 1), ("local-studio-backup", "local", 2)]
    assert all(set(e.kinds) == {"photography", "fitting"} for e in gemini + local)


def test_example_file_loads():
    entries = load_catalogue(Settings(ai_provider="local", model_catalogue=EXAMPLE))
    assert _names(rank(entries, "fitting", set(), set())) == ["gemini-2.5-flash-image", "gemini-3-pro-image-preview"]


ENTRIES = [
    ModelEntry("pricey", "gemini", priority=1, cost=9, kinds=["photography", "fitting"]),
    ModelEntry("cheap", "gemini", priority=1, cost=2, kinds=["photography", "fitting"]),
    ModelEntry("second", "gemini", priority=2, cost=0, kinds=["photography"]),
    ModelEntry("fitting-only", "local", priority=0, cost=0, kinds=["fitting"]),
]


def test_rank_by_priority_then_cost_for_the_kind():
    assert _names(rank(ENTRIES, "photography", set(), set())) == ["cheap", "pricey", "second"]
    assert _names(rank(ENTRIES, "fitting", set(), set())) == ["fitting-only", "cheap", "pricey"]


def test_rank_drops_excluded():
    assert _names(rank(ENTRIES, "photography", {"cheap", "second"}, set())) == ["pricey"]
    assert rank(ENTRIES, "photography", {"cheap", "pricey", "second"}, set()) == []


def test_rank_puts_unhealthy_last_but_keeps_them():
    assert _names(rank(ENTRIES, "photography", set(), {"cheap"})) == ["pricey", "second", "cheap"]
    everyone = {"cheap", "pricey", "second"}
    assert _names(rank(ENTRIES, "photography", set(), everyone)) == ["cheap", "pricey", "second"]
    assert _names(rank(ENTRIES, "photography", {"pricey"}, {"cheap"})) == ["second", "cheap"]


def _write(tmp_path: Path, content) -> Path:
    path = tmp_path / "models.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


GOOD = {"name": "m", "provider": "gemini", "priority": 1, "cost": 1, "kinds": ["photography"]}


@pytest.mark.parametrize("content, expected", [
    ("{not json", "not valid JSON"),
    ({"models": []}, "at least one entry"),
    ({"models": [GOOD, {**GOOD, "name": "n", "priority": "high"}]}, "entry 2 ('n'): 'priority'"),
    ({"models": [{**GOOD, "priority": True}]}, "entry 1 ('m'): 'priority'"),
    ({"models": [{**GOOD, "cost": -1}]}, "entry 1 ('m'): 'cost'"),
    ({"models": [{**GOOD, "provider": "openai"}]}, "entry 1 ('m'): 'provider'"),
    ({"models": [{**GOOD, "kinds": ["painting"]}]}, "entry 1 ('m'): 'kinds'"),
    ({"models": [{**GOOD, "name": ""}]}, "entry 1: 'name'"),
    ({"models": [GOOD, GOOD]}, "entry 2 ('m'): duplicate"),
    ({"models": [{**GOOD, "weight": 3}]}, "unknown field(s) weight"),
    ({"models": ["m"]}, "entry 1: must be an object"),
])
def test_bad_file_names_the_file_and_the_entry(tmp_path, content, expected):
    path = _write(tmp_path, content)
    with pytest.raises(CatalogueError) as caught:
        load_catalogue(Settings(model_catalogue=path))
    assert str(path) in str(caught.value) and expected in str(caught.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CatalogueError, match="cannot be read"):
        load_catalogue(Settings(model_catalogue=tmp_path / "absent.json"))


def test_kinds_default_to_both(tmp_path):
    path = _write(tmp_path, [{"name": "m", "provider": "local", "priority": 3, "cost": 0}])
    [entry] = load_catalogue(Settings(model_catalogue=path))
    assert entry == ModelEntry("m", "local", 3, 0, ["photography", "fitting"])


def test_quota_fields_are_optional_and_loaded(tmp_path):
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": [
        {"name": "a", "provider": "gemini", "priority": 1, "cost": 1, "max_concurrent": 4, "per_minute": 60},
        {"name": "b", "provider": "gemini", "priority": 2, "cost": 1},
    ]}))
    a, b = load_catalogue(Settings(ai_provider="local", model_catalogue=path))
    assert (a.max_concurrent, a.per_minute) == (4, 60)
    assert (b.max_concurrent, b.per_minute) == (None, None)
    example = load_catalogue(Settings(ai_provider="local", model_catalogue=EXAMPLE))
    assert example[0].max_concurrent == 10 and example[0].per_minute == 100


@pytest.mark.parametrize("field,value", [("max_concurrent", 0), ("max_concurrent", -2), ("per_minute", "10"),
                                         ("per_minute", 1.5), ("max_concurrent", True),
                                         ("per_minute", 10**9)])
def test_a_bad_quota_is_refused_naming_file_entry_and_field(tmp_path, field, value):
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": [
        {"name": "ok", "provider": "gemini", "priority": 1, "cost": 1},
        {"name": "quota-model", "provider": "gemini", "priority": 1, "cost": 1, field: value},
    ]}))
    with pytest.raises(CatalogueError) as err:
        load_catalogue(Settings(ai_provider="local", model_catalogue=path))
    message = str(err.value)
    assert str(path) in message and "entry 2" in message and "'quota-model'" in message and repr(field) in message
