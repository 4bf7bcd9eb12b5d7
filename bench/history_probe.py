"""A replica of GenerationWorkflow's success path for the history benchmark.

No kind accepts 8 input images, so GenerationWorkflow rejects such a request before it
runs anything. This workflow skips that validation and calls the same activities, in the
same order, with the same request types, timeouts, retry policies, summaries and status
upserts, so its history is what GenerationWorkflow's would be with 8 images. It lives in
its own module: the workflow sandbox re-imports it and it must stay deterministic.
"""

from __future__ import annotations

import asyncio

from temporalio import workflow
from temporalio.common import SearchAttributeKey

with workflow.unsafe.imports_passed_through():
    from activities.ai import AiActivities
    from activities.credits import CreditActivities
    from activities.images import ImageActivities
    from activities.models import ModelActivities
    from activities.works import WorkActivities
    from atelier.messages import (
        SA_STATUS,
        AiRequest,
        ChargeRequest,
        DownloadRequest,
        GenerationRequest,
        GenerationResult,
        SaveWorkRequest,
        SelectModelRequest,
    )
    from workflows import policies
    from workflows.policies import seconds

STATUS_KEY = SearchAttributeKey.for_keyword(SA_STATUS)


@workflow.defn(name="BenchHistoryProbeWorkflow")
class HistoryProbeWorkflow:
    """GenerationWorkflow's success path without its validation (so 8 images can pass):
    the same activities, arguments, timeouts, summaries and status upserts."""

    @workflow.run
    async def run(self, req: GenerationRequest) -> GenerationResult:
        workflow.upsert_search_attributes([STATUS_KEY.value_set("running")])
        # The deadline timer, as GenerationWorkflow sets it.
        result = await asyncio.wait_for(self._steps(req), timeout=req.timeouts.deadline_s)
        workflow.upsert_search_attributes([STATUS_KEY.value_set("completed")])
        return result

    async def _steps(self, req: GenerationRequest) -> GenerationResult:
        t = req.timeouts
        charge = await workflow.execute_activity_method(
            CreditActivities.charge_credits,
            ChargeRequest(task_id=req.task_id, user_id=req.user_id, amount=req.cost, reason=f"{req.kind} generation"),
            task_queue=req.parameters["main_queue"], start_to_close_timeout=seconds(t.short_start_to_close_s),
            retry_policy=policies.SHORT_RETRY, summary=f"Charge {req.cost} credits")
        downloaded = await workflow.execute_activity_method(
            ImageActivities.download_and_convert,
            DownloadRequest(task_id=req.task_id, user_id=req.user_id, images=req.images),
            task_queue=req.parameters["main_queue"], start_to_close_timeout=seconds(t.download_start_to_close_s),
            heartbeat_timeout=seconds(t.download_heartbeat_s), retry_policy=policies.DOWNLOAD_RETRY,
            summary=f"Download and convert {len(req.images)} image(s)")
        choice = await workflow.execute_activity_method(
            ModelActivities.select_model, SelectModelRequest(kind=req.kind, exclude=[]),
            task_queue=req.parameters["main_queue"], start_to_close_timeout=seconds(t.short_start_to_close_s),
            retry_policy=policies.SHORT_RETRY, summary="Select model")
        output = await workflow.execute_activity_method(
            AiActivities.call_ai,
            AiRequest(task_id=req.task_id, kind=req.kind, model=choice.model, provider=choice.provider,
                      prompt=req.prompt, style=req.style, images=downloaded.images, parameters={}),
            task_queue=req.ai_task_queue, start_to_close_timeout=seconds(t.ai_start_to_close_s),
            schedule_to_start_timeout=seconds(t.ai_schedule_to_start_s), heartbeat_timeout=seconds(t.ai_heartbeat_s),
            retry_policy=policies.ai_retry(t), summary=f"Generate with {choice.model} ({choice.provider})")
        saved = await workflow.execute_activity_method(
            WorkActivities.save_work,
            SaveWorkRequest(task_id=req.task_id, user_id=req.user_id, kind=req.kind, model=output.model,
                            prompt=req.prompt, images=output.images),
            task_queue=req.parameters["main_queue"], start_to_close_timeout=seconds(t.short_start_to_close_s),
            retry_policy=policies.SHORT_RETRY, summary=f"Save work ({len(output.images)} image(s))")
        return GenerationResult(task_id=req.task_id, status="completed", kind=req.kind, work_id=saved.work_id,
                                images=list(output.images), model=output.model,
                                credits_charged=charge.charged)
