"""Cheap reads (issue 13): a generation seen running is read with one `progress` query, no
describe; its owner stays checked; once it closes the server rejects the query and the read
falls back to describe and history. SQLite reads run whole on reader threads."""

from __future__ import annotations

from temporalio.client import WorkflowHandle

from atelier import credits
from sqlalchemy import select

from atelier.db import reading, users
from tests.api_fixtures import Api, api_factory, wait_until  # noqa: F401
from tests.fakes.images import jpeg


async def _start(api: Api, auth) -> str:
    photo = await api.upload(auth, jpeg(100, 80))
    response = await api.http.post("/v1/generations", headers=auth,
                                   json={"kind": "photography", "images": [{"file_id": photo}]})
    assert response.status_code == 202, response.text
    return response.json()["id"]


async def test_a_running_generation_is_read_without_describe_then_closed_from_history(api_factory, monkeypatch):
    api = await api_factory(local_ai_delay_s=6)
    _, auth = await api.new_user()
    _, other = await api.new_user()
    known = api.app.state.atelier.generations
    describes: list[str] = []
    real_describe = WorkflowHandle.describe

    async def counting_describe(self, *args, **kwargs):
        describes.append(self.id)
        return await real_describe(self, *args, **kwargs)

    monkeypatch.setattr(WorkflowHandle, "describe", counting_describe)
    async with api.harness.worker():
        task_id = await _start(api, auth)

        async def generating() -> bool:
            r = await api.http.get(f"/v1/generations/{task_id}", headers=auth)
            return r.json()["stage"] == "generating"

        await wait_until(generating, timeout=30)
        remembered = known.get(task_id)
        assert remembered is not None and remembered.kind == "photography" and remembered.created_at

        describes.clear()
        read = await api.http.get(f"/v1/generations/{task_id}", headers=auth)
        body = read.json()
        assert read.status_code == 200 and body["status"] == "running" and body["stage"] == "generating"
        assert body["credits"] == {"charged": 10, "refunded": 0}  # from the ledger, read beside the query
        assert body["created_at"] == remembered.created_at
        assert describes == []  # one query answered it

        # Another user's key: 404, as for any generation not theirs, still without a describe.
        assert (await api.http.get(f"/v1/generations/{task_id}", headers=other)).status_code == 404
        assert describes == []

        done = await api.poll(auth, task_id, timeout=60)
    assert done["status"] == "completed" and done["result"]["images"]
    await wait_until(lambda: _closed(api, task_id), timeout=30)
    # Closed: the query is rejected, the read goes to describe and history, and it is forgotten.
    describes.clear()
    again = (await api.http.get(f"/v1/generations/{task_id}", headers=auth)).json()
    assert again["status"] == "completed" and again["result"]["work_id"] == done["result"]["work_id"]
    assert again["credits"] == {"charged": 10, "refunded": 0}
    assert known.get(task_id) is None and describes == [task_id]


async def _closed(api: Api, task_id: str) -> bool:
    desc = await api.harness.client.get_workflow_handle(task_id).describe()
    return desc.close_time is not None


async def test_sqlite_reader_sees_committed_writes_and_survives_dispose(api_factory):
    api = await api_factory()
    user_id, _ = await api.new_user(credits_=25)
    engine = api.harness.engine
    assert await credits.balance(engine, user_id) == 25
    await credits.grant(engine, user_id=user_id, amount=5, reason="more")
    assert await credits.balance(engine, user_id) == 30  # a write through aiosqlite is seen at once
    [latest, *_] = await credits.entries(engine, user_id, limit=5)
    assert latest.amount == 5 and latest.reason == "more"
    await engine.dispose()  # closes the reader's connections and threads; the engine stays usable
    assert await credits.balance(engine, user_id) == 30
    async with reading(engine) as conn:
        assert (await conn.scalar(select(users.c.balance).where(users.c.id == user_id))) == 30
