"""GenerationWorkflow: one paid AI generation, from charge to saved work, or every credit back.

The saga reads top to bottom: validate, charge, pick a model, fetch the inputs, call the AI
(falling back to the next model when one fails for good), save the work. Any exit that is
not success after the charge runs the refund, shielded from cancellation, then re-raises.
The workflow is the only writer of a generation's status: the `progress` query while it
runs, the search attributes and the result once it is closed.
"""

from __future__ import annotations

import asyncio
from temporalio import workflow
from temporalio.common import SearchAttributeKey
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError, ChildWorkflowError
from temporalio.exceptions import TimeoutError as ActivityTimeout

with workflow.unsafe.imports_passed_through():
    from activities.ai import AiActivities
    from activities.credits import CreditActivities
    from activities.images import ImageActivities
    from activities.models import ModelActivities
    from activities.notify import NotifyActivities
    from activities.works import WorkActivities
    from atelier.errors import InvalidRequest
    from atelier.messages import (
        NO_FALLBACK_ERRORS,
        SA_STATUS,
        AiOutput,
        AiRequest,
        ChargeRequest,
        DownloadRequest,
        ErrorCode,
        GenerationRequest,
        GenerationResult,
        ModelChoice,
        NotifyRequest,
        Progress,
        RefundRequest,
        SaveWorkRequest,
        SelectModelRequest,
        Stage,
        Status,
    )
    from atelier.validation import validate_request
    from workflows import policies
    from workflows.policies import seconds

STATUS_KEY = SearchAttributeKey.for_keyword(SA_STATUS)

# How far along each stage is, for a progress bar.
PERCENT = {
    Stage.QUEUED: 0,
    Stage.CHARGING: 5,
    Stage.SELECTING_MODEL: 10,
    Stage.DOWNLOADING: 15,
    Stage.GENERATING: 30,
    Stage.SAVING: 90,
    Stage.NOTIFYING: 95,
    Stage.REFUNDING: 95,
    Stage.DONE: 100,
}

# At most this many models are tried for one generation.
MAX_MODELS = 3

# workflow.patched() ids: each names a change of the commands a workflow issues (see docs/deployment.md).
PATCH_SAVE_SURVIVES_CANCEL = "save-work-survives-cancel"
PATCH_CHARGE_SETTLES_BEFORE_CANCEL = "charge-settles-before-cancel"


async def _uncancellable(awaitable, *, then_honour_cancel: bool = False):
    """Await to the end even if the workflow is canceled meanwhile (shielded, re-shielded on
    every further cancel request). With `then_honour_cancel`, a cancel that arrived meanwhile
    is raised once the awaitable has finished."""
    task = asyncio.ensure_future(awaitable)
    canceled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            canceled = True  # the task goes on; the next shield returns its result once done
    if canceled and then_honour_cancel:
        raise asyncio.CancelledError()
    return result


