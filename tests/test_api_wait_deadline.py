"""`Prefer: wait=N`, per-request deadlines (`deadline_s`, `Cancel-After`) and `webhook_events`,
through the real API, worker and dev server."""

from __future__ import annotations

import json
import time

import pytest

from workflows import generation

from tests.api_fixtures import Api, api  # noqa: F401 - fixture
from tests.fakes.images import jpeg


async def _body(api: Api, auth: dict, **extra) -> dict:
    return {"kind": "photography", "images": [{"file_id": await api.upload(auth, jpeg(120, 90))}], **extra}


async def _input(api: Api, task_id: str) -> dict:
    """The GenerationRequest the workflow was started with, from its history."""
    history = await api.harness.client.get_workflow_handle(task_id).fetch_history()
    started = history.events[0].workflow_execution_started_event_attributes
    return json.loads(started.input.payloads[0].data)


async def test_prefer_wait_answers_200_with_the_finished_generation(api: Api):
    _, auth = await api.new_user()
    async with api.harness.worker():
        answer = await api.http.post("/v1/generations", headers={**auth, "Prefer": "wait=30"},
                                     json=await _body(api, auth))
    assert answer.status_code == 200, answer.text
    assert answer.headers["preference-applied"] == "wait=30"
    body = answer.json()
    assert body["status"] == "completed" and body["result"]["images"] and body["credits"]["charged"] == 10
    assert answer.headers["location"].endswith(f"/v1/generations/{body['id']}")
    # The same object GET answers.
    again = (await api.http.get(f"/v1/generations/{body['id']}", headers=auth)).json()
    assert {k: v for k, v in again.items() if k != "result"} == {k: v for k, v in body.items() if k != "result"}


async def test_prefer_wait_answers_202_when_the_generation_outlasts_the_wait(api: Api):
    _, auth = await api.new_user()
    began = time.monotonic()
    # No worker: it cannot end.
    answer = await api.http.post("/v1/generations", headers={**auth, "Prefer": "respond-async, wait=1"},
                                 json=await _body(api, auth))
    waited = time.monotonic() - began
    assert answer.status_code == 202, answer.text
    assert answer.json()["status"] == "queued" and answer.headers["preference-applied"] == "wait=1"
    assert waited >= 1.0
    # Without the preference nothing waits and nothing says it applied.
    plain = await api.http.post("/v1/generations", headers=auth, json=await _body(api, auth))
    assert plain.status_code == 202 and "preference-applied" not in plain.headers


async def test_a_longer_wait_is_capped_at_60_seconds_and_nonsense_is_ignored(api: Api):
    _, auth = await api.new_user()
    async with api.harness.worker():
        capped = await api.http.post("/v1/generations", headers={**auth, "Prefer": "wait=3600"},
                                     json=await _body(api, auth))
        assert capped.status_code == 200 and capped.headers["preference-applied"] == "wait=60"
        ignored = await api.http.post("/v1/generations", headers={**auth, "Prefer": "wait=soon"},
                                      json=await _body(api, auth))
        assert ignored.status_code == 202 and "preference-applied" not in ignored.headers
        await api.poll(auth, ignored.json()["id"])


async def test_an_idempotent_replay_of_a_finished_generation_returns_the_finished_object(api: Api):
    _, auth = await api.new_user()
    body = await _body(api, auth)
    headers = {**auth, "Idempotency-Key": "order-wait-1"}
    async with api.harness.worker():
        first = await api.http.post("/v1/generations", headers=headers, json=body)
        assert first.status_code == 202
        done = await api.poll(auth, first.json()["id"])
    replay = await api.http.post("/v1/generations", headers=headers, json=body)
    assert replay.status_code == 200, replay.text
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["id"] == done["id"] and replay.json()["status"] == "completed"
    assert replay.json()["result"]["work_id"] == done["result"]["work_id"]
    assert await api.harness.ledger(done["id"]) == (10, 0)  # charged once


