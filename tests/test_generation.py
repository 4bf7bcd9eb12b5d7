"""GenerationWorkflow end to end on a real Temporal dev server, real activities, a real
SQLite database, and fake providers that are real HTTP servers on loopback.

Every money assertion reads the ledger itself: for each task, charged - refunded equals the
cost if completed and 0 otherwise."""

from __future__ import annotations

import asyncio
import io
import os
import uuid

import pytest
from PIL import Image
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError, CancelledError

from atelier import works
from atelier.errors import InvalidRequest
from atelier.messages import (ChargeRequest, ChargeResult, DownloadRequest, DownloadResult, GenerationRequest,
                              GenerationResult, ImageInput, ModelChoice, SelectModelRequest, Status)
from starter.service import read_generation, start_generation
from tests.fakes import images as fake_images
from tests.fakes.gemini_server import FakeGemini, Reply
from tests.fakes.http_server import FakeHttpServer

def noise_png(width: int, height: int, seed: int) -> bytes:
    """A PNG of random pixels: incompressible, so it is as big as it looks (~3 bytes a pixel)."""
    image = Image.frombytes("RGB", (width, height), __import__("random").Random(seed).randbytes(width * height * 3))
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=1)
    return out.getvalue()


PRIMARY, SECONDARY = "gemini-2.5-flash-image", "gemini-3-pro-image-preview"


async def assert_money(h, task_id: str, status: Status, cost: int) -> None:
    charged, refunded = await h.ledger(task_id)
    if status == Status.COMPLETED:
        assert (charged, refunded) == (cost, 0)
    elif status == Status.REJECTED:
        assert (charged, refunded) == (0, 0)
    else:
        assert charged == refunded and charged in (0, cost)


async def gemini_harness(harness_factory, fake: FakeGemini, **overrides):
    return await harness_factory(ai_provider="gemini", gemini_api_key="test-key", gemini_base_url=fake.url,
                                 **overrides)


async def inputs(h, user_id: str, n: int) -> list[ImageInput]:
    return [ImageInput(file_id=await h.upload(user_id, fake_images.jpeg(320 + i * 16, 240)))
            for i in range(n)]


# ---- success -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind,count", [("photography", 2), ("fitting", 3)])
async def test_local_provider_completes_both_kinds(harness, kind, count):
    h = harness
    user = await h.user(100)
    async with h.worker():
        handle = await h.start(user, kind, await inputs(h, user, count), prompt="soft light", style="studio")
        result: GenerationResult = await handle.result()
    assert result.status == "completed" and result.work_id and len(result.images) == 1
    out = result.images[0]
    assert h.deps.blobs.exists(out.key)
    assert Image.open(io.BytesIO(await h.deps.blobs.get(out.key))).size == (out.width, out.height)
    work = await works.work_for_task(h.engine, handle.id)
    assert work is not None and work.user_id == user and work.model == "local-studio"
    cost = h.settings.cost_of(kind)
    await assert_money(h, handle.id, Status.COMPLETED, cost)
    assert await h.balance(user) == 100 - cost


async def test_gemini_receives_every_image_with_its_type(harness_factory):
    """The old system dropped user images on the way to the AI: every input must arrive."""
    with FakeHttpServer() as files:
        files.route("/person.png", body=fake_images.png(300, 400), headers={"Content-Type": "image/png"})
        # A lying header: the bytes are a JPEG. Sniffing decides, not the header.
        files.route("/shirt.jpg", body=fake_images.jpeg(200, 200), headers={"Content-Type": "text/plain"})
        async with FakeGemini(api_key="test-key") as fake:
            h = await gemini_harness(harness_factory, fake)
            user = await h.user(100)
            alpha_id = await h.upload(user, fake_images.png_with_alpha(120, 120))
            images = [ImageInput(url=files.url("/person.png")), ImageInput(url=files.url("/shirt.jpg")),
                      ImageInput(file_id=alpha_id)]
            async with h.worker():
                handle = await h.start(user, "fitting", images, prompt="a linen shirt")
                result = await handle.result()
            assert result.status == "completed" and result.model == PRIMARY
            (request,) = fake.requests
            assert request.model == PRIMARY and request.key_ok
            assert [i.mime_type for i in request.inline_images] == ["image/jpeg", "image/jpeg", "image/png"]
            assert all(i.size > 0 for i in request.inline_images)
            assert any("linen shirt" in t for t in request.texts)
    await assert_money(h, handle.id, Status.COMPLETED, h.settings.cost_fitting)


