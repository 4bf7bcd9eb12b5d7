"""ATELIER_WORKFLOW_SANDBOX: the workers run the workflows outside the SDK's sandbox by default
(the sandbox re-imports a workflow's module for every new instance and proxies its calls: a third
of the worker's CPU in a burst); turned on, they run in it. Either way the sandbox guards the
code: every test worker but these runs in it (tests/conftest.py), every recorded history replays
under both runners (tests/test_replay.py), and a non-deterministic call is caught by it."""

from __future__ import annotations

import pytest
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from atelier.messages import Status
from atelier.settings import Settings
from tests.clock_reading_workflow import ClockReadingGenerationWorkflow
from tests.fakes.gemini_server import FakeGemini, Reply
from tests.test_generation import assert_money, gemini_harness, inputs
from tests.test_replay import load
from workflows.generation import WebhookDeliveryWorkflow
from worker import build_workers


def _runner(worker):
    return worker.config()["workflow_runner"]


def test_the_workers_ship_outside_the_sandbox():
    assert Settings.model_fields["workflow_sandbox"].default is False


async def test_workers_run_the_workflows_outside_the_sandbox_unless_it_is_turned_on(harness_factory):
    shipped = await harness_factory(workflow_sandbox=False)
    main, _ = build_workers(shipped.client, shipped.deps, only="main")
    assert isinstance(_runner(main), UnsandboxedWorkflowRunner)
    checked = await harness_factory(workflow_sandbox=True)
    main, _ = build_workers(checked.client, checked.deps, only="main")
    assert isinstance(_runner(main), SandboxedWorkflowRunner)
    # Every other test worker runs in the sandbox (tests/conftest.py).
    assert (await harness_factory()).settings.workflow_sandbox is True


async def test_a_generation_completes_outside_the_sandbox(harness_factory):
    h = await harness_factory(workflow_sandbox=False)
    user = await h.user(100)
    async with h.worker():
        handle = await h.start(user, "fitting", await inputs(h, user, 2), prompt="soft light")
        result = await handle.result()
    assert result.status == "completed" and result.work_id and h.deps.blobs.exists(result.images[0].key)
    await assert_money(h, handle.id, Status.COMPLETED, h.settings.cost_fitting)
    assert await h.balance(user) == 100 - h.settings.cost_fitting


async def test_a_failed_generation_refunds_outside_the_sandbox(harness_factory):
    async with FakeGemini(api_key="test-key") as fake:
        fake.default = Reply.status(400, message="bad request")
        h = await gemini_harness(harness_factory, fake, workflow_sandbox=False)
        user = await h.user(100)
        async with h.worker():
            handle = await h.start(user, "photography", await inputs(h, user, 1))
            with pytest.raises(WorkflowFailureError) as failure:
                await handle.result()
    assert isinstance(failure.value.cause, ApplicationError) and failure.value.cause.type == "ProviderRejected"
    assert await h.ledger(handle.id) == (10, 10) and await h.balance(user) == 100


async def test_the_sandbox_catches_a_clock_read_that_the_unsandboxed_runner_lets_through():
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
