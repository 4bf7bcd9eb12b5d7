"""The generation deadline and a cancel request, told apart by the workflow itself.

A deadline is a timer of the workflow's own: reaching it fails the generation as
DeadlineExceeded (ExpiredBeforeStart before any AI call started) everywhere a client looks
(GET, the list, the search attribute, the webhook), with every credit back. Only a real
cancel request ends a generation as canceled. Each case reads the ledger itself."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading

from sqlalchemy import text
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError

from atelier import works
from atelier.messages import ImageInput
from starter.service import list_generations, read_generation
from tests.conftest import on_postgres, wait_for
from tests.fakes import images as fake_images
from tests.fakes.http_server import FakeHttpServer
from tests.fakes.webhook_receiver import WebhookReceiver


def _secret(h) -> str:
    return h.settings.webhook_secret.get_secret_value()


async def _photo(h, user: str) -> list[ImageInput]:
    return [ImageInput(file_id=await h.upload(user, fake_images.jpeg(320, 240)))]


async def _stage(handle) -> str:
    from workflows.generation import GenerationWorkflow
    try:
        return (await handle.query(GenerationWorkflow.progress)).stage
    except Exception:  # noqa: BLE001 - not yet answerable
        return ""


async def _everywhere(h, task_id: str, user: str) -> dict:
    """What GET, the list and the search attribute say of a closed generation."""
    state = await read_generation(h.client, task_id, engine=h.engine)

    async def listed():
        items, _ = await list_generations(h.client, user)
        return next((i for i in items if i.id == task_id and not i.running), None)

    summary = await wait_for(listed, timeout=20)
    return {"get": state.view, "list": summary.status}


async def _failed_with(handle, code: str):
    try:
        await handle.result()
    except WorkflowFailureError as failure:
        assert isinstance(failure.cause, ApplicationError)
        assert failure.cause.type == code, failure.cause
        return failure.cause.details[0]
    raise AssertionError("the generation did not fail")


async def test_a_deadline_during_the_download_fails_as_expired_before_start_and_refunds(harness):
    h = harness
    h.timeouts.deadline_s = 3
    user = await h.user(100)
    with FakeHttpServer() as host, WebhookReceiver(_secret(h)) as receiver:
        host.route("/slow.jpg", body=fake_images.jpeg(320, 240), headers={"Content-Type": "image/jpeg"}, delay_s=25)
        async with h.worker():
            handle = await h.start(user, "photography", [ImageInput(url=host.url("/slow.jpg"))],
                                   webhook_url=receiver.url)
            await _failed_with(handle, "ExpiredBeforeStart")
            deliveries = await asyncio.to_thread(receiver.wait_for_success, timeout=30)
        seen = await _everywhere(h, handle.id, user)
    view = seen["get"]
    assert view.status == "failed" and view.error["code"] == "ExpiredBeforeStart"
    assert seen["list"] == "failed"
    assert (view.charged, view.refunded) == (10, 10)
    assert await h.ledger(handle.id) == (10, 10) and await h.balance(user) == 100
    [delivery] = deliveries
    assert delivery.payload["type"] == "generation.failed"
    data = delivery.payload["data"]
    assert data["status"] == "failed" and data["error"]["code"] == "ExpiredBeforeStart"
    assert data["credits"] == {"charged": 10, "refunded": 10}


async def test_a_deadline_during_the_ai_call_fails_as_deadline_exceeded_everywhere(harness_factory):
    h = await harness_factory(local_ai_delay_s=60)
    h.timeouts.deadline_s = 6
    user = await h.user(100)
    with WebhookReceiver(_secret(h)) as receiver:
        async with h.worker():
            handle = await h.start(user, "photography", await _photo(h, user), webhook_url=receiver.url)
            await wait_for(lambda: _stage_is(handle, "generating"), timeout=20)
            result = await _failed_with(handle, "DeadlineExceeded")
            deliveries = await asyncio.to_thread(receiver.wait_for_success, timeout=30)
        seen = await _everywhere(h, handle.id, user)
    assert result["status"] == "failed" and result["error_stage"] == "generating" and result["retryable"] is True
    assert [a["outcome"] for a in result["attempts"]] == ["canceled"]
    view = seen["get"]
    assert view.status == "failed" and view.error["code"] == "DeadlineExceeded"
    assert seen["list"] == "failed"
    assert await h.ledger(handle.id) == (10, 10) and await h.balance(user) == 100
    assert deliveries[0].payload["data"]["status"] == "failed"
    assert deliveries[0].payload["data"]["error"]["code"] == "DeadlineExceeded"
    desc = await handle.describe()
    assert desc.status.name == "FAILED"


async def _stage_is(handle, stage: str) -> bool:
    return await _stage(handle) == stage


@contextlib.asynccontextmanager
async def _works_locked(h):
    """Hold a lock that makes saving a work wait (SQLite: the write lock; PostgreSQL: the works table)."""
    if on_postgres():
        async with h.engine.connect() as conn:
            trans = await conn.begin()
            await conn.execute(text("LOCK TABLE works IN ACCESS EXCLUSIVE MODE"))
            try:
                yield
            finally:
                await trans.rollback()
        return
    path = h.settings.database_url.split("///", 1)[1]
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


async def test_a_deadline_during_the_save_keeps_the_saved_work(harness_factory):
    """The images exist once the AI answered: a deadline that lands while the save commits lets it
    finish; the user has their work and has paid for it, never a refunded work."""
    h = await harness_factory(local_ai_delay_s=1)
    h.timeouts.deadline_s = 8
    user = await h.user(100)
    async with h.worker():
        handle = await h.start(user, "photography", await _photo(h, user))
        await wait_for(lambda: _stage_is(handle, "generating"), timeout=20)
        async with _works_locked(h):
            await wait_for(lambda: _stage_is(handle, "saving"), timeout=20)
            # Past the deadline, with the save still waiting on the lock.
            await wait_for(lambda: _timer_fired(handle), timeout=20)
        result = await handle.result()
    assert result.status == "completed" and result.work_id
    assert await works.work_for_task(h.engine, handle.id) is not None
    assert await h.ledger(handle.id) == (10, 0)


async def _timer_fired(handle) -> bool:
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_TIMER_FIRED:
            return True
    return False


async def test_a_cancel_request_is_canceled_not_failed(harness_factory):
    h = await harness_factory(local_ai_delay_s=60)
    user = await h.user(100)
    with WebhookReceiver(_secret(h)) as receiver:
        async with h.worker():
            handle = await h.start(user, "photography", await _photo(h, user), webhook_url=receiver.url)
            await wait_for(lambda: _stage_is(handle, "generating"), timeout=20)
            await handle.cancel()
            with contextlib.suppress(WorkflowFailureError):
                await handle.result()
            deliveries = await asyncio.to_thread(receiver.wait_for_success, timeout=30)
        seen = await _everywhere(h, handle.id, user)
    assert (await handle.describe()).status.name == "CANCELED"
    assert seen["get"].status == "canceled" and seen["list"] == "canceled"
    assert deliveries[0].payload["data"]["status"] == "canceled"
    assert await h.ledger(handle.id) == (10, 10)


async def test_a_cancel_during_the_charge_reports_what_the_ledger_says(harness):
    """The webhook and the result must agree with the ledger: charged 10, refunded 10 (not 0 and 10)."""
    h = harness
    user = await h.user(100)
    gate = threading.Event()
    with WebhookReceiver(_secret(h)) as receiver:
        async with _charge_held(h, gate):
            async with h.worker():
                handle = await h.start(user, "photography", await _photo(h, user), webhook_url=receiver.url)
                await wait_for(lambda: _stage_is(handle, "charging"), timeout=20)
                await handle.cancel()
                gate.set()
                with contextlib.suppress(WorkflowFailureError):
                    await handle.result()
                deliveries = await asyncio.to_thread(receiver.wait_for_success, timeout=30)
    assert await h.ledger(handle.id) == (10, 10)
    data = deliveries[0].payload["data"]
    assert data["status"] == "canceled"
    assert data["credits"] == {"charged": 10, "refunded": 10}


@contextlib.asynccontextmanager
async def _charge_held(h, gate: threading.Event):
    """Make the charge wait until `gate` is set, by holding the database's write lock."""
    if on_postgres():
        async with h.engine.connect() as conn:
            trans = await conn.begin()
            await conn.execute(text("LOCK TABLE ledger IN ACCESS EXCLUSIVE MODE"))

            async def release():
                await asyncio.to_thread(gate.wait, 30)
                await trans.rollback()

            releaser = asyncio.ensure_future(release())
            try:
                yield
            finally:
                gate.set()
                await releaser
        return
    path = h.settings.database_url.split("///", 1)[1]
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")

    def release():
        gate.wait(30)
        conn.execute("ROLLBACK")
        conn.close()

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    try:
        yield
    finally:
        gate.set()
        thread.join(30)