async def test_a_free_slot_comes_with_the_request_and_costs_the_generation_no_task(harness_factory):
    """Joining an empty line answers with the slot itself (the join_line update): no grant signal
    to wait for, and the AI call is scheduled by the same workflow task that joined the line."""
    async with FakeGemini(api_key="test-key") as fake:
        h = await gemini_harness(harness_factory, fake)
        user = await h.user(100)
        async with h.worker():
            handle = await h.start(user, "photography", await inputs(h, user, 1))
            result = await handle.result()
            history = await handle.fetch_history()
    assert result.status == "completed" and result.model == PRIMARY
    events = history.events
    assert not [e for e in events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED]
    joined = next(i for i, e in enumerate(events) if e.event_type == EventType.EVENT_TYPE_MARKER_RECORDED
                  and b"request_slot" in e.marker_recorded_event_attributes.SerializeToString())
    called = next(i for i, e in enumerate(events) if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
                  and e.activity_task_scheduled_event_attributes.activity_type.name == "call_ai")
    assert joined < called
    assert not [e for e in events[joined:called] if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED]
    await assert_money(h, handle.id, Status.COMPLETED, 10)


# ---- refused before any charge -------------------------------------------------------------


@pytest.mark.parametrize("key", ["images", "prompt", "model", "Images"])
async def test_reserved_parameter_keys_are_refused_before_any_charge(harness, key):
    h = harness
    user = await h.user(100)
    with pytest.raises(InvalidRequest, match="reserved"):
        h.request(user, "photography", [ImageInput(url="https://example.com/a.jpg")], parameters={key: "x"})
    # A request that skips the starter's check is refused by the workflow itself, uncharged.
    req = GenerationRequest(task_id=f"gen_{uuid.uuid4().hex}", user_id=user, kind="photography",
                            images=[ImageInput(file_id="fil_x")], parameters={key: "x"}, cost=10,
                            timeouts=h.timeouts)
    async with h.worker():
        result = await (await start_generation(h.client, req, task_queue=h.settings.task_queue)).result()
    assert result.status == "rejected" and result.error_code == "InvalidRequest"
    assert "reserved" in result.error
    await assert_money(h, req.task_id, Status.REJECTED, 10)
    assert await h.balance(user) == 100


async def test_insufficient_credits_rejected_nothing_charged_no_ai_call(harness_factory):
    async with FakeGemini(api_key="test-key") as fake:
        h = await gemini_harness(harness_factory, fake)
        user = await h.user(5)
        async with h.worker():
            handle = await h.start(user, "photography", await inputs(h, user, 1))
            result = await handle.result()
        assert result.status == "rejected" and result.error_code == "InsufficientCredits"
        assert fake.requests == []
    await assert_money(h, handle.id, Status.REJECTED, 10)
    assert await h.balance(user) == 5
    assert await works.work_for_task(h.engine, handle.id) is None


# ---- slow, failing, retried, falling back ---------------------------------------------------------


async def test_ai_call_slower_than_any_rpc_default_completes(harness_factory):
    """A 21 s AI call with a 5 s heartbeat timeout: heartbeats keep it alive; never failed."""
    async with FakeGemini(api_key="test-key") as fake:
        fake.plan(PRIMARY, [Reply.slow(21)])
        h = await gemini_harness(harness_factory, fake)
        user = await h.user(100)
        async with h.worker():
            handle = await h.start(user, "photography", await inputs(h, user, 1))
            result = await handle.result()
        assert result.status == "completed"
        assert len(fake.requests) == 1  # one call: no retry, no timeout
    await assert_money(h, handle.id, Status.COMPLETED, 10)