@pytest.mark.parametrize(("body_deadline", "header", "expected"), [
    (None, None, "server"),
    (120, None, 120.0),
    (None, "90s", 90.0),
    (None, "5m", 300.0),
    (None, "1h30m", "server"),  # above the server's maximum: the server's
    (None, "45", 45.0),
    (200, "2m", 120.0),  # both: the smaller
])
async def test_the_deadline_travels_in_the_request_bounded_by_the_server(api: Api, body_deadline, header, expected):
    _, auth = await api.new_user()
    api.harness.settings.generation_deadline_s = 600.0
    extra = {"deadline_s": body_deadline} if body_deadline is not None else {}
    headers = {**auth, "Cancel-After": header} if header else auth
    answer = await api.http.post("/v1/generations", headers=headers, json=await _body(api, auth, **extra))
    assert answer.status_code == 202, answer.text
    started = await _input(api, answer.json()["id"])
    assert started["timeouts"]["deadline_s"] == (600.0 if expected == "server" else expected)
    await api.harness.client.get_workflow_handle(answer.json()["id"]).terminate("test over")


@pytest.mark.parametrize("header", ["soon", "5x", "-5s", "0", "1.5m", "10 s", "9" * 40])
async def test_a_malformed_cancel_after_is_refused_with_a_clear_message(api: Api, header):
    _, auth = await api.new_user()
    answer = await api.http.post("/v1/generations", headers={**auth, "Cancel-After": header},
                                 json=await _body(api, auth))
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["code"] == "InvalidRequest" and "Cancel-After" in error["message"]


@pytest.mark.parametrize("deadline", [0, -1, 0.5, 10**9, "soon"])
async def test_a_bad_body_deadline_is_refused(api: Api, deadline):
    _, auth = await api.new_user()
    answer = await api.http.post("/v1/generations", headers=auth, json=await _body(api, auth, deadline_s=deadline))
    assert answer.status_code == 422 and "deadline_s" in answer.json()["error"]["message"]


@pytest.mark.skipif(not hasattr(generation, "PATCH_EXPLICIT_DEADLINE"),
                    reason="the workflow's named deadline (ExpiredBeforeStart / DeadlineExceeded) is not on main yet")
async def test_a_deadline_reached_fails_the_generation_and_refunds_every_credit(api: Api):
    _, auth = await api.new_user()
    async with api.harness.worker(only="main"):  # no AI worker: the AI call never starts
        answer = await api.http.post("/v1/generations", headers={**auth, "Cancel-After": "3s"},
                                     json=await _body(api, auth))
        assert answer.status_code == 202, answer.text
        done = await api.poll(auth, answer.json()["id"], timeout=60)
    assert done["status"] == "failed", done
    assert done["error"]["code"] in ("ExpiredBeforeStart", "DeadlineExceeded")
    assert done["error"]["refunded"] is True
    assert done["credits"] == {"charged": 10, "refunded": 10}
    assert await api.harness.ledger(done["id"]) == (10, 10)


async def test_webhook_events_are_validated_and_passed_to_the_workflow(api: Api):
    _, auth = await api.new_user()
    default = await api.http.post("/v1/generations", headers=auth, json=await _body(api, auth))
    chosen = await api.http.post("/v1/generations", headers=auth, json=await _body(
        api, auth, webhook_events=["started", "progress", "started"]))
    assert default.status_code == chosen.status_code == 202, chosen.text
    assert (await _input(api, default.json()["id"]))["webhook_events"] == ["completed"]
    assert (await _input(api, chosen.json()["id"]))["webhook_events"] == ["started", "progress"]
    for bad in (["finished"], [], ["completed"] * 4, "completed"):
        refused = await api.http.post("/v1/generations", headers=auth, json=await _body(api, auth, webhook_events=bad))
        assert refused.status_code == 422, (bad, refused.text)
        assert "webhook_events" in refused.json()["error"]["message"]
    for task_id in (default.json()["id"], chosen.json()["id"]):
        await api.harness.client.get_workflow_handle(task_id).terminate("test over")
