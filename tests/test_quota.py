"""Provider quotas end to end: real workflows, the real admission workflow, the fake Gemini in
quota mode. A burst waits its turn instead of failing, a 429 is a wait, and no user waits
behind another's backlog."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atelier.messages import GenerationResult, ImageInput, Stage, admission_workflow_id
from starter.service import read_generation
from tests.conftest import wait_for
from tests.fakes import images as fake_images
from tests.fakes.gemini_server import FakeGemini, Reply
from workflows.admission import ModelAdmissionWorkflow

MODEL = "quota-image-model"
ROOT = Path(__file__).resolve().parent.parent


def catalogue(tmp_path, **quota) -> str:
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": [{"name": MODEL, "provider": "gemini", "priority": 1, "cost": 1, **quota}]}))
    return str(path)


async def quota_harness(harness_factory, tmp_path, fake: FakeGemini, **quota):
    return await harness_factory(ai_provider="gemini", gemini_api_key="test-key", gemini_base_url=fake.url,
                                 model_catalogue=catalogue(tmp_path, **quota))


async def photo(h, user_id: str) -> list[ImageInput]:
    return [ImageInput(file_id=await h.upload(user_id, fake_images.jpeg(320, 240)))]


async def admission_status(h):
    handle = h.client.get_workflow_handle(admission_workflow_id(MODEL, h.settings.task_queue))
    return await handle.query(ModelAdmissionWorkflow.status)


async def test_a_burst_of_ten_times_the_quota_all_completes_within_the_quota(harness_factory, tmp_path):
    n = 3
    async with FakeGemini(api_key="test-key") as fake:
        fake.set_quota(max_in_flight=n, call_s=0.5, retry_after="1")
        h = await quota_harness(harness_factory, tmp_path, fake, max_concurrent=n)
        users = [await h.user(1000) for _ in range(4)]
        images = {u: await photo(h, u) for u in users}
        async with h.worker():
            handles = [await h.start(users[i % 4], "photography", images[users[i % 4]]) for i in range(10 * n)]
            results: list[GenerationResult] = await asyncio.wait_for(
                asyncio.gather(*(handle.result() for handle in handles)), 300)
            status = await admission_status(h)
        stats = fake.quota_stats()
    assert [r.status for r in results] == ["completed"] * (10 * n)
    assert stats.max_in_flight_seen <= n and stats.busy_answers <= n
    assert status.granted >= 10 * n and status.in_flight == 0 and status.waiting == 0
    for handle in handles:
        assert await h.ledger(handle.id) == (10, 0)


async def test_eight_429s_in_a_row_delay_one_generation_that_completes_charged_once(harness_factory, tmp_path):
    async with FakeGemini(api_key="test-key") as fake:
        fake.plan(MODEL, [Reply.status(429, retry_after="0.1", message="Resource has been exhausted")] * 8
                  + [Reply.ok()])
        h = await quota_harness(harness_factory, tmp_path, fake, max_concurrent=4)
        user = await h.user(100)
        async with h.worker():
            handle = await h.start(user, "photography", await photo(h, user))
            result: GenerationResult = await asyncio.wait_for(handle.result(), 120)
            status = await admission_status(h)
    assert result.status == "completed" and result.model == MODEL
    assert [r.reply for r in fake.requests_for(MODEL)] == ["status"] * 8 + ["ok"]
    assert [a.outcome for a in result.attempts][-1] == "succeeded"
    assert sum(a.outcome == "busy" for a in result.attempts) >= 1
    assert await h.ledger(handle.id) == (10, 0) and await h.balance(user) == 90
    # The provider said 429 below the declared quota: the admission learned a lower limit.
    assert status.busy == 8 and status.limit < 4 and status.in_flight == 0


async def test_one_users_backlog_does_not_hold_up_the_others(harness_factory, tmp_path):
    async with FakeGemini(api_key="test-key") as fake:
        fake.set_quota(max_in_flight=2, call_s=0.5)
        h = await quota_harness(harness_factory, tmp_path, fake, max_concurrent=2)
        heavy = await h.user(1000)
        light = [await h.user(100) for _ in range(4)]
        async with h.worker():
            heavy_images = await photo(h, heavy)
            began = time.monotonic()
            backlog = [await h.start(heavy, "photography", heavy_images, prompt=f"heavy {i}") for i in range(40)]
            await wait_for(lambda: _waiting_at_least(h, 10), timeout=60)
            # While the backlog waits, a generation of it shows where it stands (the last one
            # submitted may still be downloading its input on a loaded machine: wait for it).
            async def last_waiting():
                s = await read_generation(h.client, backlog[-1].id, admission_queue=h.settings.task_queue)
                return s if s.view.stage == Stage.WAITING_FOR_MODEL.value else None

            state = await wait_for(last_waiting, timeout=60)
            assert state.view.model == MODEL
            assert isinstance(state.view.queue_position, int) and state.view.queue_position > 1
            light_began = time.monotonic()
            others = [await h.start(u, "photography", await photo(h, u), prompt=f"light {i}")
                      for i, u in enumerate(light)]
            light_done = await asyncio.wait_for(asyncio.gather(*(o.result() for o in others)), 120)
            light_took = time.monotonic() - light_began
            heavy_done = await asyncio.wait_for(asyncio.gather(*(b.result() for b in backlog)), 300)
            heavy_took = time.monotonic() - began
    assert all(r.status == "completed" for r in light_done + heavy_done)
    assert light_took < heavy_took / 2, (light_took, heavy_took)
    # In the provider's own order: each light generation got one of the next few slots.
    order = [r.texts[0] for r in fake.requests_for(MODEL) if r.reply == "ok"]
    light_places = [i for i, text in enumerate(order) if "Instructions from the user: light" in text]
    heavy_before_light = sum(1 for text in order[:max(light_places)] if "user: heavy" in text)
    assert len(light_places) == 4 and heavy_before_light < 40 - 10, (light_places, heavy_before_light)
    assert fake.quota_stats().max_in_flight_seen <= 2


async def _waiting_at_least(h, n: int) -> bool:
    try:
        return (await admission_status(h)).waiting >= n
    except Exception:  # noqa: BLE001 - the admission workflow is not up yet
        return False


@pytest.mark.timeout(300)
async def test_a_worker_killed_holding_slots_gives_them_back_and_the_quota_holds(harness_factory, tmp_path,
                                                                                 temporal_address):
    n = 2
    async with FakeGemini(api_key="test-key") as fake:
        # Calls shorter than the heartbeat timeout: a killed worker's calls end at the provider
        # before their retries can start, as a real provider's would be counted.
        fake.set_quota(max_in_flight=n, call_s=1.5)
        h = await quota_harness(harness_factory, tmp_path, fake, max_concurrent=n)
        users = [await h.user(100) for _ in range(3)]
        images = {u: await photo(h, u) for u in users}
        env = h.process_env(temporal_address, ATELIER_AI_PROVIDER="gemini", GEMINI_API_KEY="test-key",
                            GEMINI_BASE_URL=fake.url, ATELIER_MODEL_CATALOGUE=h.settings.model_catalogue.as_posix())
        first = subprocess.Popen([sys.executable, "worker.py"], cwd=ROOT, env=env, start_new_session=True,
                                 stdout=open(tmp_path / "worker1.log", "wb"), stderr=subprocess.STDOUT)
        second = None
        try:
            handles = [await h.start(users[i % 3], "photography", images[users[i % 3]]) for i in range(6)]
            await wait_for(lambda: _in_flight_at_provider(fake, n), timeout=60)
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
            second = subprocess.Popen([sys.executable, "worker.py"], cwd=ROOT, env=env, start_new_session=True,
                                      stdout=open(tmp_path / "worker2.log", "wb"), stderr=subprocess.STDOUT)
            results = await asyncio.wait_for(asyncio.gather(*(x.result() for x in handles)), 240)
            status = await admission_status(h)
        finally:
            for proc in (first, second):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    proc.wait(timeout=30)
        stats = fake.quota_stats()
    assert [r.status for r in results] == ["completed"] * 6
    assert any(a.outcome == "timed_out" for r in results for a in r.attempts)  # the killed calls
    assert stats.max_in_flight_seen <= n and stats.busy_answers == 0
    assert status.in_flight == 0 and status.waiting == 0
    for handle in handles:
        assert await h.ledger(handle.id) == (10, 0)


async def _in_flight_at_provider(fake: FakeGemini, n: int) -> bool:
    return fake.quota_stats().in_flight >= n


async def test_a_grant_applied_before_the_generation_asks_is_kept(harness_factory, tmp_path):
    """After a timed-out workflow task, the grant signal can be applied in the same task as the
    step before the request, i.e. before the code that asks has run again. It must be kept, not
    sent back as a stray: sending it back left the generation waiting for ever."""
    from atelier.messages import SlotGrant
    from tests.fakes.http_server import FakeHttpServer

    async with FakeGemini(api_key="test-key") as fake:
        h = await quota_harness(harness_factory, tmp_path, fake, max_concurrent=2)
        user = await h.user(100)
        images = FakeHttpServer().start()
        try:
            images.route("/slow.jpg", body=fake_images.jpeg(320, 240), delay_s=3.0,
                         headers={"Content-Type": "image/jpeg"})
            async with h.worker():
                # The model's admission workflow runs already (a generation before this one).
                first = await h.start(user, "photography", await photo(h, user))
                assert (await asyncio.wait_for(first.result(), 60)).status == "completed"
                handle = await h.start(user, "photography", [ImageInput(url=images.url("/slow.jpg"))])
                # While it downloads: the grant for its first request arrives early.
                await handle.signal("slot_granted", SlotGrant(ticket=f"{handle.id}:1", model=MODEL))
                result = await asyncio.wait_for(handle.result(), 90)
        finally:
            images.stop()
    assert result.status == "completed"
    assert await h.ledger(handle.id) == (10, 0)


def _signals_sent(history) -> list[str]:
    """The signal names a workflow's history shows it sending with a signal command."""
    from temporalio.api.enums.v1 import EventType

    return [e.signal_external_workflow_execution_initiated_event_attributes.signal_name for e in history.events
            if e.event_type == EventType.EVENT_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED]