@pytest.mark.parametrize("reply,code", [
    (Reply.status(400, message="bad request"), "ProviderRejected"),
    (Reply.blocked("SAFETY"), "ContentBlocked"),
])
async def test_provider_fails_for_good_refunds_once(harness_factory, reply, code):
    async with FakeGemini(api_key="test-key") as fake:
        fake.default = reply
        h = await gemini_harness(harness_factory, fake)
        user = await h.user(100)
        async with h.worker():
            handle = await h.start(user, "photography", await inputs(h, user, 1))
            with pytest.raises(WorkflowFailureError) as failure:
                await handle.result()
        cause = failure.value.cause
        assert isinstance(cause, ApplicationError) and cause.type == code
        if code == "ContentBlocked":
            assert len(fake.requests) == 1  # blocked content: no retry, no other model
        else:
            assert {r.model for r in fake.requests} == {PRIMARY, SECONDARY}  # 400: next model tried too
    await assert_money(h, handle.id, Status.FAILED, 10)
    assert await h.ledger(handle.id) == (10, 10)
    assert await h.balance(user) == 100
    state = await read_generation(h.client, handle.id, engine=h.engine)
    assert state.view.status == "failed" and state.view.error["code"] == code
    assert (state.view.charged, state.view.refunded) == (10, 10)


async def test_rate_limited_then_success_charges_once(harness_factory):
    async with FakeGemini(api_key="test-key") as fake:
        fake.plan(PRIMARY, [Reply.status(429, retry_after=1), Reply.ok()])
        h = await gemini_harness(harness_factory, fake)
        user = await h.user(100)
        async with h.worker():
            handle = await h.start(user, "photography", await inputs(h, user, 1))
            result = await handle.result()
        assert result.status == "completed" and result.model == PRIMARY
        assert [r.model for r in fake.requests] == [PRIMARY, PRIMARY]
    await assert_money(h, handle.id, Status.COMPLETED, 10)


async def test_primary_model_down_falls_back_to_second(harness_factory):
    async with FakeGemini(api_key="test-key") as fake:
        fake.plan(PRIMARY, [Reply.status(503, retry_after=1)] * 3)
        h = await gemini_harness(harness_factory, fake)
        user = await h.user(100)
        async with h.worker():
            handle = await h.start(user, "photography", await inputs(h, user, 1))
            result = await handle.result()
        assert result.status == "completed" and result.model == SECONDARY
        assert [r.model for r in fake.requests] == [PRIMARY] * 3 + [SECONDARY]
    await assert_money(h, handle.id, Status.COMPLETED, 10)


async def test_a_corrupt_image_from_the_provider_is_retried_then_the_next_model_is_tried(harness_factory):
    """Issue 10 #8: a truncated PNG from the provider is the provider's failure (ProviderUnavailable,
    recorded in model health), never the user's BadImage: retried, then the next model."""
    async with FakeGemini(api_key="test-key") as fake:
        fake.plan(PRIMARY, [Reply.truncated()] * 3)
        h = await gemini_harness(harness_factory, fake)
        user = await h.user(100)
        async with h.worker():
            handle = await h.start(user, "photography", await inputs(h, user, 1))
            result = await handle.result()
        assert result.status == "completed" and result.model == SECONDARY, result
        assert [r.model for r in fake.requests] == [PRIMARY] * 3 + [SECONDARY]
        assert [r.reply for r in fake.requests] == ["truncated"] * 3 + ["ok"]
    assert await h.deps.blobs.get(result.images[0].key)
    async with h.engine.connect() as conn:
        from sqlalchemy import select

        from atelier.db import model_failures
        recorded = (await conn.execute(select(model_failures.c.model, model_failures.c.error_code))).all()
    assert [(r.model, r.error_code) for r in recorded] == [(PRIMARY, "ProviderUnavailable")] * 3
    await assert_money(h, handle.id, Status.COMPLETED, 10)