class _Rejected(Exception):
    """Refused before anything was charged."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# What a timeout of each activity means to the user (a timeout carries no error type of its own).
TIMEOUT_MEANS = {
    "call_ai": ErrorCode.PROVIDER_UNAVAILABLE.value,
    "download_and_convert": ErrorCode.DOWNLOAD_FAILED.value,
}


def _error_code(err: BaseException) -> str:
    """The named reason inside an activity failure (its ApplicationError type)."""
    cause = err.cause if isinstance(err, (ActivityError, ChildWorkflowError)) else err
    if isinstance(cause, ApplicationError) and cause.type:
        return cause.type
    if isinstance(cause, CancelledError) or isinstance(err, asyncio.CancelledError):
        return ErrorCode.CANCELED.value
    if isinstance(cause, ActivityTimeout) and isinstance(err, ActivityError):
        return TIMEOUT_MEANS.get(err.activity_type, ErrorCode.INTERNAL.value)
    if isinstance(err, asyncio.TimeoutError):
        return ErrorCode.DEADLINE_EXCEEDED.value
    return ErrorCode.INTERNAL.value


def _error_message(err: BaseException) -> str:
    if isinstance(err, asyncio.TimeoutError):
        return "the generation ran past its deadline"
    cause = err.cause if isinstance(err, ActivityError) and err.cause is not None else err
    if isinstance(cause, ActivityTimeout) and isinstance(err, ActivityError):
        kind = cause.type.name.lower().replace("_", "-") if cause.type else "a"
        return f"{err.activity_type} hit its {kind} timeout"
    return str(cause) or type(cause).__name__


@workflow.defn(name="GenerationWorkflow")
class GenerationWorkflow:
    def __init__(self) -> None:
        self._progress = Progress()

    @workflow.query
    def progress(self) -> Progress:
        return self._progress

    # ---- progress and status: the workflow is their only writer ----------------------

    def _stage(self, stage: Stage) -> None:
        self._progress.stage = stage.value
        self._progress.percent = PERCENT[stage]

    def _status(self, status: Status) -> None:
        self._progress.status = status.value
        workflow.upsert_search_attributes([STATUS_KEY.value_set(status.value)])

    def _result(self, status: Status) -> GenerationResult:
        p = self._progress
        return GenerationResult(
            task_id=p.task_id, status=status.value, kind=p.kind, work_id=p.work_id,
            images=list(p.images), model=p.model, error_code=p.error_code, error=p.last_error,
            credits_charged=p.credits_charged, credits_refunded=p.credits_refunded,
        )

    # ---- the saga ----------------------------------------------------------------------

    @workflow.run
    async def run(self, req: GenerationRequest) -> GenerationResult:
        p = self._progress
        p.task_id, p.kind = req.task_id, req.kind
        self._status(Status.RUNNING)
        try:
            # A deadline is a timer inside the workflow, never an execution timeout:
            # a workflow killed by the server could not refund.
            await asyncio.wait_for(self._steps(req), timeout=req.timeouts.deadline_s)
        except _Rejected as rejected:
            p.error_code, p.last_error = rejected.code, rejected.message
            self._stage(Stage.DONE)
            self._status(Status.REJECTED)
            result = self._result(Status.REJECTED)
            await self._notify(req, result)
            return result
        except BaseException as err:  # noqa: BLE001 - cancellation too: the refund must run
            if p.work_id:
                # The work was saved before the cancel or deadline took effect: the user has
                # their images and has paid for them. Nothing to undo.
                return await self._complete(req)
            canceled = isinstance(err, (asyncio.CancelledError, CancelledError)) or (
                isinstance(err, ActivityError) and isinstance(err.cause, CancelledError)
            )
            p.error_code = ErrorCode.CANCELED.value if canceled else _error_code(err)
            p.last_error = "canceled by request" if canceled else _error_message(err)
            await self._refund(req, reason=p.error_code)
            self._stage(Stage.DONE)
            status = Status.CANCELED if canceled else Status.FAILED
            self._status(status)
            result = self._result(status)
            await self._notify(req, result)
            if canceled:
                raise
            raise ApplicationError(p.last_error, result, type=p.error_code, non_retryable=True) from err
        return await self._complete(req)

    async def _complete(self, req: GenerationRequest) -> GenerationResult:
        self._stage(Stage.DONE)
        self._status(Status.COMPLETED)
        result = self._result(Status.COMPLETED)
        await self._notify(req, result)
        return result

    async def _steps(self, req: GenerationRequest) -> None:
        p, t = self._progress, req.timeouts
        try:
            validate_request(req)
        except InvalidRequest as err:
            raise _Rejected(err.code, err.message) from None

        self._stage(Stage.CHARGING)
        charging = workflow.execute_activity_method(
            CreditActivities.charge_credits,
            ChargeRequest(task_id=req.task_id, user_id=req.user_id, amount=req.cost, reason=f"{req.kind} generation"),
            start_to_close_timeout=seconds(t.short_start_to_close_s),
            retry_policy=policies.SHORT_RETRY,
            summary=f"Charge {req.cost} credits",
        )
        try:
            if workflow.patched(PATCH_CHARGE_SETTLES_BEFORE_CANCEL):
                # Let a charge in flight settle before a cancel is acted on: a refund that ran
                # while the charge was still committing would find nothing to give back.
                charge = await _uncancellable(charging, then_honour_cancel=True)
            else:
                charge = await charging
        except ActivityError as err:
            code = _error_code(err)
            if code in (ErrorCode.INSUFFICIENT_CREDITS.value, ErrorCode.UNKNOWN_USER.value):
                raise _Rejected(code, _error_message(err)) from None
            raise
        p.credits_charged = charge.charged

        downloaded = await self._download(req)
        output = await self._generate(req, downloaded)

        self._stage(Stage.SAVING)
        save = workflow.execute_activity_method(
            WorkActivities.save_work,
            SaveWorkRequest(task_id=req.task_id, user_id=req.user_id, kind=req.kind, model=output.model,
                            prompt=req.prompt, images=output.images),
            start_to_close_timeout=seconds(t.short_start_to_close_s),
            retry_policy=policies.SHORT_RETRY,
            summary=f"Save work ({len(output.images)} image(s))",
        )
        if workflow.patched(PATCH_SAVE_SURVIVES_CANCEL):
            # The images exist: a cancel arriving now is too late. Finish the save, so a work
            # is never saved for a generation that was then refunded.
            saved = await _uncancellable(save)
        else:
            saved = await save
        p.work_id, p.images = saved.work_id, list(output.images)

    async def _download(self, req: GenerationRequest):
        t = req.timeouts
        self._stage(Stage.DOWNLOADING)
        return await workflow.execute_activity_method(
            ImageActivities.download_and_convert,
            DownloadRequest(task_id=req.task_id, user_id=req.user_id, images=req.images),
            start_to_close_timeout=seconds(t.download_start_to_close_s),
            heartbeat_timeout=seconds(t.download_heartbeat_s),
            retry_policy=policies.DOWNLOAD_RETRY,
            summary=f"Download and convert {len(req.images)} image(s)",
        )

    async def _generate(self, req: GenerationRequest, downloaded) -> AiOutput:
        """Call the AI, falling back to the next model when one fails in a way retries cannot fix."""
        p, t = self._progress, req.timeouts
        tried: list[str] = []
        last_error: ActivityError | None = None
        while len(tried) < MAX_MODELS:
            self._stage(Stage.SELECTING_MODEL)
            choice: ModelChoice = await workflow.execute_activity_method(
                ModelActivities.select_model,
                SelectModelRequest(kind=req.kind, exclude=list(tried)),
                start_to_close_timeout=seconds(t.short_start_to_close_s),
                retry_policy=policies.SHORT_RETRY,
                summary="Select model" if not tried else f"Select model after {tried[-1]} failed",
            )
            if not choice.model:
                break
            tried.append(choice.model)
            p.model, p.attempt = choice.model, len(tried)
            self._stage(Stage.GENERATING)
            try:
                return await workflow.execute_activity_method(
                    AiActivities.call_ai,
                    AiRequest(task_id=req.task_id, kind=req.kind, model=choice.model, provider=choice.provider,
                              prompt=req.prompt, style=req.style, images=downloaded.images,
                              parameters=dict(req.parameters)),
                    task_queue=req.ai_task_queue or None,
                    start_to_close_timeout=seconds(t.ai_start_to_close_s),
                    schedule_to_start_timeout=seconds(t.ai_schedule_to_start_s),
                    heartbeat_timeout=seconds(t.ai_heartbeat_s),
                    retry_policy=policies.ai_retry(t),
                    summary=f"Generate with {choice.model} ({choice.provider})",
                )
            except ActivityError as err:
                code = _error_code(err)
                if code == ErrorCode.CANCELED.value or code in NO_FALLBACK_ERRORS:
                    raise
                last_error = err
                p.last_error = f"{choice.model}: {_error_message(err)}"
                workflow.logger.info("model %s failed (%s), trying the next one", choice.model, code)
        if last_error is not None:
            raise last_error
        raise ApplicationError("no model in the catalogue can serve this kind", type=ErrorCode.NO_MODEL_AVAILABLE.value,
                               non_retryable=True)

    async def _refund(self, req: GenerationRequest, *, reason: str) -> None:
        """Give the credits back; a no-op when nothing was charged. Shielded: a second cancel
        request cannot interrupt it, and it retries until it succeeds."""
        p = self._progress
        self._stage(Stage.REFUNDING)
        result = await _uncancellable(
            workflow.execute_activity_method(
                CreditActivities.refund_credits,
                RefundRequest(task_id=req.task_id, user_id=req.user_id, reason=reason),
                start_to_close_timeout=seconds(req.timeouts.short_start_to_close_s),
                retry_policy=policies.REFUND_RETRY,
                summary="Refund credits",
            )
        )
        p.credits_refunded = result.refunded

    async def _notify(self, req: GenerationRequest, result: GenerationResult) -> None:
        """Hand the webhook to its own workflow: retried for hours, never changing this outcome."""
        if not req.webhook_url:
            return
        self._stage(Stage.NOTIFYING)
        try:
            await _uncancellable(workflow.start_child_workflow(
                WebhookDeliveryWorkflow.run,
                NotifyRequest(task_id=req.task_id, user_id=req.user_id, url=req.webhook_url,
                              created_at=req.created_at, completed_at=workflow.now().isoformat(), result=result,
                              retry_for_s=req.timeouts.notify_schedule_to_close_s),
                id=f"{req.task_id}-webhook",
                parent_close_policy=workflow.ParentClosePolicy.ABANDON,
                static_summary=f"Webhook for {req.task_id}",
            ))
        except Exception as err:  # noqa: BLE001 - a webhook never changes the outcome
            workflow.logger.warning("webhook for %s not started: %s", req.task_id, err)
        finally:
            self._stage(Stage.DONE)


@workflow.defn(name="WebhookDeliveryWorkflow")
class WebhookDeliveryWorkflow:
    """Delivers one signed webhook, retrying with backoff for hours. Its failure is its own."""

    @workflow.run
    async def run(self, req: NotifyRequest) -> None:
        await workflow.execute_activity_method(
            NotifyActivities.notify,
            req,
            schedule_to_close_timeout=seconds(req.retry_for_s),
            start_to_close_timeout=seconds(30),
            retry_policy=policies.NOTIFY_RETRY,
            summary=f"POST webhook ({req.result.status})",
        )
