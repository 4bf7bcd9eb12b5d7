"""The model admission workflow on a real dev server, with stand-in generations (SlotProbe):
the limit holds, slots go in the fair order, waiting is visible, gone holders give their
slots back, and the state survives continue-as-new."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker

import workflows.admission as admission_module
from activities.admission import AdmissionActivities
from atelier.messages import AdmissionStatus, QueueUpdate, SlotRequest, admission_workflow_id
from tests.admission_probe import ProbeInput, ProbeResult, SlotProbe
from tests.api_fixtures import api_factory  # noqa: F401
from tests.conftest import wait_for
from workflows.admission import ModelAdmissionWorkflow

MODEL = "quota-model"


@contextlib.asynccontextmanager
async def world(harness):
    probe_queue = f"probe-{uuid.uuid4().hex[:8]}"
    async with harness.worker(), Worker(harness.client, task_queue=probe_queue, workflows=[SlotProbe]):
        yield probe_queue


async def probe(harness, queue: str, user: str, *, max_concurrent: int | None = 1, hold_s: float = 0.0,
                priority: str = "normal", enqueued_at: float | None = None, lease_s: float = 600.0,
                outcome: str = "ok", model: str = MODEL) -> WorkflowHandle:
    task_id = f"probe-{uuid.uuid4().hex[:10]}"
    request = SlotRequest(ticket=f"{task_id}:1", task_id=task_id, user_id=user, priority=priority, model=model,
                          enqueued_at=time.time() if enqueued_at is None else enqueued_at,
                          max_concurrent=max_concurrent, lease_s=lease_s)
    return await harness.client.start_workflow(
        SlotProbe.run, ProbeInput(request=request, admission_queue=harness.settings.task_queue, hold_s=hold_s,
                                  outcome=outcome),
        id=task_id, task_queue=queue, result_type=ProbeResult)


def admission(harness, model: str = MODEL) -> WorkflowHandle:
    return harness.client.get_workflow_handle(admission_workflow_id(model, harness.settings.task_queue))


async def status(harness, model: str = MODEL) -> AdmissionStatus:
    return await admission(harness, model).query(ModelAdmissionWorkflow.status)


async def waiting_count(harness, n: int, model: str = MODEL):
    async def check():
        try:
            s = await status(harness, model)
        except Exception:  # noqa: BLE001 - not started yet
            return False
        return s.waiting >= n
    await wait_for(check, timeout=30)


def max_overlap(results: list[ProbeResult]) -> int:
    events = sorted([(r.granted_at, 1) for r in results] + [(r.released_at, -1) for r in results],
                    key=lambda e: (e[0], e[1]))
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


async def test_burst_from_several_users_never_exceeds_the_limit_and_all_get_slots(harness):
    async with world(harness) as queue:
        handles = [await probe(harness, queue, f"user{i % 4}", max_concurrent=3, hold_s=0.4) for i in range(18)]
        results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 120)
        s = await status(harness)
    assert len(results) == 18 and s.granted == 18
    assert max_overlap(results) <= 3
    assert s.in_flight == 0 and s.waiting == 0


async def test_slots_go_by_lane_then_round_robin_then_fifo_and_positions_are_told(harness):
    async with world(harness) as queue:
        blocker = await probe(harness, queue, "blocker")
        await wait_for(lambda: blocker.query(SlotProbe.holding), timeout=30)
        base = time.time()
        waiting = {}
        for name, user, priority, offset in [("a0", "alice", "normal", 0), ("a1", "alice", "normal", 1),
                                             ("a2", "alice", "normal", 2), ("b0", "bob", "normal", 3),
                                             ("l0", "lena", "low", 4), ("h0", "hugo", "high", 5)]:
            waiting[name] = await probe(harness, queue, user, priority=priority, enqueued_at=base + offset, hold_s=0.2)
        await waiting_count(harness, 6)
        place: QueueUpdate = await admission(harness).query(ModelAdmissionWorkflow.position, waiting["a2"].id)
        assert place.position == 5 and place.model == MODEL
        await blocker.signal(SlotProbe.let_go)
        results = {name: await asyncio.wait_for(h.result(), 60) for name, h in waiting.items()}
    order = sorted(results, key=lambda name: results[name].granted_at)
    assert order == ["h0", "a0", "b0", "a1", "a2", "l0"]
    # Each waiting probe was told where it stood when it joined the line.
    assert all(r.updates and r.updates[0].position is not None for r in results.values())


async def test_a_holder_that_is_gone_gives_its_slot_back(harness_factory):
    harness = await harness_factory(admission_check_s=1.0)
    async with world(harness) as queue:
        holder = await probe(harness, queue, "u1")
        await wait_for(lambda: holder.query(SlotProbe.holding), timeout=30)
        waiter = await probe(harness, queue, "u2", hold_s=0.1)
        await waiting_count(harness, 1)
        await holder.terminate("test: the generation is gone")
        result = await asyncio.wait_for(waiter.result(), 60)
        s = await status(harness)
    assert result.granted_at > 0 and s.reclaimed >= 1 and s.in_flight == 0


async def test_a_lease_that_runs_out_gives_the_slot_back(harness):
    async with world(harness) as queue:
        holder = await probe(harness, queue, "u1", lease_s=1.0)
        await wait_for(lambda: holder.query(SlotProbe.holding), timeout=30)
        waiter = await probe(harness, queue, "u2", hold_s=0.1)
        result = await asyncio.wait_for(waiter.result(), 60)
        s = await status(harness)
        await holder.terminate("test over")
    assert result.granted_at > 0 and s.reclaimed == 1


async def test_429_lowers_the_limit(harness):
    async with world(harness) as queue:
        handles = [await probe(harness, queue, "u", max_concurrent=4, hold_s=0.2, outcome="busy") for _ in range(4)]
        await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 60)
        s = await status(harness)
    assert s.busy == 4 and s.limit == 2 and s.max_concurrent == 4


async def test_the_queue_survives_continue_as_new(harness):
    async with world(harness) as queue:
        # The first request starts the admission workflow; then shrink its history budget.
        first = await probe(harness, queue, "u0", max_concurrent=2, hold_s=0.1)
        await first.result()
        await admission(harness).terminate("restart with a small history budget")
        from atelier.messages import AdmissionState

        await harness.client.start_workflow(
            ModelAdmissionWorkflow.run, AdmissionState(model=MODEL, max_history_events=60),
            id=admission(harness).id, task_queue=harness.settings.task_queue)
        handles = [await probe(harness, queue, f"u{i % 3}", max_concurrent=2, hold_s=0.2) for i in range(16)]
        results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 120)
        s = await status(harness)
    assert len(results) == 16 and s.runs > 1 and s.granted == 16
    assert max_overlap(results) <= 2


async def test_metrics_show_calls_in_flight_waiting_and_the_limit_per_model(api_factory):
    api = await api_factory()
    harness = api.harness
    model = "local-studio"  # in the API's (default) catalogue
    async with world(harness) as queue:
        before = (await api.http.get("/metrics")).text
        assert f'atelier_model_calls_in_flight{{model="{model}"}} 0.0' in before
        holders = [await probe(harness, queue, f"u{i}", max_concurrent=2, model=model) for i in range(3)]
        await waiting_count(harness, 1, model)
        text = (await api.http.get("/metrics")).text
        for h in holders:
            await h.terminate("test over")
    assert f'atelier_model_calls_in_flight{{model="{model}"}} 2.0' in text
    assert f'atelier_model_generations_waiting{{model="{model}"}} 1.0' in text
    assert f'atelier_model_call_limit{{model="{model}"}} 2.0' in text


# ---- joining the line: the join_line update, and the signal it falls back to ----------------

def _signals(history, name: str) -> int:
    return sum(1 for e in history.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
               and e.workflow_execution_signaled_event_attributes.signal_name == name)


def _updates(history, name: str) -> int:
    return sum(1 for e in history.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
               and e.workflow_execution_update_accepted_event_attributes.accepted_request.input.name == name)


async def test_a_free_slot_comes_in_the_answer_and_a_full_line_answers_the_place(harness):
    async with world(harness) as queue:
        first = await probe(harness, queue, "u1", max_concurrent=1)
        await wait_for(lambda: first.query(SlotProbe.holding), timeout=30)
        second = await probe(harness, queue, "u2", max_concurrent=1, hold_s=0.1)
        await waiting_count(harness, 1)
        await first.signal(SlotProbe.let_go)
        held, waited = await asyncio.wait_for(asyncio.gather(first.result(), second.result()), 60)
        line = await admission(harness).fetch_history()
        first_history, second_history = await first.fetch_history(), await second.fetch_history()
        s = await status(harness)
    # The free slot was the answer itself: no grant signal, no task of the generation for it.
    assert _signals(first_history, "slot_granted") == 0 and held.granted_at > 0
    # The second joined a full line: told its place in the answer, granted by signal later.
    assert [u.position for u in waited.updates] == [1]
    assert _signals(second_history, "slot_granted") == 1 and waited.granted_at >= held.released_at
    assert _updates(line, "join_line") == 2 and _signals(line, "request_slot") == 0
    assert s.granted == 2 and s.granted_at_once == 1


async def test_an_unanswered_join_falls_back_to_the_signal(harness, monkeypatch):
    async def refused(self, workflow_id, req):
        raise RPCError("in-flight update limit reached (test)", RPCStatusCode.RESOURCE_EXHAUSTED, b"")

    monkeypatch.setattr(AdmissionActivities, "_join", refused)
    async with world(harness) as queue:
        handles = [await probe(harness, queue, f"u{i}", max_concurrent=1, hold_s=0.2) for i in range(3)]
        results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 60)
        line = await admission(harness).fetch_history()
        s = await status(harness)
    assert s.granted == 3 and s.granted_at_once == 0 and max_overlap(results) == 1
    assert _signals(line, "request_slot") == 3 and _updates(line, "join_line") == 0


async def test_a_grant_whose_answer_was_lost_is_signalled_again(harness, monkeypatch):
    join = AdmissionActivities._join
    lost: list[str] = []

    async def answer_lost(self, workflow_id, req):
        answer = await join(self, workflow_id, req)
        lost.append(req.ticket)
        raise RPCError(f"connection reset after the update (test; granted={answer.granted})",
                       RPCStatusCode.UNAVAILABLE, b"")

    monkeypatch.setattr(AdmissionActivities, "_join", answer_lost)
    async with world(harness) as queue:
        handles = [await probe(harness, queue, f"u{i}", max_concurrent=1, hold_s=0.2) for i in range(3)]
        results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 60)
        s = await status(harness)
        first_history = await handles[0].fetch_history()
    # Each request reached the line twice (the update, then the signal) and was taken once.
    assert len(lost) == 3 and s.granted == 3 and s.granted_at_once == 1 and max_overlap(results) == 1
    # The first was granted by the lost answer: its grant came again as a signal.
    assert _signals(first_history, "slot_granted") >= 1


async def test_the_line_continues_as_new_before_temporal_refuses_its_updates(harness, monkeypatch):
    monkeypatch.setattr(admission_module, "MAX_UPDATES_PER_RUN", 4)  # the workflow runs unsandboxed
    async with world(harness) as queue:
        handles = [await probe(harness, queue, f"u{i % 3}", max_concurrent=2, hold_s=0.1) for i in range(10)]
        results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 120)
        s = await status(harness)
    assert len(results) == 10 and s.granted == 10 and s.runs >= 2
    assert max_overlap(results) <= 2
