"""Reading, listing and cancelling generations through the API, with and without a worker."""

from __future__ import annotations

import time

from tests.api_fixtures import Api, api, api_factory, ledger_entries, wait_until  # noqa: F401
from tests.fakes.images import jpeg


async def _start(api: Api, auth, kind: str = "photography", **extra) -> str:
    photo = await api.upload(auth, jpeg(100, 80))
    images = [{"file_id": photo}] * (2 if kind == "fitting" else 1)
    response = await api.http.post("/v1/generations", headers=auth, json={"kind": kind, "images": images, **extra})
    assert response.status_code == 202, response.text
    return response.json()["id"]


async def test_read_is_right_with_no_worker_then_after_the_worker_is_gone(api: Api):
    _, auth = await api.new_user()
    task_id = await _start(api, auth)

    # No worker has ever polled this queue: describe answers, without waiting on a query.
    began = time.monotonic()
    waiting = await api.http.get(f"/v1/generations/{task_id}", headers=auth)
    assert time.monotonic() - began < 1.5
    assert waiting.status_code == 200
    body = waiting.json()
    assert body["id"] == task_id and body["kind"] == "photography"
    assert body["status"] in ("queued", "running") and body["stage"] == "queued"
    assert body["credits"] == {"charged": 0, "refunded": 0} and body["result"] is None

    async with api.harness.worker():
        done = await api.poll(auth, task_id, timeout=60)
    assert done["status"] == "completed"

    # The worker is stopped: the closed generation is read from history.
    after = await api.http.get(f"/v1/generations/{task_id}", headers=auth)
    assert after.status_code == 200
    closed = after.json()
    assert closed["status"] == "completed" and closed["stage"] == "done" and closed["progress"] == 100
    assert closed["credits"] == {"charged": 10, "refunded": 0}
    assert closed["result"]["work_id"] == done["result"]["work_id"]
    assert closed["result"]["images"] == done["result"]["images"]
    assert closed["completed_at"] and closed["created_at"]


async def test_cancel_refunds_and_a_second_cancel_is_409(api_factory):
    # A slow AI call that heartbeats every second, so the cancellation reaches it at once.
    api = await api_factory(local_ai_delay_s=60, ai_heartbeat_s=3)
    _, auth = await api.new_user(credits_=50)
    async with api.harness.worker():
        task_id = await _start(api, auth)
        await api.poll(auth, task_id, until={"running"}, timeout=30)
        await wait_until(lambda: _stage_is(api, auth, task_id, "generating"), timeout=30)

        canceled = await api.http.post(f"/v1/generations/{task_id}/cancel", headers=auth)
        assert canceled.status_code == 202, canceled.text
        assert canceled.json()["id"] == task_id

        final = await api.poll(auth, task_id, timeout=30)
    assert final["status"] == "canceled"
    assert final["credits"] == {"charged": 10, "refunded": 10}

    entries = await ledger_entries(api, auth)
    mine = sorted((e["entry"], e["amount"]) for e in entries if e["generation_id"] == task_id)
    assert mine == [("charge", -10), ("refund", 10)]
    assert (await api.http.get("/v1/credits", headers=auth)).json()["balance"] == 50

    again = await api.http.post(f"/v1/generations/{task_id}/cancel", headers=auth)
    assert again.status_code == 409
    assert again.json()["error"]["status"] == "canceled"
    assert "canceled" in again.json()["error"]["message"]


async def _stage_is(api: Api, auth, task_id: str, stage: str) -> bool:
    return (await api.http.get(f"/v1/generations/{task_id}", headers=auth)).json()["stage"] == stage


async def test_cancelling_a_completed_generation_is_409(api: Api):
    _, auth = await api.new_user()
    async with api.harness.worker():
        task_id = await _start(api, auth)
        await api.poll(auth, task_id)
    response = await api.http.post(f"/v1/generations/{task_id}/cancel", headers=auth)
    assert response.status_code == 409
    assert response.json()["error"] == {
        "code": "AlreadyClosed", "status": "completed",
        "message": f"generation {task_id} is already completed; it cannot be canceled",
    }


async def test_list_filters_and_pages(api: Api):
    _, auth = await api.new_user(credits_=100)
    async with api.harness.worker():
        photo = await _start(api, auth, "photography")
        await api.poll(auth, photo)
    fitting = await _start(api, auth, "fitting")  # no worker now: it stays queued
    other_photo = await _start(api, auth, "photography")

    async def listed(query: str = "") -> list[str]:
        response = await api.http.get(f"/v1/generations{query}", headers=auth)
        assert response.status_code == 200, response.text
        return [g["id"] for g in response.json()["items"]]

    await wait_until(lambda: _has(listed, "", 3), timeout=15)
    await wait_until(lambda: _has(listed, "?status=completed", 1), timeout=15)
    assert set(await listed()) == {photo, fitting, other_photo}
    assert await listed("?kind=fitting") == [fitting]
    assert set(await listed("?kind=photography")) == {photo, other_photo}
    assert await listed("?status=completed") == [photo]
    assert await listed("?status=completed&kind=fitting") == []
    assert set(await listed("?status=queued")) == {fitting, other_photo}

    # One at a time, with the cursor, until the end: each exactly once.
    seen, cursor = [], None
    for _ in range(5):
        response = await api.http.get("/v1/generations", headers=auth,
                                      params={"limit": 1, **({"cursor": cursor} if cursor else {})})
        page = response.json()
        assert len(page["items"]) <= 1
        seen += [g["id"] for g in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert sorted(seen) == sorted([photo, fitting, other_photo])
    item = (await api.http.get("/v1/generations?kind=fitting", headers=auth)).json()["items"][0]
    assert item["urls"]["get"].endswith(f"/v1/generations/{fitting}") and item["status"] == "queued"

    # A cursor only works with the filters it came from.
    first = (await api.http.get("/v1/generations?limit=1", headers=auth)).json()
    assert first["next_cursor"]
    moved = await api.http.get("/v1/generations", headers=auth,
                               params={"limit": 1, "kind": "fitting", "cursor": first["next_cursor"]})
    assert moved.status_code == 400


async def _has(listed, query: str, n: int) -> bool:
    return len(await listed(query)) >= n


async def test_read_is_right_when_the_worker_dies_mid_generation(api_factory):
    api = await api_factory(local_ai_delay_s=60, ai_heartbeat_s=2)
    _, auth = await api.new_user()
    async with api.harness.worker():
        task_id = await _start(api, auth)
        await wait_until(lambda: _stage_is(api, auth, task_id, "generating"), timeout=30)
    # The worker is gone with the AI call in flight: the query cannot be answered; describe can.
    began = time.monotonic()
    response = await api.http.get(f"/v1/generations/{task_id}", headers=auth)
    assert time.monotonic() - began < 10
    body = response.json()
    assert body["status"] == "running" and body["stage"] == "generating"
    assert body["credits"] == {"charged": 10, "refunded": 0}
    assert body["attempt"] >= 1
