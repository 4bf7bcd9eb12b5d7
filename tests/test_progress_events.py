"""What the workflow tells while it runs: the events log behind the progress stream (every
visible change once, with an increasing sequence, a bar that never goes back), the AI attempts
it made, the named deadline timer and the current details an operator sees in the Temporal UI,
and validation limits that travel with the request."""

from __future__ import annotations

import dataclasses

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from atelier import validation
from atelier.errors import InvalidRequest
from atelier.messages import EventsRequest, GenerationRequest, ImageInput, ValidationLimits
from tests.fakes import images as fake_images
from tests.fakes.gemini_server import FakeGemini, Reply
from workflows.generation import GenerationWorkflow, WebhookDeliveryWorkflow

PRIMARY = "gemini-2.5-flash-image"


async def _photo(h, user: str) -> list[ImageInput]:
    return [ImageInput(file_id=await h.upload(user, fake_images.jpeg(320, 240)))]


async def test_the_events_log_has_every_stage_once_in_order_with_a_bar_that_never_goes_back(harness):
    h = harness
    user = await h.user(100)
    async with h.worker():
        handle = await h.start(user, "photography", await _photo(h, user))
        result = await handle.result()
        page = await handle.query(GenerationWorkflow.events, EventsRequest(after_seq=0))
        later = await handle.query(GenerationWorkflow.events, EventsRequest(after_seq=page.events[2].seq))
    seqs = [e.seq for e in page.events]
    assert seqs == sorted(set(seqs)) and seqs[0] >= 1
    assert seqs[-1] == page.progress.seq
    stages = [e.stage for e in page.events]
    collapsed = [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]
    assert collapsed == ["queued", "charging", "downloading", "selecting_model", "generating", "saving", "done"]
    percents = [e.percent for e in page.events]
    assert percents == sorted(percents) and percents[-1] == 100
    assert page.events[-1].status == "completed"
    # The result names the change that ended it: a stream can label its final event with no worker up.
    assert result.seq == next(e.seq for e in page.events if e.status == "completed")
    # Resuming after a sequence number gives exactly the events after it.
    assert [e.seq for e in later.events] == seqs[3:]


async def test_each_ai_attempt_is_recorded_and_a_failing_one_backs_off(harness_factory):
    async with FakeGemini(api_key="test-key") as fake:
        fake.plan(PRIMARY, [Reply.status(503, message="overloaded"), Reply.status(500, message="oops")])
        h = await harness_factory(ai_provider="gemini", gemini_api_key="test-key", gemini_base_url=fake.url)
        user = await h.user(100)
        async with h.worker():
            handle = await h.start(user, "photography", await _photo(h, user))
            result = await handle.result()
        assert len(fake.requests) == 3
    assert result.status == "completed"
    assert [a.outcome for a in result.attempts] == ["failed", "failed", "succeeded"]
    assert all(a.model == PRIMARY and a.started_at and a.ended_at for a in result.attempts)
    assert result.attempts[0].error_code == "ProviderUnavailable"
    # Each attempt is its own activity; the waits between them are named timers.
    timers = []
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_TIMER_STARTED:
            timers.append(event)
    summaries = [await _summary(h, t) for t in timers]
    assert any(s.startswith("Deadline: fail and refund at ") for s in summaries), summaries
    assert sum(1 for s in summaries if s.startswith(f"{PRIMARY} failed")) == 2, summaries
    assert await h.ledger(handle.id) == (10, 0)


async def _summary(h, event) -> str:
    payload = event.user_metadata.summary
    if not payload.data:
        return ""
    return h.client.data_converter.payload_converter.from_payload(payload, str)


async def test_the_generation_says_what_it_is_doing_in_the_temporal_ui(harness_factory):
    h = await harness_factory(local_ai_delay_s=30)
    user = await h.user(100)
    async with h.worker():
        handle = await h.start(user, "photography", await _photo(h, user))
        from tests.conftest import wait_for

        async def generating():
            p = await handle.query(GenerationWorkflow.progress)
            return p.stage == "generating"

        await wait_for(generating, timeout=20)
        metadata = await handle.query("__temporal_workflow_metadata")
        await handle.cancel()
    details = metadata.current_details if hasattr(metadata, "current_details") else metadata["currentDetails"]
    assert "photography" in details and "generating" in details and "local-studio" in details
    summary = await (await handle.describe()).static_summary() or ""
    assert "photography" in summary and user in summary


# ---- validation limits travel with the request ------------------------------------------------


