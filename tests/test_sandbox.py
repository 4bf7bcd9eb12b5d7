"""The workers run the workflows outside the SDK's sandbox (it re-imports a workflow's module for
every new instance and proxies its calls: a fifth of the worker's CPU in a burst). The sandbox
still guards the code: a generation runs in it here, every recorded history replays in it
(tests/test_replay.py), and a non-deterministic call is still caught by it."""

from __future__ import annotations

import pytest
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from atelier.messages import Status
from tests.clock_reading_workflow import ClockReadingGenerationWorkflow
from tests.fakes.gemini_server import FakeGemini, Reply
from tests.test_generation import assert_money, gemini_harness, inputs
from tests.test_replay import load
from workflows.generation import WebhookDeliveryWorkflow
from worker import build_workers


def _runner(worker):
    return worker.config()["workflow_runner"]


async def test_workers_run_the_workflows_unsandboxed_unless_the_sandbox_is_asked_for(harness_factory):
    shipped = await harness_factory()
    main, admission = build_workers(shipped.client, shipped.deps, only="main")
    assert isinstance(_runner(main), UnsandboxedWorkflowRunner)
    assert isinstance(_runner(admission), UnsandboxedWorkflowRunner)
    sandboxed = await harness_factory(workflow_sandbox=True)
    main, _ = build_workers(sandboxed.client, sandboxed.deps, only="main")
    assert isinstance(_runner(main), SandboxedWorkflowRunner)


async def test_a_generation_completes_in_the_sandbox(harness_factory):
    h = await harness_factory(workflow_sandbox=True)
    user = await h.user(100)
    async with h.worker():
        handle = await h.start(user, "fitting", await inputs(h, user, 2), prompt="soft light")
        result = await handle.result()
    assert result.status == "completed" and result.work_id and h.deps.blobs.exists(result.images[0].key)
    await assert_money(h, handle.id, Status.COMPLETED, h.settings.cost_fitting)
    assert await h.balance(user) == 100 - h.settings.cost_fitting


async def test_a_failed_generation_refunds_in_the_sandbox(harness_factory):
    async with FakeGemini(api_key="test-key") as fake:
        fake.default = Reply.status(400, message="bad request")
        h = await gemini_harness(harness_factory, fake, workflow_sandbox=True)
        user = await h.user(100)
        async with h.worker():
            handle = await h.start(user, "photography", await inputs(h, user, 1))
            with pytest.raises(WorkflowFailureError) as failure:
                await handle.result()
    assert isinstance(failure.value.cause, ApplicationError) and failure.value.cause.type == "ProviderRejected"
    assert await h.ledger(handle.id) == (10, 10) and await h.balance(user) == 100


async def test_the_sandbox_still_catches_a_clock_read_that_the_unsandboxed_runner_lets_through():
    history = load("success")
    caught = await Replayer(workflows=[ClockReadingGenerationWorkflow, WebhookDeliveryWorkflow],
                            workflow_runner=SandboxedWorkflowRunner()).replay_workflow(
        history, raise_on_replay_failure=False)
    assert caught.replay_failure is not None and "datetime.datetime.now" in str(caught.replay_failure), \
        caught.replay_failure
    unguarded = await Replayer(workflows=[ClockReadingGenerationWorkflow, WebhookDeliveryWorkflow],
                               workflow_runner=UnsandboxedWorkflowRunner()).replay_workflow(
        history, raise_on_replay_failure=False)
    assert unguarded.replay_failure is None
