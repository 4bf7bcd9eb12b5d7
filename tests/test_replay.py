"""Replay: recorded histories must replay against the current workflow code.

This is the gate for every workflow change: if a change alters the commands an old history
issued, replay fails here, and the change needs `workflow.patched()`.

Re-record the histories (after an intended, patched change) with:

    ATELIER_RECORD_HISTORIES=1 .venv/bin/python -m pytest tests/test_replay.py -k record
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from temporalio.client import WorkflowFailureError, WorkflowHistory
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from atelier.messages import ImageInput
from tests.fakes import images as fake_images
from tests.fakes.gemini_server import FakeGemini, Reply
from tests.reordered_workflow import ReorderedGenerationWorkflow
from workflows.admission import ModelAdmissionWorkflow
from workflows.generation import GenerationWorkflow, WebhookDeliveryWorkflow

HISTORIES = Path(__file__).parent / "histories"
REQUIRED = ["success", "failure_refund", "cancellation", "model_fallback", "rejected", "success_webhook",
            "deadline", "ai_retry", "webhook_events", "success_url"]
# Histories kept from before a patch: each folder holds the required set of its day.
OLD_GENERATIONS = {"v1": 6, "v2": 6, "v3": 6, "v4": 9, "v5": 9, "v6": 9, "v7": 9}
PRIMARY = "gemini-2.5-flash-image"


def load(name: str) -> WorkflowHistory:
    path = HISTORIES / f"{name}.json"
    return WorkflowHistory.from_json(path.stem, path.read_text())


# The waiting path of model admission (recorded by test_record_admission_histories): a generation
# that waited in line, one that waited out 429s, one canceled in line, and the admission workflow.
# admission/ before the model-admission-local-request patch, admission/local/ after it,
# admission/released/ since the AI activity gives its slot back itself (no release signal command
# after a call that did; the admission workflow on its own task queue), admission/current/ since the
# generation-2026-11 patch bundle (one patch marker), admission/answered/ since the line is joined by
# the join_line update, whose answer carries a free slot (the same commands: no patch),
# admission/parallel/ since the generation-2026-12 bundle (the model choice, and the download of
# uploads, beside the charge).
ADMISSION_HISTORIES = [f"{folder}/{name}" for folder in ("admission", "admission/local", "admission/released",
                                                          "admission/current", "admission/answered",
                                                          "admission/parallel")
                       for name in ("waited_in_line", "busy_then_ok", "canceled_in_line", "admission_workflow")]


def test_admission_histories_are_recorded():
    missing = [n for n in ADMISSION_HISTORIES if not (HISTORIES / f"{n}.json").is_file()]
    assert not missing, f"record them: ATELIER_RECORD_HISTORIES=1 pytest tests/test_replay.py -k record ({missing})"


def test_every_required_history_is_recorded():
    missing = [n for n in REQUIRED if not (HISTORIES / f"{n}.json").is_file()]
    assert not missing, f"record them: ATELIER_RECORD_HISTORIES=1 pytest tests/test_replay.py -k record ({missing})"


# Every history ever recorded: tests/histories/*.json from the current code, and older
# generations kept in subfolders (v1/: before the save-work-survives-cancel patch; v2/: before
# charge-settles-before-cancel; v3/: before explicit-deadline and ai-attempts-in-workflow; v4/: before
# model-admission; v5/: before the generation-2026-11 bundle, each patch its own marker; v6/: before
# the join_line update, when every grant came as a signal, no patch needed; v7/: before the
# generation-2026-12 bundle, when the download waited for the charge and the model choice for the
# download). Old
# histories must keep replaying for as long as such workflows may still be open.
ALL_HISTORIES = sorted(HISTORIES.rglob("*.json"))


# Workers run the workflows in the sandbox unless ATELIER_WORKFLOW_SANDBOX=false (worker.py): every
# history replays in both (tests/test_sandbox.py proves the sandbox catches what the other misses).
RUNNERS = {"unsandboxed": UnsandboxedWorkflowRunner, "sandboxed": SandboxedWorkflowRunner}


@pytest.mark.parametrize("runner", sorted(RUNNERS))
@pytest.mark.parametrize("path", ALL_HISTORIES, ids=[str(p.relative_to(HISTORIES)) for p in ALL_HISTORIES])
async def test_recorded_history_replays_against_current_code(path, runner):
    replayer = Replayer(workflows=[GenerationWorkflow, WebhookDeliveryWorkflow, ModelAdmissionWorkflow],
                        workflow_runner=RUNNERS[runner]())
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, f"{path.name}: {result.replay_failure}"


@pytest.mark.parametrize("generation", sorted(OLD_GENERATIONS))
def test_old_histories_are_kept(generation):
    assert len(list((HISTORIES / generation).glob("*.json"))) >= OLD_GENERATIONS[generation]


async def test_replay_catches_a_reordered_step():
    replayer = Replayer(workflows=[ReorderedGenerationWorkflow, WebhookDeliveryWorkflow])
    result = await replayer.replay_workflow(load("success"), raise_on_replay_failure=False)
    assert result.replay_failure is not None
    assert "nondetermin" in str(result.replay_failure).lower()


# ---- recording -----------------------------------------------------------------------------


@pytest.mark.skipif(os.environ.get("ATELIER_RECORD_HISTORIES") != "1", reason="set ATELIER_RECORD_HISTORIES=1 to re-record")
async def test_record_histories(harness_factory):
    HISTORIES.mkdir(exist_ok=True)

    async def save(handle, name):
        history = await handle.fetch_history()
        (HISTORIES / f"{name}.json").write_text(history.to_json())

    async with FakeGemini(api_key="test-key") as fake:
        h = await harness_factory(ai_provider="gemini", gemini_api_key="test-key", gemini_base_url=fake.url)
        user = await h.user(1000)
        poor = await h.user(1)
        photo = [ImageInput(file_id=await h.upload(user, fake_images.jpeg(200, 160)))]
        async with h.worker():
            handle = await h.start(user, "photography", photo, prompt="warm light")
            await handle.result()
            await save(handle, "success")

            # An input given by URL: fetched once the charge has committed (generation-2026-12).
            from tests.fakes.http_server import FakeHttpServer

            with FakeHttpServer() as files:
                files.route("/me.jpg", body=fake_images.jpeg(200, 160), headers={"Content-Type": "image/jpeg"})
                handle = await h.start(user, "photography", [ImageInput(url=files.url("/me.jpg"))])
                await handle.result()
                await save(handle, "success_url")

            fake.plan(PRIMARY, [Reply.status(503, retry_after=1)] * 3)
            handle = await h.start(user, "photography", photo)
            await handle.result()
            await save(handle, "model_fallback")

            fake.default = Reply.status(400, message="bad request")
            handle = await h.start(user, "photography", photo)
            with pytest.raises(WorkflowFailureError):
                await handle.result()
            await save(handle, "failure_refund")
            fake.default = Reply.ok()

            # The primary failed repeatedly above and is now ranked last: hang whichever is called.
            fake.plan(PRIMARY, [Reply.hang()])
            fake.plan("gemini-3-pro-image-preview", [Reply.hang()])
            handle = await h.start(user, "photography", photo)
            await fake.wait_for_requests(len(fake.requests) + 1, timeout_s=20)
            await handle.cancel()
            with pytest.raises(WorkflowFailureError):
                await handle.result()
            await save(handle, "cancellation")

            handle = await h.start(poor, "photography", [ImageInput(file_id=await h.upload(poor, fake_images.jpeg()))])
            await handle.result()
            await save(handle, "rejected")

            from tests.fakes.webhook_receiver import WebhookReceiver

            with WebhookReceiver(secret=h.settings.webhook_secret.get_secret_value()) as receiver:
                handle = await h.start(user, "photography", photo, webhook_url=receiver.url)
                await handle.result()
                await asyncio.to_thread(receiver.wait_for_success, timeout=30)
                await save(handle, "success_webhook")

                # started and progress events too: each its own delivery.
                handle = await h.start(user, "photography", photo, webhook_url=receiver.url,
                                       webhook_events=["started", "progress", "completed"])
                await handle.result()
                await save(handle, "webhook_events")

            # One failed attempt, a backoff timer, then success: attempts recorded by the workflow.
            fake.plan(PRIMARY, [Reply.status(500, message="oops")])
            fake.plan("gemini-3-pro-image-preview", [Reply.status(500, message="oops")])
            handle = await h.start(user, "photography", photo)
            await handle.result()
            await save(handle, "ai_retry")

            # The deadline lands during the AI call: failed as DeadlineExceeded, refunded.
            fake.plan(PRIMARY, [Reply.hang()])
            fake.plan("gemini-3-pro-image-preview", [Reply.hang()])
            h.timeouts.deadline_s = 5
            handle = await h.start(user, "photography", photo)
            with pytest.raises(WorkflowFailureError):
                await handle.result()
            await save(handle, "deadline")

@pytest.mark.skipif(os.environ.get("ATELIER_RECORD_HISTORIES") != "1", reason="set ATELIER_RECORD_HISTORIES=1 to re-record")
async def test_record_admission_histories(harness_factory, tmp_path):
    import json

    from atelier.messages import admission_workflow_id

    folder = HISTORIES / "admission" / "parallel"
    folder.mkdir(parents=True, exist_ok=True)

    async def save(handle, name):
        (folder / f"{name}.json").write_text((await handle.fetch_history()).to_json())

    model = "quota-image-model"
    catalogue = tmp_path / "models.json"
    catalogue.write_text(json.dumps({"models": [
        {"name": model, "provider": "gemini", "priority": 1, "cost": 1, "max_concurrent": 1}]}))
    async with FakeGemini(api_key="test-key") as fake:
        h = await harness_factory(ai_provider="gemini", gemini_api_key="test-key", gemini_base_url=fake.url,
                                  model_catalogue=catalogue)
        user = await h.user(1000)
        photo = [ImageInput(file_id=await h.upload(user, fake_images.jpeg(200, 160)))]
        async with h.worker():
            fake.plan(model, [Reply.slow(2.0)])
            first = await h.start(user, "photography", photo)
            await fake.wait_for_requests(1, timeout_s=30)
            second = await h.start(user, "photography", photo)
            await first.result()
            await second.result()
            await save(second, "waited_in_line")

            fake.plan(model, [Reply.status(429, retry_after="0.5")] * 2 + [Reply.ok()])
            handle = await h.start(user, "photography", photo)
            await handle.result()
            await save(handle, "busy_then_ok")

            fake.plan(model, [Reply.slow(3.0)])
            blocker = await h.start(user, "photography", photo)
            await fake.wait_for_requests(len(fake.requests) + 1, timeout_s=30)
            waiting = await h.start(user, "photography", photo)
            await asyncio.sleep(1.0)
            await waiting.cancel()
            with pytest.raises(WorkflowFailureError):
                await waiting.result()
            await blocker.result()
            await save(waiting, "canceled_in_line")
            admission = h.client.get_workflow_handle(admission_workflow_id(model, h.settings.task_queue))
            await save(admission, "admission_workflow")
