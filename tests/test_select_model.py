"""select_model: priority first, models that failed repeatedly in the last minutes last,
and only models whose provider this worker has."""

from __future__ import annotations

import pytest

from activities.models import ModelActivities
from atelier import model_health
from atelier.catalogue import ModelEntry
from atelier.db import create_engine, create_schema_for_tests
from atelier.messages import SelectModelRequest

CATALOGUE = [
    ModelEntry("primary", "gemini", 1, 4, ["photography", "fitting"]),
    ModelEntry("secondary", "gemini", 2, 8, ["photography", "fitting"]),
    ModelEntry("fitting-only", "gemini", 3, 1, ["fitting"]),
    ModelEntry("offline", "local", 0, 0, ["photography", "fitting"]),
]


@pytest.fixture
async def engine(tmp_path):
    eng = create_engine(f"sqlite+aiosqlite:///{tmp_path}/models.db")
    await create_schema_for_tests(eng)
    yield eng
    await eng.dispose()


def activities(engine, providers=frozenset({"gemini"})):
    return ModelActivities(engine, CATALOGUE, failure_threshold=3, failure_window_s=300,
                           available_providers=set(providers))


async def test_priority_order_and_exclusion(engine):
    a = activities(engine)
    assert (await a.select_model(SelectModelRequest(kind="photography"))).model == "primary"
    assert (await a.select_model(SelectModelRequest(kind="photography", exclude=["primary"]))).model == "secondary"
    left = await a.select_model(SelectModelRequest(kind="photography", exclude=["primary", "secondary"]))
    assert left.model == ""  # nothing left for photography: the workflow stops falling back
    assert (await a.select_model(SelectModelRequest(kind="fitting", exclude=["primary", "secondary"]))).model == "fitting-only"


async def test_a_model_that_failed_repeatedly_goes_last(engine):
    a = activities(engine)
    for _ in range(2):
        await model_health.record_failure(engine, "primary", "ProviderUnavailable")
    assert (await a.select_model(SelectModelRequest(kind="photography"))).model == "primary"  # 2 < threshold
    await model_health.record_failure(engine, "primary", "ProviderUnavailable")
    assert (await a.select_model(SelectModelRequest(kind="photography"))).model == "secondary"
    # Unhealthy is not gone: when it is all that is left, it is still tried.
    assert (await a.select_model(SelectModelRequest(kind="photography", exclude=["secondary"]))).model == "primary"


async def test_only_models_of_configured_providers(engine):
    local_only = activities(engine, providers={"local"})
    assert (await local_only.select_model(SelectModelRequest(kind="photography"))).model == "offline"
    both = activities(engine, providers={"local", "gemini"})
    choice = await both.select_model(SelectModelRequest(kind="photography"))
    assert (choice.model, choice.provider) == ("offline", "local")


async def test_the_choice_carries_the_declared_quota_and_whether_calls_queue(engine):
    catalogue = [ModelEntry("quota", "gemini", 1, 1, ["photography"], max_concurrent=4, per_minute=30),
                 ModelEntry("free", "gemini", 2, 1, ["photography"]),
                 ModelEntry("local-quota", "local", 3, 0, ["photography"], max_concurrent=2),
                 ModelEntry("local", "local", 4, 0, ["photography"])]
    a = ModelActivities(engine, catalogue, failure_threshold=3, failure_window_s=300,
                        available_providers={"gemini", "local"})
    choices = []
    for exclude in ([], ["quota"], ["quota", "free"], ["quota", "free", "local-quota"]):
        choices.append(await a.select_model(SelectModelRequest(kind="photography", exclude=exclude)))
    assert [(c.model, c.max_concurrent, c.per_minute, c.admission) for c in choices] == [
        ("quota", 4, 30, True), ("free", None, None, True),  # undeclared: learned from crowds of 429s
        ("local-quota", 2, None, True), ("local", None, None, False)]