# ---- cancellation ------------------------------------------------------------------------------


async def test_cancel_during_ai_call_refunds_once(harness_factory):
    async with FakeGemini(api_key="test-key") as fake:
        fake.plan(PRIMARY, [Reply.hang()])
        h = await gemini_harness(harness_factory, fake)
        user = await h.user(100)
        async with h.worker():
            handle = await h.start(user, "photography", await inputs(h, user, 1))
            await fake.wait_for_requests(1, timeout_s=20)
            state = await read_generation(h.client, handle.id)
            assert state.view.stage == "generating" and state.view.status == "running"
            await handle.cancel()
            with pytest.raises(WorkflowFailureError) as failure:
                await handle.result()
        assert isinstance(failure.value.cause, CancelledError)
    assert await h.ledger(handle.id) == (10, 10)
    assert await h.balance(user) == 100
    state = await read_generation(h.client, handle.id, engine=h.engine)
    assert state.view.status == "canceled" and (state.view.charged, state.view.refunded) == (10, 10)


# ---- heartbeats of a long call ------------------------------------------------------------------


def test_a_waiting_call_beats_twice_per_throttle_window():
    """call_ai calls heartbeat() every 0.4 of its heartbeat timeout: the SDK sends one per 0.8 of
    it, so one is always held when a window ends; beating more often sends nothing more."""
    from datetime import timedelta

    from activities.heartbeat import UNTIMED_BEAT_S, beat_every

    assert beat_every(timedelta(seconds=50)) == pytest.approx(20.0)
    assert beat_every(timedelta(seconds=2)) == pytest.approx(0.8)
    assert beat_every(timedelta(milliseconds=100)) == pytest.approx(0.2)  # never a busy loop
    assert beat_every(None) == UNTIMED_BEAT_S


async def test_a_call_three_heartbeat_timeouts_long_completes_on_its_first_attempt(harness_factory):
    """The beats, throttled by the SDK, reach the server often enough: a call lasting three
    heartbeat timeouts is not mistaken for a dead worker (that would be a second provider call,
    paid for twice)."""
    async with FakeGemini(api_key="test-key") as fake:
        fake.plan(PRIMARY, [Reply.slow(4.5)])
        h = await gemini_harness(harness_factory, fake)
        h.timeouts.ai_heartbeat_s = 1.5
        user = await h.user(100)
        async with h.worker():
            handle = await h.start(user, "photography", await inputs(h, user, 1))
            result = await asyncio.wait_for(handle.result(), timeout=60)
        history = await handle.fetch_history()
    assert result.status == "completed"
    assert len(fake.requests) == 1
    started = [e.activity_task_started_event_attributes for e in history.events
               if e.HasField("activity_task_started_event_attributes")]
    timed_out = [e for e in history.events if e.HasField("activity_task_timed_out_event_attributes")]
    assert timed_out == [] and all(s.attempt == 1 for s in started)
    await assert_money(h, handle.id, Status.COMPLETED, 10)


# ---- a worker killed mid-call --------------------------------------------------------------------


async def test_worker_killed_during_ai_call_completes_once(harness_factory, temporal_address, tmp_path):
    async with FakeGemini(api_key="test-key") as fake:
        fake.plan(PRIMARY, [Reply.hang()])  # the first call never answers: its worker dies
        h = await gemini_harness(harness_factory, fake)
        h.timeouts.ai_heartbeat_s = 3  # a dead worker is noticed in seconds
        user = await h.user(100)
        env = h.process_env(temporal_address, ATELIER_AI_PROVIDER="gemini", GEMINI_API_KEY="test-key",
                            GEMINI_BASE_URL=fake.url, ATELIER_ALLOW_PRIVATE_URLS="1")
        log = open(tmp_path / "worker.log", "wb")
        worker_cmd = [os.sys.executable, "worker.py"]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        proc = await asyncio.create_subprocess_exec(*worker_cmd, cwd=root, env=env, stdout=log, stderr=log)
        try:
            handle = await h.start(user, "photography", await inputs(h, user, 1))
            await fake.wait_for_requests(1, timeout_s=30)
            proc.kill()  # SIGKILL: no goodbye
            await proc.wait()
            proc = await asyncio.create_subprocess_exec(*worker_cmd, cwd=root, env=env, stdout=log, stderr=log)
            result = await asyncio.wait_for(handle.result(), timeout=90)
        finally:
            if proc.returncode is None:
                proc.terminate()
                await asyncio.wait_for(proc.wait(), timeout=20)
            log.close()
        assert result.status == "completed"
        assert len(fake.requests) == 2  # the killed attempt, then the retry on the new worker
    await assert_money(h, handle.id, Status.COMPLETED, 10)
    work = await works.work_for_task(h.engine, handle.id)
    assert work is not None and work.id == result.work_id


