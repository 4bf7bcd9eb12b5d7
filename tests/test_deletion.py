"""Deletion, erasure and retention: after a deletion no byte of the image is left in the blob store
or in any workflow history; a blob two users hold goes with its last holder; erasing one user
leaves another untouched; the retention schedule deletes inputs of finished generations only."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from atelier import credits
from atelier.db import blob_refs, reading
from atelier.messages import RetentionResult
from sqlalchemy import select
from tests.api_fixtures import Api, api, api_factory, make_api, wait_until  # noqa: F401 - fixtures
from tests.fakes.images import jpeg, png
from tests.fakes.webhook_receiver import WebhookReceiver
from worker import ensure_retention_schedule, retention_schedule_id

CHUNK = 128


def _key(url: str) -> str:
    return urlsplit(url).path.rsplit("/", 1)[1]


def _chunks(data: bytes) -> list[bytes]:
    """Pieces from across the image's compressed data (past the headers, which images encoded alike
    share): finding any of them means its bytes are still there."""
    assert len(data) > 4 * CHUNK
    return [data[i:i + CHUNK] for i in (len(data) * k // 8 for k in range(2, 8)) if i + CHUNK <= len(data)]


def photo(width: int, height: int, seed: int) -> bytes:
    """A JPEG of noise: no two share a run of compressed bytes, as no two real photos do."""
    pixels = random.Random(seed).randbytes(width * height * 3)
    out = io.BytesIO()
    Image.frombytes("RGB", (width, height), pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def _files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def distinctive(root: Path, images: dict[str, bytes]) -> list[bytes]:
    """Pieces of each image found in no other file of the store (so finding one later means that
    image's bytes are still there); every image must have some."""
    files = _files(root)
    pieces = []
    for key, image in images.items():
        own = [c for c in _chunks(image) if not any(c in data for p, data in files.items() if p.name != key)]
        assert own, f"{key}: no piece of it is its own"
        pieces += own
    return pieces


def blob_store_holds(root: Path, pieces: list[bytes]) -> list[str]:
    """Files under the blob folder that contain any of `pieces`."""
    return [str(p) for p, data in _files(root).items() if any(c in data for c in pieces)]


def _payload_bytes(node, out: list[bytes]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "data" and isinstance(value, str):
                try:
                    out.append(base64.b64decode(value, validate=True))
                except ValueError:
                    pass
            _payload_bytes(value, out)
    elif isinstance(node, list):
        for item in node:
            _payload_bytes(item, out)


async def histories_holding(client: Client, workflow_ids: list[str], pieces: list[bytes]) -> list[str]:
    """Workflow histories (still there) that contain any of `pieces`, raw or in a decoded payload."""
    found = []
    for workflow_id in workflow_ids:
        try:
            history = await client.get_workflow_handle(workflow_id).fetch_history()
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                continue
            raise
        text = history.to_json()
        decoded: list[bytes] = [text.encode()]
        _payload_bytes(json.loads(text), decoded)
        blob = b"\n".join(decoded)
        if any(c in blob for c in pieces):
            found.append(workflow_id)
    return found


async def _generate(api: Api, auth: dict, photo: bytes, *, prompt: str = "", **extra) -> dict:
    file_id = await api.upload(auth, photo)
    started = await api.http.post("/v1/generations", headers=auth, json={
        "kind": "photography", "images": [{"file_id": file_id}], "prompt": prompt, **extra})
    assert started.status_code == 202, started.text
    done = await api.poll(auth, started.json()["id"], timeout=60)
    assert done["status"] == "completed", done
    done["file_id"] = file_id
    return done


async def _refs(api: Api, **where) -> list:
    async with reading(api.harness.engine) as conn:
        q = select(blob_refs)
        for column, value in where.items():
            q = q.where(blob_refs.c[column] == value)
        return list((await conn.execute(q)).all())


async def test_deleting_a_work_and_its_upload_leaves_no_byte_in_the_blob_store_or_any_history(api: Api):
    user_id, auth = await api.new_user()
    async with api.harness.worker():
        done = await _generate(api, auth, photo(321, 207, seed=1))
    blobs = api.harness.deps.blobs
    output_url = done["result"]["images"][0]["url"]
    output_key = _key(output_url)
    [input_ref] = await _refs(api, kind="input", owner_id=done["id"])
    thumb = await api.http.get(output_url + "&w=256")
    assert thumb.status_code == 200
    pieces = distinctive(api.settings.blob_dir, {output_key: await blobs.get(output_key),
                                                 input_ref.blob_key: await blobs.get(input_ref.blob_key),
                                                 blobs.thumbnail_key(output_key, 256): thumb.content})
    assert blob_store_holds(api.settings.blob_dir, pieces)  # the scan finds them while they exist
    workflow_ids = [done["id"], f"{done['id']}-webhook"]

    deleted = await api.http.delete(f"/v1/works/{done['result']['work_id']}", headers=auth)
    assert deleted.status_code == 204, deleted.text
    assert not blobs.exists(output_key)
    assert blobs.exists(input_ref.blob_key)  # still the user's upload
    assert (await api.http.get(output_url)).status_code == 404  # the signed link died with it
    assert (await api.http.get(f"/v1/files/{output_key}", headers=auth)).status_code == 404
    assert (await api.http.get(f"/v1/works/{done['result']['work_id']}", headers=auth)).status_code == 404
    again = await api.http.delete(f"/v1/works/{done['result']['work_id']}", headers=auth)
    assert again.status_code == 404 and again.json()["error"]["code"] == "NotFound"

    gone = await api.http.delete(f"/v1/uploads/{done['file_id']}", headers=auth)
    assert gone.status_code == 204, gone.text
    assert not blobs.exists(input_ref.blob_key)
    assert await _refs(api, user_id=user_id) == []
    assert blob_store_holds(api.settings.blob_dir, pieces) == []
    assert await histories_holding(api.harness.client, workflow_ids, pieces) == []
    # The ledger keeps the charge: accounting survives the deletion.
    assert await credits.task_totals(api.harness.engine, done["id"]) == (10, 0)


async def test_a_blob_two_users_hold_stays_until_the_last_holder_deletes_it(api: Api):
    _, alice = await api.new_user()
    _, bob = await api.new_user()
    same = png(90, 70)
    alice_file, bob_file = await api.upload(alice, same), await api.upload(bob, same)
    [ref] = await _refs(api, kind="upload", owner_id=alice_file)
    blobs = api.harness.deps.blobs
    assert (await _refs(api, kind="upload", owner_id=bob_file))[0].blob_key == ref.blob_key

    assert (await api.http.delete(f"/v1/uploads/{alice_file}", headers=alice)).status_code == 204
    assert blobs.exists(ref.blob_key)
    assert (await api.http.get(f"/v1/files/{ref.blob_key}", headers=bob)).status_code == 200
    assert (await api.http.get(f"/v1/files/{ref.blob_key}", headers=alice)).status_code == 404
    # Bob's upload is not Alice's to delete.
    assert (await api.http.delete(f"/v1/uploads/{bob_file}", headers=alice)).status_code == 404
    assert (await api.http.delete(f"/v1/uploads/{bob_file}", headers=bob)).status_code == 204
    assert not blobs.exists(ref.blob_key)


async def test_erasure_removes_everything_of_one_user_and_nothing_of_another(api: Api):
    alice_id, alice = await api.new_user()
    bob_id, bob = await api.new_user()
    marker = "alice-private-prompt-7d1e"
    with WebhookReceiver(api.settings.webhook_secret.get_secret_value()) as receiver:
        async with api.harness.worker():
            alice_done = await _generate(api, alice, photo(300, 200, seed=2), prompt=marker, webhook_url=receiver.url,
                                         webhook_events=["started", "completed"])
            bob_done = await _generate(api, bob, photo(310, 190, seed=3), webhook_url=receiver.url)
            await asyncio.to_thread(receiver.wait_for, lambda ds: sum(d.succeeded for d in ds) >= 3, timeout=30)
    family = [w.id async for w in api.harness.client.list_workflows(f'RootWorkflowId="{alice_done["id"]}"')]
    bob_family = [w.id async for w in api.harness.client.list_workflows(f'RootWorkflowId="{bob_done["id"]}"')]
    assert len(family) == 3 and len(bob_family) == 2, (family, bob_family)  # the generation and its deliveries
    extra = await api.upload(alice, photo(150, 150, seed=4))
    blobs = api.harness.deps.blobs
    alice_keys = {r.blob_key for r in await _refs(api, user_id=alice_id)}
    bob_keys = {r.blob_key for r in await _refs(api, user_id=bob_id)}
    assert len(alice_keys) == 3 and len(bob_keys) == 2 and not alice_keys & bob_keys
    alice_pieces = distinctive(api.settings.blob_dir, {k: await blobs.get(k) for k in alice_keys})
    bob_pieces = distinctive(api.settings.blob_dir, {k: await blobs.get(k) for k in bob_keys})

    erased = await api.http.post(f"/v1/admin/users/{alice_id}/erase", headers=api.admin)
    assert erased.status_code == 200, erased.text
    body = erased.json()
    assert body["works"] == 1 and body["uploads"] == 2 and body["blobs_deleted"] == 3
    assert body["still_running"] == 0 and body["histories_deleted"] == 1

    # Nothing of Alice's is left: no blob, no work, no upload, no history.
    assert not any(blobs.exists(k) for k in alice_keys)
    assert blob_store_holds(api.settings.blob_dir, alice_pieces) == []
    assert (await api.http.get("/v1/works", headers=alice)).json()["items"] == []
    assert (await api.http.delete(f"/v1/uploads/{extra}", headers=alice)).status_code == 404
    assert await _refs(api, user_id=alice_id) == []

    async def histories_gone() -> bool:
        for workflow_id in family:
            try:
                await api.harness.client.get_workflow_handle(workflow_id).describe()
                return False
            except RPCError as err:
                if err.status != RPCStatusCode.NOT_FOUND:
                    raise
        return True

    await wait_until(histories_gone, timeout=120, interval=1.0)  # Temporal deletes asynchronously (~30 s)
    assert await histories_holding(api.harness.client, family, alice_pieces) == []
    # The ledger stays, with amounts and reasons and no prompt.
    entries = await credits.entries(api.harness.engine, alice_id, task_id=alice_done["id"])
    assert [(e.entry, e.amount) for e in entries] == [("charge", -10)]
    assert all(marker not in e.reason for e in await credits.entries(api.harness.engine, alice_id))

    # Bob's things are all there.
    assert all(blobs.exists(k) for k in bob_keys)
    assert len(blob_store_holds(api.settings.blob_dir, bob_pieces)) == len(bob_keys)
    assert (await api.http.get(f"/v1/works/{bob_done['result']['work_id']}", headers=bob)).status_code == 200
    assert (await api.http.get(bob_done["result"]["images"][0]["url"])).status_code == 200
    for workflow_id in bob_family:
        # Still there (describe raises NOT_FOUND for a deleted history); a webhook delivery may still run.
        status = (await api.harness.client.get_workflow_handle(workflow_id).describe()).status
        assert status in (WorkflowExecutionStatus.COMPLETED, WorkflowExecutionStatus.RUNNING)
    assert (await api.http.post("/v1/admin/users/usr_nobody/erase", headers=api.admin)).status_code == 404


async def test_the_retention_schedule_deletes_inputs_of_finished_generations_only(harness_factory):
    harness = await harness_factory(input_retention_hours=1 / 3600, retention_interval_s=3600)
    api = make_api(harness)
    async with api.http:
        _, auth = await api.new_user()
        async with harness.worker():
            finished = await _generate(api, auth, jpeg(280, 180))
            withdrawn = await _generate(api, auth, photo(200, 150, seed=21))
        # A refund after the save withdraws the work (the ledger's rule): its outputs are nobody's.
        [withdrawn_output] = await _refs(api, kind="output", owner_id=withdrawn["id"])
        await credits.refund(harness.engine, task_id=withdrawn["id"], user_id=withdrawn_output.user_id)
        assert (await api.http.get(f"/v1/works/{withdrawn['result']['work_id']}", headers=auth)).status_code == 404
        async with harness.worker(only="main"):  # no AI worker: the next generation stays running
            running_file = await api.upload(auth, jpeg(260, 170))
            started = await api.http.post("/v1/generations", headers=auth, json={
                "kind": "photography", "images": [{"file_id": running_file}]})
            running_id = started.json()["id"]
            await api.poll(auth, running_id, until={"running"})
            await wait_until(lambda: _refs(api, kind="input", owner_id=running_id), timeout=30)
            unused = await api.upload(auth, png(60, 40))
            [finished_input] = await _refs(api, kind="input", owner_id=finished["id"])
            [running_input] = await _refs(api, kind="input", owner_id=running_id)
            [unused_ref] = await _refs(api, kind="upload", owner_id=unused)
            await asyncio.sleep(1.5)  # everything above is now older than the retention

            schedule_id = await ensure_retention_schedule(harness.client, harness.settings)
            assert schedule_id == retention_schedule_id(harness.settings.task_queue)
            assert await ensure_retention_schedule(harness.client, harness.settings) == schedule_id  # idempotent
            schedule = harness.client.get_schedule_handle(schedule_id)
            try:
                await schedule.trigger()

                async def ran():
                    actions = (await schedule.describe()).info.recent_actions
                    return actions[-1].action.workflow_id if actions else None

                run_id = await wait_until(ran, timeout=30)
                result = await harness.client.get_workflow_handle(run_id, result_type=RetentionResult).result()
            finally:
                await schedule.delete()

            blobs = harness.deps.blobs
            assert result.generations_released == 2 and result.uploads_deleted >= 3
            assert not blobs.exists(finished_input.blob_key)
            assert not blobs.exists(unused_ref.blob_key)
            assert blobs.exists(running_input.blob_key)  # its generation is still running
            assert await _refs(api, kind="input", owner_id=running_id)
            assert blobs.exists(_key(finished["result"]["images"][0]["url"]))  # outputs are the user's to keep
            assert not blobs.exists(withdrawn_output.blob_key)
            assert await _refs(api, owner_id=withdrawn["id"]) == []
            await api.http.post(f"/v1/generations/{running_id}/cancel", headers=auth)
            await api.poll(auth, running_id, until={"canceled"})


class _RacingBlobs:
    """A blob store whose first put is followed at once by another holder's deletion of the same
    bytes (the window between storing a blob and recording its holder)."""

    def __init__(self, blobs) -> None:
        self._blobs, self.raced = blobs, 0

    def __getattr__(self, name):
        return getattr(self._blobs, name)

    async def put(self, data: bytes, content_type: str) -> str:
        key = await self._blobs.put(data, content_type)
        if not self.raced:
            self.raced += 1
            await self._blobs.delete(key)
        return key


async def test_an_upload_racing_a_deletion_of_the_same_bytes_keeps_its_blob(harness):
    import httpx

    from starter.api import create_app

    racing = _RacingBlobs(harness.deps.blobs)
    app = create_app(harness.settings, client=harness.client, engine=harness.engine, blobs=racing)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://testserver") as http:
        admin = {"Authorization": "Bearer admin-test-token"}
        user = (await http.post("/v1/admin/users", headers=admin)).json()
        auth = {"Authorization": f"Bearer {user['api_key']}"}
        uploaded = await http.post("/v1/uploads", headers=auth, files={"file": ("a.jpg", photo(90, 60, 9), "image/jpeg")})
        assert uploaded.status_code == 201, uploaded.text
    assert racing.raced == 1
    [ref] = [r for r in await _refs_of(harness, uploaded.json()["file_id"])]
    assert harness.deps.blobs.exists(ref.blob_key)


async def _refs_of(harness, owner_id: str) -> list:
    async with reading(harness.engine) as conn:
        return list((await conn.execute(select(blob_refs).where(blob_refs.c.owner_id == owner_id))).all())


async def test_a_downloaded_input_racing_a_deletion_of_the_same_bytes_is_stored_again(harness):
    from atelier.messages import ImageInput
    from tests.fakes.http_server import FakeHttpServer

    user = await harness.user(50)
    racing = _RacingBlobs(harness.deps.blobs)
    harness.deps.blobs = racing  # the worker's download_and_convert stores through it
    with FakeHttpServer() as host:
        host.route("/me.jpg", body=photo(140, 100, 11), headers={"Content-Type": "image/jpeg"})
        async with harness.worker():
            handle = await harness.start(user, "photography", [ImageInput(url=host.url("/me.jpg"))])
            result = await handle.result()
        assert host.hits("/me.jpg") == 2  # the raced attempt, then the retry that stored it again
    assert result.status == "completed" and racing.raced == 1
    [ref] = [r for r in await _refs_of(harness, handle.id) if r.kind == "input"]
    assert racing.exists(ref.blob_key)


async def test_the_migration_records_existing_uploads_and_works_as_holders(tmp_path):
    from datetime import datetime, timezone

    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    from atelier import migrate

    url = f"sqlite+aiosqlite:///{tmp_path}/old.db"
    await asyncio.to_thread(migrate.upgrade, url, "0002_max_priority")
    now = datetime.now(timezone.utc)
    up, out1, out2 = "a" * 64 + ".jpg", "b" * 64 + ".png", "c" * 64 + ".jpg"
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO users (id, balance, created_at) VALUES ('usr_1', 0, :t)"), {"t": now})
            await conn.execute(text(
                "INSERT INTO files (id, user_id, blob_key, content_type, width, height, size, origin, created_at) "
                "VALUES ('fil_1', 'usr_1', :k, 'image/jpeg', 1, 1, 1, 'upload', :t)"), {"k": up, "t": now})
            await conn.execute(text(
                "INSERT INTO works (id, task_id, user_id, kind, model, prompt, images, created_at) "
                "VALUES ('wrk_1', 'gen_1', 'usr_1', 'photography', 'm', '', :images, :t)"),
                {"images": json.dumps([{"key": out1}, {"key": out2}, {"key": out1}]), "t": now})
        await asyncio.to_thread(migrate.upgrade, url)
        async with engine.connect() as conn:
            rows = {(r.blob_key, r.user_id, r.kind, r.owner_id) for r in await conn.execute(select(blob_refs))}
    finally:
        await engine.dispose()
    assert rows == {(up, "usr_1", "upload", "fil_1"), (out1, "usr_1", "output", "gen_1"),
                    (out2, "usr_1", "output", "gen_1")}


async def test_erasing_a_user_cancels_their_running_generation_with_a_refund_and_leaves_others_running(api: Api):
    alice_id, alice = await api.new_user()
    _, bob = await api.new_user()
    blobs = api.harness.deps.blobs
    async with api.harness.worker(only="main"):  # no AI worker: both generations stay running
        ids = {}
        for name, auth, seed in (("alice", alice, 31), ("bob", bob, 32)):
            file_id = await api.upload(auth, photo(200, 140, seed=seed))
            started = await api.http.post("/v1/generations", headers=auth, json={
                "kind": "photography", "images": [{"file_id": file_id}]})
            ids[name] = started.json()["id"]
            await api.poll(auth, ids[name], until={"running"})
            await wait_until(lambda: _refs(api, kind="input", owner_id=ids[name]), timeout=30)
        [alice_input] = await _refs(api, kind="input", owner_id=ids["alice"])
        [bob_input] = await _refs(api, kind="input", owner_id=ids["bob"])

        erased = await api.http.post(f"/v1/admin/users/{alice_id}/erase", headers=api.admin)
        assert erased.status_code == 200, erased.text
        assert erased.json()["generations_canceled"] == 1 and erased.json()["still_running"] == 0

        assert await api.harness.ledger(ids["alice"]) == (10, 10)  # every credit back
        assert not blobs.exists(alice_input.blob_key)
        assert (await api.http.get(f"/v1/generations/{ids['bob']}", headers=bob)).json()["status"] == "running"
        assert blobs.exists(bob_input.blob_key)
        await api.http.post(f"/v1/generations/{ids['bob']}/cancel", headers=bob)
        await api.poll(bob, ids["bob"], until={"canceled"})



async def test_erasing_a_user_survives_a_server_that_cancels_deletes_and_says_what_it_left(api: Api, monkeypatch):
    """The dev server has answered a delete just after the workflow closed with CANCELLED ("operation
    was canceled"); that once made erasing a user a 500 that left every file in place. A passing error
    is tried again; one that does not pass leaves that history (counted, so the caller erases again) and
    everything else is still erased."""
    from starter import service

    monkeypatch.setattr(service, "DELETE_BACKOFF_S", (0.01, 0.01, 0.01))
    user_id, auth = await api.new_user()
    async with api.harness.worker():
        done = await _generate(api, auth, photo(240, 160, seed=41))
    blobs = api.harness.deps.blobs
    keys = {r.blob_key for r in await _refs(api, user_id=user_id)}
    assert keys and all(blobs.exists(k) for k in keys)

    workflow_service = api.harness.client.workflow_service
    real_delete = workflow_service.delete_workflow_execution
    calls: list[str] = []

    def failing(times: int):
        async def delete(request, **kw):
            calls.append(request.workflow_execution.workflow_id)
            if len(calls) <= times:
                raise RPCError("operation was canceled", RPCStatusCode.CANCELLED, b"")
            return await real_delete(request, **kw)
        return delete

    # Every attempt fails: 200, the history counted as left, the files gone all the same.
    monkeypatch.setattr(workflow_service, "delete_workflow_execution", failing(times=100))
    erased = await api.http.post(f"/v1/admin/users/{user_id}/erase", headers=api.admin)
    assert erased.status_code == 200, erased.text
    assert erased.json()["histories_deleted"] == 0 and erased.json()["histories_left"] == 1
    assert calls == [done["id"]] * (len(service.DELETE_BACKOFF_S) + 1)  # bounded: tried, then given up
    assert not any(blobs.exists(k) for k in keys) and await _refs(api, user_id=user_id) == []
    assert (await api.harness.client.get_workflow_handle(done["id"]).describe()).status \
        == WorkflowExecutionStatus.COMPLETED  # still there, as the answer said

    # Erasing again, the server failing once: tried again, deleted.
    calls.clear()
    monkeypatch.setattr(workflow_service, "delete_workflow_execution", failing(times=1))
    erased = await api.http.post(f"/v1/admin/users/{user_id}/erase", headers=api.admin)
    assert erased.status_code == 200, erased.text
    assert erased.json()["histories_deleted"] == 1 and erased.json()["histories_left"] == 0
    assert calls == [done["id"]] * 2

    # Another error is not swallowed: it is an incident, not a count.
    calls.clear()
    async def refused(request, **kw):
        calls.append(request.workflow_execution.workflow_id)
        raise RPCError("no", RPCStatusCode.PERMISSION_DENIED, b"")
    other_id, other = await api.new_user()
    async with api.harness.worker():
        await _generate(api, other, photo(200, 150, seed=42))
    monkeypatch.setattr(workflow_service, "delete_workflow_execution", refused)
    erased = await api.http.post(f"/v1/admin/users/{other_id}/erase", headers=api.admin)
    assert erased.status_code == 500 and len(calls) == 1