def test_the_starter_records_the_current_limits_in_the_request(harness):
    req = harness.request("usr_x", "photography", [ImageInput(url="https://example.com/a.jpg")])
    assert req.limits == validation.CURRENT_LIMITS and req.limits is not validation.CURRENT_LIMITS


@pytest.mark.parametrize("key", [" prompt", "Images", "MODEL ", "\tprompt"])
def test_reserved_keys_are_refused_whatever_their_case_or_spacing(harness, key):
    with pytest.raises(InvalidRequest, match="reserved"):
        harness.request("usr_x", "photography", [ImageInput(url="https://example.com/a.jpg")],
                        parameters={key: "x"})


def test_old_requests_without_limits_keep_the_legacy_checks():
    # A history recorded before limits travelled: " prompt" was accepted then; replaying it must not reject.
    old = GenerationRequest(kind="photography", images=[ImageInput(url="https://example.com/a.jpg")],
                            parameters={" prompt": "x"})
    validation.validate_request(old)
    assert validation.LEGACY_LIMITS == ValidationLimits()


async def test_lowering_a_limit_cannot_break_a_running_workflow(harness, monkeypatch):
    """A long-prompt generation runs; the deploy that follows lowers the prompt limit. Its history
    must still replay: the workflow checks the limits it started with, recorded in its input."""
    h = harness
    user = await h.user(100)
    prompt = "p" * 3000
    async with h.worker():
        handle = await h.start(user, "photography", await _photo(h, user), prompt=prompt)
        result = await handle.result()
    assert result.status == "completed"
    history = await handle.fetch_history()
    lowered = dataclasses.replace(validation.CURRENT_LIMITS, max_prompt_chars=100)
    monkeypatch.setattr(validation, "CURRENT_LIMITS", lowered)
    monkeypatch.setattr(validation, "LEGACY_LIMITS", lowered)
    replay = await Replayer(workflows=[GenerationWorkflow, WebhookDeliveryWorkflow]).replay_workflow(
        WorkflowHistory.from_json(handle.id, history.to_json()), raise_on_replay_failure=False)
    assert replay.replay_failure is None
    # And a new request is checked against the new limit.
    with pytest.raises(InvalidRequest, match="prompt"):
        h.request(user, "photography", [ImageInput(url="https://example.com/a.jpg")], prompt=prompt)


# ---- webhook events --------------------------------------------------------------------------


async def test_started_progress_and_completed_webhooks_each_once_with_their_own_ids(harness):
    import asyncio

    from tests.conftest import wait_for
    from tests.fakes.webhook_receiver import WebhookReceiver

    h = harness
    user = await h.user(100)
    with WebhookReceiver(h.settings.webhook_secret.get_secret_value()) as receiver:
        async with h.worker():
            handle = await h.start(user, "photography", await _photo(h, user), webhook_url=receiver.url,
                                   webhook_events=["started", "progress", "completed"])
            await handle.result()

            async def all_in():
                types = [d.payload["type"] for d in receiver.deliveries if d.verified]
                return "generation.completed" in types and len(types) >= 5

            await wait_for(all_in, timeout=30)
            await asyncio.sleep(1)  # a duplicate would show up now
        deliveries = [d for d in receiver.deliveries if d.succeeded]
    assert all(d.verified for d in deliveries)
    types = [d.payload["type"] for d in deliveries]
    assert types.count("generation.started") == 1 and types.count("generation.completed") == 1
    stages = [d.payload["data"]["stage"] for d in deliveries if d.payload["type"] == "generation.progress"]
    assert {"downloading", "selecting_model", "generating", "saving"} <= set(stages)
    assert len(stages) == len(set(stages))
    ids = [d.headers["webhook-id"] for d in deliveries]
    assert len(ids) == len(set(ids))  # one message per event; a retry would repeat its own id


async def test_only_the_completed_webhook_by_default(harness):
    from tests.fakes.webhook_receiver import WebhookReceiver
    import asyncio

    h = harness
    user = await h.user(100)
    with WebhookReceiver(h.settings.webhook_secret.get_secret_value()) as receiver:
        async with h.worker():
            handle = await h.start(user, "photography", await _photo(h, user), webhook_url=receiver.url)
            await handle.result()
            await asyncio.to_thread(receiver.wait_for_success, timeout=30)
            await asyncio.sleep(1)
    assert [d.payload["type"] for d in receiver.deliveries] == ["generation.completed"]


def test_unknown_webhook_events_are_refused(harness):
    with pytest.raises(InvalidRequest, match="webhook_events"):
        harness.request("usr_x", "photography", [ImageInput(url="https://example.com/a.jpg")],
                        webhook_url="https://example.com/hook", webhook_events=["completed", "finished"])