# ---- history stays small ---------------------------------------------------------------------------


async def test_history_has_no_image_bytes(harness, client):
    h = harness
    user = await h.user(100)
    big = [noise_png(1700, 1700, seed=i) for i in range(2)]
    assert all(len(b) > 8_000_000 for b in big)
    with FakeHttpServer() as files:
        for i, data in enumerate(big):
            files.route(f"/big{i}.png", body=data, headers={"Content-Type": "image/png"})
        async with h.worker():
            handle = await h.start(user, "photography", [ImageInput(url=files.url(f"/big{i}.png")) for i in range(2)])
            result = await handle.result()
    assert result.status == "completed"
    history = await handle.fetch_history()
    size = len(history.to_json().encode())
    assert size < 64 * 1024, f"history is {size} bytes"


async def test_cancel_while_the_charge_is_in_flight_still_refunds(harness, monkeypatch):
    """A cancel that lands while the charge is committing: the charge settles first, then the
    refund finds it. (A refund that ran first would find nothing and the user would pay.)"""
    from temporalio import activity

    from activities.credits import CreditActivities

    entered = asyncio.Event()
    real_charge = CreditActivities.charge_credits

    @activity.defn(name="charge_credits")
    async def slow_charge(self, req: ChargeRequest) -> ChargeResult:
        entered.set()
        await asyncio.sleep(2.0)  # the cancel arrives now; the charge then commits regardless
        return await real_charge(self, req)

    monkeypatch.setattr(CreditActivities, "charge_credits", slow_charge)
    h = harness
    user = await h.user(100)
    async with h.worker():
        handle = await h.start(user, "photography", await inputs(h, user, 1))
        await asyncio.wait_for(entered.wait(), timeout=20)
        await handle.cancel()
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
    assert isinstance(failure.value.cause, CancelledError)
    assert await h.ledger(handle.id) == (10, 10)
    assert await h.balance(user) == 100


# ---- the steps before the AI call, side by side --------------------------------------------


def _scheduled(history, name: str):
    """The ActivityTaskScheduled events of activity `name`, in order."""
    return [e for e in history.events if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
            and e.activity_task_scheduled_event_attributes.activity_type.name == name]


def _ended(history, scheduled):
    """The event that ended the activity scheduled as `scheduled` (completed or failed)."""
    return next(e for e in history.events
                if (e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
                    and e.activity_task_completed_event_attributes.scheduled_event_id == scheduled.event_id)
                or (e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED
                    and e.activity_task_failed_event_attributes.scheduled_event_id == scheduled.event_id))


async def test_download_and_model_choice_start_beside_the_charge(harness):
    """One workflow task schedules the charge, the download of uploaded inputs and the model
    choice: a generation reaches its AI call sooner than when each waited for the one before it."""
    h = harness
    user = await h.user(100)
    async with h.worker():
        handle = await h.start(user, "photography", await inputs(h, user, 1))
        result = await handle.result()
        history = await handle.fetch_history()
    assert result.status == "completed"
    first = {name: _scheduled(history, name) for name in ("charge_credits", "download_and_convert", "select_model")}
    assert all(len(events) == 1 for events in first.values()), first
    tasks = {name: events[0].activity_task_scheduled_event_attributes.workflow_task_completed_event_id
             for name, events in first.items()}
    assert len(set(tasks.values())) == 1, tasks
    # ... and that task is the generation's first.
    completed = [e for e in history.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED]
    assert tasks["charge_credits"] == completed[0].event_id
    await assert_money(h, handle.id, Status.COMPLETED, 10)