async def test_the_ai_call_gives_its_slot_back_itself_and_admission_has_its_own_queue(harness_factory, tmp_path):
    """The hand-over of a slot, shortened: the AI activity releases its slot the moment the
    provider answers (no release command, no extra task of the generation), and the admission
    workflow runs on a task queue of its own (its tasks never wait behind generation tasks)."""
    from atelier.messages import admission_task_queue

    async with FakeGemini(api_key="test-key") as fake:
        fake.set_quota(max_in_flight=1, call_s=0.3, retry_after="1")
        h = await quota_harness(harness_factory, tmp_path, fake, max_concurrent=1)
        user = await h.user(100)
        images = await photo(h, user)
        async with h.worker():
            handles = [await h.start(user, "photography", images, prompt=f"one of four {i}") for i in range(4)]
            results = await asyncio.wait_for(asyncio.gather(*(x.result() for x in handles)), 120)
            status = await admission_status(h)
            admission = h.client.get_workflow_handle(admission_workflow_id(MODEL, h.settings.task_queue))
            admission_queue = (await admission.describe()).task_queue
            histories = [await x.fetch_history() for x in handles]
        stats = fake.quota_stats()
    assert [r.status for r in results] == ["completed"] * 4
    assert stats.max_in_flight_seen == 1 and stats.busy_answers == 0
    assert status.granted == 4 and status.in_flight == 0 and status.waiting == 0
    # The durations the estimate averages came from the activity (the provider's own time).
    assert status.mean_call_s is not None and 0.3 <= status.mean_call_s < 5
    for history in histories:
        assert "release_slot" not in _signals_sent(history)
    assert admission_queue == admission_task_queue(h.settings.task_queue) != h.settings.task_queue
    for handle in handles:
        assert await h.ledger(handle.id) == (10, 0)


