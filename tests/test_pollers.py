"""ATELIER_TASK_QUEUE_POLLS: every worker keeps a fixed number of long polls open on each of its
task queues. The SDK's autoscaling pollers give their polls an 11 s deadline while tasks flow,
and on a loaded server a task handed to a poll whose deadline ran out is recorded as started yet
never reaches the worker: in bench.burst, 29 AI calls of 1,000 waited out their 55 s heartbeat
timeout that way (docs/benchmarks.md, issue 13, sixth pass). These tests pin the fixed pollers
and show a worker with the fewest polls the SDK allows still serves every step of a generation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from temporalio.worker import PollerBehaviorSimpleMaximum

from atelier.messages import Status
from atelier.settings import Settings
from tests.test_generation import assert_money, inputs
from worker import build_workers


def _polls(worker) -> tuple[object, object]:
    config = worker.config()
    return config["workflow_task_poller_behavior"], config["activity_task_poller_behavior"]


async def test_every_worker_polls_a_fixed_number_of_times_per_queue(harness_factory):
    shipped = await harness_factory()
    assert shipped.settings.task_queue_polls == 5
    workers = build_workers(shipped.client, shipped.deps)
    # main, admission and AI queues: every one of them, for workflow tasks and activities alike
    assert len(workers) == 3
    for worker in workers:
        for behavior in _polls(worker):
            assert isinstance(behavior, PollerBehaviorSimpleMaximum) and behavior.maximum == 5

    tuned = await harness_factory(task_queue_polls=3)
    for worker in build_workers(tuned.client, tuned.deps):
        for behavior in _polls(worker):
            assert isinstance(behavior, PollerBehaviorSimpleMaximum) and behavior.maximum == 3


def test_fewer_than_two_polls_are_refused():
    # With a workflow cache the SDK polls the worker's sticky queue beside the shared one.
    with pytest.raises(ValidationError, match="task_queue_polls"):
        Settings(task_queue_polls=1)


async def test_a_generation_completes_with_two_polls_per_queue(harness_factory):
    h = await harness_factory(task_queue_polls=2)
    user = await h.user(100)
    async with h.worker():
        handles = [await h.start(user, "photography", await inputs(h, user, 1)) for _ in range(3)]
        results = [await handle.result() for handle in handles]
    assert [r.status for r in results] == ["completed"] * 3
    for handle, result in zip(handles, results):
        assert result.work_id and h.deps.blobs.exists(result.images[0].key)
        await assert_money(h, handle.id, Status.COMPLETED, h.settings.cost_photography)
    assert await h.balance(user) == 100 - 3 * h.settings.cost_photography