async def test_a_download_that_fails_while_the_charge_commits_is_refunded_after_the_charge(harness, monkeypatch):
    """The download fails (an upload that does not exist: no retry) while the charge is still
    committing. The refund waits for the charge to settle, then gives it back: never a refund
    that finds nothing and a charge that lands after it."""
    from temporalio import activity

    from activities.credits import CreditActivities

    real_charge = CreditActivities.charge_credits

    @activity.defn(name="charge_credits")
    async def slow_charge(self, req: ChargeRequest) -> ChargeResult:
        await asyncio.sleep(2.0)  # the download fails meanwhile
        return await real_charge(self, req)

    monkeypatch.setattr(CreditActivities, "charge_credits", slow_charge)
    h = harness
    user = await h.user(100)
    async with h.worker():
        handle = await h.start(user, "photography", [ImageInput(file_id="fil_nosuchupload")])
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
        history = await handle.fetch_history()
    assert isinstance(failure.value.cause, ApplicationError) and failure.value.cause.type == "BadImage"
    [download] = _scheduled(history, "download_and_convert")
    [charge] = _scheduled(history, "charge_credits")
    [refund] = _scheduled(history, "refund_credits")
    download_ended, charge_ended = _ended(history, download), _ended(history, charge)
    assert download_ended.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED
    assert charge_ended.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
    assert download_ended.event_id < charge_ended.event_id < refund.event_id, (
        "the download failed first, and the refund was scheduled only after the charge had committed")
    assert await h.ledger(handle.id) == (10, 10)
    assert await h.balance(user) == 100


async def test_a_rejected_charge_drops_the_download_under_way(harness, monkeypatch):
    """Not enough credits (the balance fell after the API's check): the generation is rejected as
    soon as the charge says so, without waiting for the download started beside it, which is
    told to stop; nothing is charged and no AI is called."""
    from temporalio import activity

    from activities.images import ImageActivities

    stopped = asyncio.Event()

    @activity.defn(name="download_and_convert")
    async def endless_download(self, req: DownloadRequest) -> DownloadResult:
        try:
            for _ in range(600):  # 60 s at most; a cancel arrives with a heartbeat
                activity.heartbeat()
                await asyncio.sleep(0.1)
        except asyncio.CancelledError:
            stopped.set()
            raise
        raise ApplicationError("the download was never told to stop", non_retryable=True)

    monkeypatch.setattr(ImageActivities, "download_and_convert", endless_download)
    h = harness
    user = await h.user(5)  # a photography generation costs 10
    async with h.worker():
        handle = await h.start(user, "photography", await inputs(h, user, 1))
        result = await asyncio.wait_for(handle.result(), timeout=30)
        await asyncio.wait_for(stopped.wait(), timeout=30)
        history = await handle.fetch_history()
    assert result.status == "rejected" and result.error_code == "InsufficientCredits"
    assert result.error_stage == "charging"
    assert [e for e in history.events if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED]
    assert not _scheduled(history, "call_ai")
    await assert_money(h, handle.id, Status.REJECTED, 10)
    assert await h.balance(user) == 5


def test_a_describe_reports_the_earliest_of_the_steps_pending_side_by_side():
    """The server lists pending activities in no set order: whichever comes first, a generation
    whose charge is still pending reads as charging, and once it is done, as downloading."""
    import itertools

    from temporalio.api.common.v1 import ActivityType
    from temporalio.api.workflow.v1 import PendingActivityInfo

    from starter.service import earliest_pending

    def pending(*names: str) -> list[PendingActivityInfo]:
        return [PendingActivityInfo(activity_type=ActivityType(name=n)) for n in names]

    for order in itertools.permutations(["select_model", "download_and_convert", "charge_credits"]):
        assert earliest_pending(pending(*order)).activity_type.name == "charge_credits", order
    for order in itertools.permutations(["select_model", "download_and_convert"]):
        assert earliest_pending(pending(*order)).activity_type.name == "download_and_convert", order
    assert earliest_pending(pending("something_new", "call_ai")).activity_type.name == "call_ai"