async def test_a_release_the_ai_call_cannot_deliver_is_left_to_the_workflow(harness_factory, tmp_path):
    """When the AI activity cannot reach the admission workflow, the call still succeeds and says
    it did not release the slot: the workflow releases it (and the lease stays behind that)."""
    from temporalio.testing import ActivityEnvironment

    from activities.ai import AiActivities
    from atelier.messages import AiRequest
    from atelier.providers.base import GeneratedImage

    class OneImage:
        name = "stub"

        async def generate(self, request):
            return [GeneratedImage(data=fake_images.png(64, 64), mime_type="image/png")]

        async def aclose(self):
            return None

    h = await harness_factory()
    user = await h.user(0)
    stored = await h.store(fake_images.jpeg(64, 48))
    request = AiRequest(task_id="t-release", user_id=user, kind="photography", model="m", provider="stub",
                        prompt="p", images=[stored], slot_ticket="t-release:1",
                        admission_workflow_id="admission-no-such-model@nowhere")
    env = ActivityEnvironment()
    with_client = await env.run(AiActivities(h.engine, h.deps.blobs, {"stub": OneImage()}, h.client).call_ai, request)
    without_client = await env.run(AiActivities(h.engine, h.deps.blobs, {"stub": OneImage()}).call_ai, request)
    assert len(with_client.images) == 1 and with_client.slot_released is False
    assert len(without_client.images) == 1 and without_client.slot_released is False


async def test_a_canceled_call_keeps_its_slot_until_it_has_stopped(harness_factory, tmp_path):
    """Cancel a generation while its AI call runs: the next one in line must not call the
    provider until the canceled call's activity has stopped (before, the slot went to the next
    at once while the first call ran on until its heartbeat brought the cancel)."""
    from temporalio.api.enums.v1 import EventType
    from temporalio.client import WorkflowFailureError

    async with FakeGemini(api_key="test-key") as fake:
        fake.plan(MODEL, [Reply.slow(20.0), Reply.ok()])
        h = await quota_harness(harness_factory, tmp_path, fake, max_concurrent=1)
        # The activity hears a cancel with its next heartbeat sent, up to 8 s (0.8 of this) later:
        # a window the next call in line could start in.
        h.timeouts.ai_heartbeat_s = 10.0
        user = await h.user(100)
        images = await photo(h, user)
        async with h.worker():
            first = await h.start(user, "photography", images, prompt="the one canceled")
            await fake.wait_for_requests(1, timeout_s=60)
            second = await h.start(user, "photography", images, prompt="the one waiting")
            await wait_for(lambda: _waiting_at_least(h, 1), timeout=60)
            await first.cancel()
            with pytest.raises(WorkflowFailureError):
                await asyncio.wait_for(first.result(), 60)
            result = await asyncio.wait_for(second.result(), 60)
            history = await first.fetch_history()
    def at(e) -> float:
        return e.event_time.seconds + e.event_time.nanos / 1e9

    ai_calls = {e.event_id for e in history.events if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
                and e.activity_task_scheduled_event_attributes.activity_type.name == "call_ai"}
    ends = {EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED: "activity_task_canceled_event_attributes",
            EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT: "activity_task_timed_out_event_attributes",
            EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED: "activity_task_failed_event_attributes",
            EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED: "activity_task_completed_event_attributes"}
    stopped = [at(e) for e in history.events if e.event_type in ends
               and getattr(e, ends[e.event_type]).scheduled_event_id in ai_calls]
    calls = fake.requests_for(MODEL)
    assert result.status == "completed" and len(calls) == 2
    assert len(ai_calls) == 1 and stopped, "the canceled generation ended before its AI call stopped"
    # Server and fake share this machine's clock; 0.25 s of slack for the two clocks' reading.
    assert calls[1].at >= stopped[-1] - 0.25, (calls[1].at, stopped)
    assert await h.ledger(first.id) == (10, 10) and await h.ledger(second.id) == (10, 0)