async def test_with_no_worker_a_generation_stuck_before_its_call_reads_as_charging(harness, monkeypatch):
    """The worker goes away while the charge, the download and the model choice all run: the read
    falls back to describe, which lists the three pending, and says charging, not whichever the
    server happened to list first."""
    from temporalio import activity

    from activities.credits import CreditActivities
    from activities.images import ImageActivities
    from activities.models import ModelActivities

    entered: set[str] = set()

    async def hold(name: str):
        entered.add(name)
        await asyncio.sleep(60)  # the worker's shutdown cancels it
        raise ApplicationError("not cancelled", non_retryable=True)

    @activity.defn(name="charge_credits")
    async def charge(self, req: ChargeRequest) -> ChargeResult:
        return await hold("charge_credits")

    @activity.defn(name="download_and_convert")
    async def download(self, req: DownloadRequest) -> DownloadResult:
        return await hold("download_and_convert")

    @activity.defn(name="select_model")
    async def select(self, req: SelectModelRequest) -> ModelChoice:
        return await hold("select_model")

    monkeypatch.setattr(CreditActivities, "charge_credits", charge)
    monkeypatch.setattr(ImageActivities, "download_and_convert", download)
    monkeypatch.setattr(ModelActivities, "select_model", select)
    h = harness
    user = await h.user(100)
    async with h.worker():
        handle = await h.start(user, "photography", await inputs(h, user, 1))
        for _ in range(300):  # 30 s at most
            if len(entered) == 3:
                break
            await asyncio.sleep(0.1)
        assert len(entered) == 3, entered
    try:
        desc = await handle.describe()
        assert len(desc.raw_description.pending_activities) == 3
        state = await read_generation(h.client, handle.id)
        assert state.view.status == "running" and state.view.stage == "charging", state.view
    finally:
        await handle.terminate("test over")


async def test_inputs_given_by_url_are_fetched_only_once_the_charge_has_committed(harness):
    """Nothing is fetched from outside for a generation not yet paid for. A user whose balance
    falls short (here from the start: the API would refuse it, a burst beyond the balance would
    not) gets no download at all; a paid one fetches after its charge, beside its model choice."""
    h = harness
    with FakeHttpServer() as files:
        files.route("/me.jpg", body=fake_images.jpeg(200, 160), headers={"Content-Type": "image/jpeg"})
        poor, rich = await h.user(5), await h.user(100)
        async with h.worker():
            rejected = await h.start(poor, "photography", [ImageInput(url=files.url("/me.jpg"))])
            assert (await rejected.result()).status == "rejected"
            rejected_history = await rejected.fetch_history()
            assert files.requests == [], "a generation that was never paid for fetched its inputs"
            handle = await h.start(rich, "photography", [ImageInput(url=files.url("/me.jpg"))])
            result = await handle.result()
            history = await handle.fetch_history()
    assert not _scheduled(rejected_history, "download_and_convert")
    await assert_money(h, rejected.id, Status.REJECTED, 10)
    assert result.status == "completed" and len(files.requests) == 1
    [charge], [choice], [download] = (_scheduled(history, n) for n in ("charge_credits", "select_model",
                                                                       "download_and_convert"))
    first = charge.activity_task_scheduled_event_attributes.workflow_task_completed_event_id
    assert choice.activity_task_scheduled_event_attributes.workflow_task_completed_event_id == first
    charged = _ended(history, charge)
    assert charged.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
    assert download.event_id > charged.event_id
    await assert_money(h, handle.id, Status.COMPLETED, 10)
