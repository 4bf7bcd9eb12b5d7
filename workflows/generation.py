"""GenerationWorkflow: one paid AI generation, from charge to saved work, or every credit back.

The saga reads top to bottom: validate, charge, fetch the inputs, pick a model, wait for a
slot of it, call the AI (each attempt one activity; a 429 waits, other failures back off,
then the next model), save the work. Any exit that is not success after the charge runs the
refund, shielded from cancellation, then re-raises. The deadline is a named timer: reaching
it fails the generation (DeadlineExceeded, or ExpiredBeforeStart before any AI call), never
cancels it. The workflow is the only writer of a generation's status: the `progress` and
`events` queries while it runs, the search attributes and the result once it is closed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import timedelta

from temporalio import workflow
from temporalio.workflow import ActivityCancellationType
from temporalio.common import SearchAttributeKey
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    ChildWorkflowError,
    is_cancelled_exception,
)
from temporalio.exceptions import TimeoutError as ActivityTimeout

with workflow.unsafe.imports_passed_through():
    from activities.admission import AdmissionActivities
    from activities.ai import AiActivities
    from activities.credits import CreditActivities
    from activities.images import ImageActivities
    from activities.models import ModelActivities
    from activities.notify import NotifyActivities
    from activities.works import WorkActivities
    from atelier.errors import InvalidRequest
    from atelier.messages import (
        SA_STATUS,
        AiOutput,
        AttemptRecord,
        EventsPage,
        EventsRequest,
        ProgressEvent,
        QueueUpdate,
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
        SlotGrant,
        SlotRelease,
        SlotRequest,
        Stage,
        Status,
        admission_workflow_id,
    )
    from atelier.validation import validate_request
    from workflows import policies
    from workflows.policies import seconds

STATUS_KEY = SearchAttributeKey.for_keyword(SA_STATUS)

# How far along each stage is, for a progress bar, in the order the stages run. The bar never
# goes back: a fallback to the next model passes selecting_model again without lowering it.
PERCENT = {
    Stage.QUEUED: 0,
    Stage.CHARGING: 5,
    Stage.DOWNLOADING: 10,
    Stage.SELECTING_MODEL: 15,
    Stage.WAITING_FOR_MODEL: 20,
    Stage.GENERATING: 30,
    Stage.SAVING: 90,
    Stage.NOTIFYING: 95,
    Stage.REFUNDING: 95,
    Stage.DONE: 100,
}

# At most this many models are tried for one generation.
MAX_MODELS = 3
# The progress stream's log keeps this many events; a reader further behind resumes at the oldest kept.
MAX_EVENTS = 200
# Attempt records kept; past this, the oldest waits on a busy provider are dropped first.
MAX_ATTEMPT_RECORDS = 40
# Waits between AI attempts (a provider's Retry-After overrides them, capped by the maximum).
AI_BACKOFF_INITIAL_S = 2.0
AI_BACKOFF_MAX_S = 30.0
BUSY_WAIT_INITIAL_S = 2.0
BUSY_WAIT_MAX_S = 60.0

# Error codes after which submitting the same request again may succeed.
CALLER_CAN_RETRY = frozenset({
    ErrorCode.DOWNLOAD_FAILED.value, ErrorCode.PROVIDER_UNAVAILABLE.value, ErrorCode.PROVIDER_BUSY.value,
    ErrorCode.NO_MODEL_AVAILABLE.value, ErrorCode.DEADLINE_EXCEEDED.value, ErrorCode.EXPIRED_BEFORE_START.value,
    ErrorCode.CANCELED.value, ErrorCode.INTERNAL.value,
})

# workflow.patched() ids: each names a change of the commands a workflow issues (see docs/deployment.md).
PATCH_SAVE_SURVIVES_CANCEL = "save-work-survives-cancel"
PATCH_CHARGE_SETTLES_BEFORE_CANCEL = "charge-settles-before-cancel"
# The deadline is its own named timer; reaching it fails the generation, it never reads as a cancel.
PATCH_EXPLICIT_DEADLINE = "explicit-deadline"
# Each AI attempt is one activity: the workflow records it, waits out a 429 without spending an
# attempt, and backs off between the others.
PATCH_AI_ATTEMPTS = "ai-attempts-in-workflow"
# A generation waits for a slot of its model's quota before each AI attempt.
PATCH_MODEL_ADMISSION = "model-admission"
# Joining a model's line is a local activity (it was a regular one).
PATCH_LOCAL_SLOT_REQUEST = "model-admission-local-request"
# A canceled (or out of time) AI attempt holding a slot keeps it until its activity has stopped:
# the workflow waits for the activity to acknowledge the cancel, so the next call in line never
# starts beside a call the worker is still making.
PATCH_SLOT_HELD_UNTIL_CALL_STOPS = "slot-held-until-call-stops"
# The model choice, and the download of uploaded inputs, start beside the charge, in the same
# workflow task: a generation reaches its AI call sooner, in fewer workflow tasks. The charge
# still settles before anything is refunded, a rejected charge drops the steps started beside it,
# and inputs given by URL are fetched only once the charge has committed.
PATCH_PRE_CALL_IN_PARALLEL = "pre-call-steps-in-parallel"
# Every change above, recorded once. The SDK writes each patch it records as a marker plus an
# upsert of the TemporalChangeVersion search attribute (a visibility write on the server): a new
# generation recorded 6 to 8 of them. It records one bundle's marker alone, and takes every patch
# in it as applied; histories without a bundle replay down the old branches, each patch checked
# as before. A change made later gets its own patch (checked with `_patched`), folded into a new
# bundle when the next one is cut. Newest first: a generation records the first, and a history
# replays with the one it recorded.
PATCH_BUNDLE_2026_11 = "generation-2026-11"
PATCH_BUNDLE_2026_12 = "generation-2026-12"
_PATCHES_2026_11 = frozenset({
    PATCH_SAVE_SURVIVES_CANCEL, PATCH_CHARGE_SETTLES_BEFORE_CANCEL, PATCH_EXPLICIT_DEADLINE, PATCH_AI_ATTEMPTS,
    PATCH_MODEL_ADMISSION, PATCH_LOCAL_SLOT_REQUEST, PATCH_SLOT_HELD_UNTIL_CALL_STOPS,
})
PATCH_BUNDLES = {
    PATCH_BUNDLE_2026_12: _PATCHES_2026_11 | {PATCH_PRE_CALL_IN_PARALLEL},
    PATCH_BUNDLE_2026_11: _PATCHES_2026_11,
}


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


def _abandon(*futures: asyncio.Future) -> None:
    """Cancel steps whose outcome is no longer wanted (an activity still running hears of it), and
    retrieve whatever they end with, so that no failure is left unread."""
    for future in futures:
        future.cancel()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())


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


def _retry_after(err: ActivityError) -> float | None:
    """The wait the provider asked for (Retry-After), carried by the activity's failure."""
    cause = err.cause
    if not isinstance(cause, ApplicationError):
        return None
    if cause.next_retry_delay:
        return cause.next_retry_delay.total_seconds()
    if cause.details and isinstance(cause.details[0], (int, float)) and not isinstance(cause.details[0], bool):
        return float(cause.details[0])
    return None


def _backoff(n: int, initial: float, maximum: float, asked: float | None) -> float:
    """The n-th wait (1-based): exponential, or what the provider asked for; capped either way."""
    wait = asked if asked is not None and asked > 0 else initial * 2 ** (n - 1)
    return max(0.5, min(wait, maximum))


@dataclass
class _Slot:
    """This generation's place with the models' admission workflows (see workflows/admission.py)."""

    seq: int = 0
    # The ticket waited for or held (None: neither), and every ticket granted so far.
    ticket: str | None = None
    grants: set[str] = field(default_factory=set)
    # When the generation first joined a line: a re-request after a 429 keeps its place.
    since: float | None = None
    # model -> its admission workflow's id, as request_slot answered.
    admission_ids: dict[str, str] = field(default_factory=dict)
    sends: list[asyncio.Task] = field(default_factory=list)


@workflow.defn(name="GenerationWorkflow")
class GenerationWorkflow:
    def __init__(self) -> None:
        self._progress = Progress()
        self._events: list[ProgressEvent] = []
        self._req: GenerationRequest | None = None
        # What stopped the steps first: "deadline" or "cancel" (None: they ended by themselves).
        self._ended_by: str | None = None
        self._ai_started = False
        self._bundle: frozenset[str] = frozenset()  # the patches of the bundle recorded (set first thing in run)
        self._started_sent = False
        self._deliveries: list[asyncio.Task] = []
        self._slot = _Slot()

    @workflow.query
    def progress(self) -> Progress:
        return self._progress

    @workflow.query
    def events(self, req: EventsRequest) -> EventsPage:
        """The visible changes after `req.after_seq` (the progress stream reads these)."""
        return EventsPage(events=[e for e in self._events if e.seq > req.after_seq], progress=self._progress)

    @workflow.signal
    def queue_update(self, update: QueueUpdate) -> None:
        """The model's admission workflow tells a waiting generation where it stands."""
        p = self._progress
        if p.stage != Stage.WAITING_FOR_MODEL.value:
            return
        p.queue_position, p.eta_s = update.position, update.eta_s
        self._changed()

    @workflow.signal(name="slot_granted")
    def slot_granted(self, grant: SlotGrant) -> None:
        """The model's admission workflow hands this generation a call slot. Only recorded: a
        grant can be applied before the code that asked for it has run again in this task (a
        replay after a timed-out task), so it is never judged here. A grant that crosses this
        generation's withdrawal needs nothing either: the withdrawal releases it."""
        self._slot.grants.add(grant.ticket)

    # ---- progress and status: the workflow is their only writer ----------------------

    def _changed(self) -> None:
        """Record a visible change for the progress stream (no-op when nothing visible moved)."""
        p = self._progress
        state = (p.status, p.stage, p.percent, p.model, p.attempt, p.queue_position, p.eta_s, p.error_code)
        if self._events:
            e = self._events[-1]
            if (e.status, e.stage, e.percent, e.model, e.attempt, e.queue_position, e.eta_s, e.error_code) == state:
                return
        p.seq += 1
        self._events.append(ProgressEvent(
            seq=p.seq, at=workflow.now().isoformat(), status=p.status, stage=p.stage, percent=p.percent,
            model=p.model, attempt=p.attempt, queue_position=p.queue_position, eta_s=p.eta_s, error_code=p.error_code,
        ))
        del self._events[:-MAX_EVENTS]
        # What the Temporal UI shows as the generation's current details.
        detail = f"{p.kind} · {p.status} · {p.stage} ({p.percent} %)"
        if p.model:
            detail += f" · model {p.model}, attempt {p.attempt}"
        if p.queue_position is not None:
            detail += f" · #{p.queue_position} in line"
        if p.error_code:
            detail += f" · {p.error_code}"
        workflow.set_current_details(detail)

    def _stage(self, stage: Stage) -> None:
        p = self._progress
        p.stage = stage.value
        p.percent = max(p.percent, PERCENT[stage])
        if stage != Stage.WAITING_FOR_MODEL:
            p.queue_position = p.eta_s = None
        self._changed()
        if stage not in (Stage.DONE, Stage.NOTIFYING):
            self._send_event("progress")

    def _patched(self, patch_id: str) -> bool:
        """workflow.patched, except that a generation that recorded a bundle has every patch it
        bundles without recording each (see PATCH_BUNDLES)."""
        if patch_id in self._bundle:
            return True
        return workflow.patched(patch_id)

    def _status(self, status: Status) -> None:
        self._progress.status = status.value
        workflow.upsert_search_attributes([STATUS_KEY.value_set(status.value)])
        self._changed()

    def _result(self, status: Status) -> GenerationResult:
        p = self._progress
        return GenerationResult(
            task_id=p.task_id, status=status.value, kind=p.kind, work_id=p.work_id,
            images=list(p.images), model=p.model, error_code=p.error_code, error=p.last_error,
            credits_charged=p.credits_charged, credits_refunded=p.credits_refunded,
            attempts=list(p.attempts), error_stage=p.error_stage, retryable=p.retryable, seq=p.seq,
        )

    # ---- the saga ----------------------------------------------------------------------

    @workflow.run
    async def run(self, req: GenerationRequest) -> GenerationResult:
        p = self._progress
        p.task_id, p.kind = req.task_id, req.kind
        self._req = req
        # First, before any other command: the newest bundle for a new generation; a history
        # replays with the bundle it recorded (a replayed patched() is True only for a marker in
        # the history), or with none, as it was.
        for bundle, patches in PATCH_BUNDLES.items():
            if workflow.patched(bundle):
                self._bundle = patches
                break
        explicit_deadline = self._patched(PATCH_EXPLICIT_DEADLINE)
        self._status(Status.RUNNING)
        try:
            if explicit_deadline:
                await self._steps_within_deadline(req)
            else:
                # Before the explicit deadline: wait_for, whose timeout could read as a cancel.
                await asyncio.wait_for(self._steps(req), timeout=req.timeouts.deadline_s)
        except _Rejected as rejected:
            p.error_code, p.last_error = rejected.code, rejected.message
            p.error_stage, p.retryable = Stage.CHARGING.value if p.stage == Stage.CHARGING.value else "validating", False
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
            p.error_stage = p.stage
            if explicit_deadline:
                canceled, p.error_code, p.last_error = self._why_stopped(err)
            else:
                canceled = isinstance(err, (asyncio.CancelledError, CancelledError)) or (
                    isinstance(err, ActivityError) and isinstance(err.cause, CancelledError)
                )
                p.error_code = ErrorCode.CANCELED.value if canceled else _error_code(err)
                p.last_error = "canceled by request" if canceled else _error_message(err)
            p.retryable = p.error_code in CALLER_CAN_RETRY
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

    def _why_stopped(self, err: BaseException) -> tuple[bool, str, str]:
        """(canceled, code, message) of steps that did not finish. A cancel is known from the SDK's
        own signal, the cancellation of the workflow's main task (caught in _steps_within_deadline;
        temporalio 1.35 has no Info.is_cancel_requested), a deadline from its own timer: never
        guessed from the type of the error the steps ended with."""
        if self._ended_by == "deadline":
            attempts = self._progress.attempts
            if attempts and attempts[-1].outcome == "busy":
                return False, ErrorCode.PROVIDER_BUSY.value, "the provider stayed busy (429) until the generation's deadline"
            if not self._ai_started:
                return False, ErrorCode.EXPIRED_BEFORE_START.value, "the deadline passed before the AI call could start"
            return False, ErrorCode.DEADLINE_EXCEEDED.value, "the generation ran past its deadline"
        if self._ended_by == "cancel":
            return True, ErrorCode.CANCELED.value, "canceled by request"
        return False, _error_code(err), _error_message(err)

    async def _steps_within_deadline(self, req: GenerationRequest) -> None:
        """Run the steps against the generation's deadline, a timer of its own (never an execution
        timeout: a workflow killed by the server could not refund)."""
        at = workflow.now() + timedelta(seconds=req.timeouts.deadline_s)
        deadline = asyncio.ensure_future(workflow.sleep(
            req.timeouts.deadline_s, summary=f"Deadline: fail and refund at {at:%Y-%m-%d %H:%M:%S} UTC"))
        steps = asyncio.ensure_future(self._steps(req))
        try:
            try:
                await workflow.wait([steps, deadline], return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                self._stop("cancel", steps)
            else:
                if not steps.done():
                    self._stop("deadline", steps)
            # The steps shield what must finish (a charge committing, a save): let them end.
            while not steps.done():
                try:
                    await workflow.wait([steps])
                except asyncio.CancelledError:
                    self._stop("cancel", steps)
        finally:
            if not deadline.done():
                deadline.cancel()
        steps.result()  # the steps' own outcome: returns, or raises what stopped them

    def _stop(self, reason: str, steps: asyncio.Future) -> None:
        if self._ended_by is None:
            self._ended_by = reason
        steps.cancel()

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
        charging = asyncio.ensure_future(workflow.execute_activity_method(
            CreditActivities.charge_credits,
            ChargeRequest(task_id=req.task_id, user_id=req.user_id, amount=req.cost, reason=f"{req.kind} generation"),
            start_to_close_timeout=seconds(t.short_start_to_close_s),
            retry_policy=policies.SHORT_RETRY,
            summary=f"Charge {req.cost} credits",
        ))
        if not self._patched(PATCH_PRE_CALL_IN_PARALLEL):
            await self._charge(charging)
            downloaded = await self._download(req)
            output = await self._generate(req, downloaded)
        else:
            # Neither the download nor the model choice needs the charge's outcome (the API refused
            # a balance short of the cost already): both start beside it, in this workflow task.
            # The charge is still settled before either outcome is looked at, so a failed download
            # is refunded only once the charge has committed, and a rejected charge drops them.
            # Except that nothing is fetched from outside for a generation not yet paid for: a
            # burst of submissions beyond the balance would otherwise fetch every URL it names.
            # Uploads were fetched and checked when they arrived; URLs wait for the charge.
            downloading = (None if any(image.url for image in req.images)
                           else asyncio.ensure_future(self._download_activity(req)))
            choosing = asyncio.ensure_future(self._select_model(req, []))
            try:
                await self._charge(charging)
                self._stage(Stage.DOWNLOADING)  # the stages still pass in order, for the progress stream
                if downloading is None:
                    downloading = asyncio.ensure_future(self._download_activity(req))
                downloaded = await downloading
            except BaseException:
                _abandon(*(step for step in (downloading, choosing) if step is not None))
                raise
            output = await self._generate(req, downloaded, choosing)

        self._stage(Stage.SAVING)
        save = workflow.execute_activity_method(
            WorkActivities.save_work,
            SaveWorkRequest(task_id=req.task_id, user_id=req.user_id, kind=req.kind, model=output.model,
                            prompt=req.prompt, images=output.images),
            start_to_close_timeout=seconds(t.short_start_to_close_s),
            retry_policy=policies.SHORT_RETRY,
            summary=f"Save work ({len(output.images)} image(s))",
        )
        if self._patched(PATCH_SAVE_SURVIVES_CANCEL):
            # The images exist: a cancel arriving now is too late. Finish the save, so a work
            # is never saved for a generation that was then refunded.
            saved = await _uncancellable(save)
        else:
            saved = await save
        p.work_id, p.images = saved.work_id, list(output.images)

    async def _charge(self, charging: asyncio.Future) -> None:
        """Wait for the charge; a refusal (no credits, no such user) rejects the generation."""
        p = self._progress
        try:
            if self._patched(PATCH_CHARGE_SETTLES_BEFORE_CANCEL):
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
        except asyncio.CancelledError:
            # A cancel that waited for the charge: report what the charge took (the refund gives it back).
            if charging.done() and not charging.cancelled() and charging.exception() is None:
                p.credits_charged = charging.result().charged
            raise
        p.credits_charged = charge.charged
        self._send_event("started")

    async def _download(self, req: GenerationRequest):
        self._stage(Stage.DOWNLOADING)
        return await self._download_activity(req)

    def _download_activity(self, req: GenerationRequest):
        t = req.timeouts
        return workflow.execute_activity_method(
            ImageActivities.download_and_convert,
            DownloadRequest(task_id=req.task_id, user_id=req.user_id, images=req.images),
            start_to_close_timeout=seconds(t.download_start_to_close_s),
            heartbeat_timeout=seconds(t.download_heartbeat_s),
            retry_policy=policies.DOWNLOAD_RETRY,
            summary=f"Download and convert {len(req.images)} image(s)",
        )

    def _select_model(self, req: GenerationRequest, tried: list[str]):
        return workflow.execute_activity_method(
            ModelActivities.select_model,
            SelectModelRequest(kind=req.kind, exclude=list(tried)),
            start_to_close_timeout=seconds(req.timeouts.short_start_to_close_s),
            retry_policy=policies.SHORT_RETRY,
            summary="Select model" if not tried else f"Select model after {tried[-1]} failed",
        )

    async def _generate(self, req: GenerationRequest, downloaded,
                        first_choice: asyncio.Future | None = None) -> AiOutput:
        """Call the AI, falling back to the next model when one fails in a way retries cannot fix.
        `first_choice`: the first select_model, when it was started ahead."""
        p, t = self._progress, req.timeouts
        tried: list[str] = []
        last_error: ActivityError | None = None
        while len(tried) < MAX_MODELS:
            self._stage(Stage.SELECTING_MODEL)
            if first_choice is not None and not tried:
                choice: ModelChoice = await first_choice
            else:
                choice = await self._select_model(req, tried)
            if not choice.model:
                break
            tried.append(choice.model)
            p.model, p.attempt = choice.model, len(tried)
            try:
                if self._patched(PATCH_AI_ATTEMPTS):
                    return await self._call_model(req, downloaded, choice)
                self._stage(Stage.GENERATING)
                return await workflow.execute_activity_method(
                    AiActivities.call_ai,
                    self._ai_request(req, downloaded, choice),
                    task_queue=req.ai_task_queue or None,
                    start_to_close_timeout=seconds(t.ai_start_to_close_s),
                    schedule_to_start_timeout=seconds(t.ai_schedule_to_start_s),
                    heartbeat_timeout=seconds(t.ai_heartbeat_s),
                    retry_policy=policies.ai_retry(t),
                    summary=f"Generate with {choice.model} ({choice.provider})",
                )
            except ActivityError as err:
                code = _error_code(err)
                if code == ErrorCode.CANCELED.value or is_cancelled_exception(err) or code in policies.NO_FALLBACK_ERRORS:
                    raise
                last_error = err
                p.last_error = f"{choice.model}: {_error_message(err)}"
                workflow.logger.info("model %s failed (%s), trying the next one", choice.model, code)
        if last_error is not None:
            raise last_error
        raise ApplicationError("no model in the catalogue can serve this kind", type=ErrorCode.NO_MODEL_AVAILABLE.value,
                               non_retryable=True)

    @staticmethod
    def _ai_request(req: GenerationRequest, downloaded, choice: ModelChoice,
                    slot: tuple[str, str] = ("", "")) -> AiRequest:
        return AiRequest(task_id=req.task_id, user_id=req.user_id, kind=req.kind, model=choice.model, provider=choice.provider,
                         prompt=req.prompt, style=req.style, images=downloaded.images,
                         parameters=dict(req.parameters), slot_ticket=slot[0], admission_workflow_id=slot[1])

    def _slot_ref(self, choice: ModelChoice) -> tuple[str, str]:
        """The slot this attempt holds and the admission workflow it came from (empty: none)."""
        s = self._slot
        if s.ticket is None:
            return "", ""
        return s.ticket, self._admission_id(choice.model)

    def _admission_id(self, model: str) -> str:
        """The model's admission workflow: the id request_slot answered; else the one it would have
        (a grant can arrive for a request whose answer this generation never saw)."""
        return self._slot.admission_ids.get(model) or admission_workflow_id(model, workflow.info().task_queue)

    async def _call_model(self, req: GenerationRequest, downloaded, choice: ModelChoice) -> AiOutput:
        """Attempts on one model, each one activity that the workflow records. A busy provider
        (429) is waited out without spending an attempt, until the deadline; other retryable
        failures back off and spend one; the last one raises for the fallback to decide."""
        p, t = self._progress, req.timeouts
        failures = busy = 0
        while True:
            await self._wait_for_slot(req, choice)
            self._stage(Stage.GENERATING)
            self._ai_started = True
            p.attempt = failures + 1
            record = AttemptRecord(model=choice.model, provider=choice.provider, started_at=workflow.now().isoformat())
            self._add_attempt(record)
            started = workflow.now()
            hold = self._slot.ticket is not None and self._patched(PATCH_SLOT_HELD_UNTIL_CALL_STOPS)
            try:
                output: AiOutput = await workflow.execute_activity_method(
                    AiActivities.call_ai,
                    self._ai_request(req, downloaded, choice, slot=self._slot_ref(choice)),
                    task_queue=req.ai_task_queue or None,
                    start_to_close_timeout=seconds(t.ai_start_to_close_s),
                    schedule_to_start_timeout=seconds(t.ai_schedule_to_start_s),
                    heartbeat_timeout=seconds(t.ai_heartbeat_s),
                    retry_policy=policies.AI_ONE_ATTEMPT,
                    # Holding a slot: a cancel waits until the activity has stopped (it hears the
                    # cancel with its next heartbeat; a dead worker's call times out), so the
                    # slot is not given to the next in line while this call still runs.
                    cancellation_type=(ActivityCancellationType.WAIT_CANCELLATION_COMPLETED if hold
                                       else ActivityCancellationType.TRY_CANCEL),
                    summary=f"Generate with {choice.model} ({choice.provider}), attempt {failures + 1}",
                )
            except asyncio.CancelledError:
                self._end_attempt(req, choice, record, started, "canceled")
                raise
            except ActivityError as err:
                record.error_code, record.error = _error_code(err), _error_message(err)
                if is_cancelled_exception(err) or (hold and self._ended_by is not None):
                    # Canceled, or out of time, while the call ran: whatever the activity ended
                    # with (canceled, timed out, failed), the generation stops here.
                    self._end_attempt(req, choice, record, started, "canceled")
                    if is_cancelled_exception(err):
                        raise
                    raise asyncio.CancelledError() from None
                if record.error_code == ErrorCode.PROVIDER_BUSY.value:
                    self._end_attempt(req, choice, record, started, "busy")
                    busy += 1
                    wait = _backoff(busy, BUSY_WAIT_INITIAL_S, BUSY_WAIT_MAX_S, _retry_after(err))
                    self._stage(Stage.WAITING_FOR_MODEL)
                    await workflow.sleep(wait, summary=f"{choice.model} is busy (429): try again in {wait:.0f} s")
                    continue
                p.last_error = f"{choice.model}: {record.error}"
                self._end_attempt(req, choice, record, started,
                                  "timed_out" if isinstance(err.cause, ActivityTimeout) else "failed")
                failures += 1
                final = isinstance(err.cause, ApplicationError) and err.cause.non_retryable
                if final or failures >= t.ai_max_attempts:
                    raise
                wait = _backoff(failures, AI_BACKOFF_INITIAL_S, AI_BACKOFF_MAX_S, _retry_after(err))
                await workflow.sleep(
                    wait, summary=f"{choice.model} failed ({record.error_code}): attempt {failures + 1} in {wait:.0f} s")
                continue
            if hold and self._ended_by is not None:
                # The call ended before the activity heard of the cancel: the generation stops
                # all the same (the images it made are nobody's; the retention sweep takes them).
                self._end_attempt(req, choice, record, started, "canceled")
                raise asyncio.CancelledError()
            if output.slot_released:
                # The activity gave the slot back when the provider answered. Deterministic
                # without a patch: decided by the result recorded in history (older results
                # carry False, and their histories go on signalling the release below).
                self._slot.ticket = None
            self._end_attempt(req, choice, record, started, "succeeded")
            return output

    def _end_attempt(self, req: GenerationRequest, choice: ModelChoice, record: AttemptRecord, started,
                     outcome: str) -> None:
        record.outcome, record.ended_at = outcome, workflow.now().isoformat()
        self._release_slot(req, choice, "succeeded" if outcome == "succeeded" else "busy" if outcome == "busy" else "failed",
                           (workflow.now() - started).total_seconds())
        self._changed()

    def _add_attempt(self, record: AttemptRecord) -> None:
        attempts = self._progress.attempts
        attempts.append(record)
        if len(attempts) > MAX_ATTEMPT_RECORDS:
            busy = next((i for i, a in enumerate(attempts) if a.outcome == "busy"), 0)
            del attempts[busy]

    async def _wait_for_slot(self, req: GenerationRequest, choice: ModelChoice) -> None:
        """Wait until the model's quota has a slot for this generation (admission; see workflows/admission.py)."""
        if not choice.admission or not self._patched(PATCH_MODEL_ADMISSION):
            return
        s, t = self._slot, req.timeouts
        s.seq += 1
        ticket = s.ticket = f"{req.task_id}:{s.seq}"
        if s.since is None:
            s.since = workflow.now().timestamp()
        self._stage(Stage.WAITING_FOR_MODEL)
        try:
            request = SlotRequest(ticket=ticket, task_id=req.task_id, user_id=req.user_id, priority=req.priority,
                                  model=choice.model, enqueued_at=s.since, max_concurrent=choice.max_concurrent,
                                  per_minute=choice.per_minute,
                                  # The slot is held for one attempt: its wait for a worker, then its run.
                                  lease_s=t.ai_schedule_to_start_s + t.ai_start_to_close_s + 60)
            summary = f"Wait in line for a slot of {choice.model}"
            if self._patched(PATCH_LOCAL_SLOT_REQUEST):
                # A local activity: one marker in this history, no trip through a task queue.
                # Generous timeout: a busy server takes a while to deliver a signal, and a retry sends another.
                answer = await workflow.execute_local_activity_method(
                    AdmissionActivities.request_slot, request,
                    start_to_close_timeout=seconds(max(60.0, t.short_start_to_close_s)),
                    retry_policy=policies.ADMISSION_RETRY, summary=summary)
            else:
                answer = await workflow.execute_activity_method(
                    AdmissionActivities.request_slot, request,
                    start_to_close_timeout=seconds(t.short_start_to_close_s),
                    retry_policy=policies.ADMISSION_RETRY, summary=summary)
            s.admission_ids[choice.model] = answer.workflow_id
            # Deterministic without a patch: decided by the answer recorded in the marker (answers
            # recorded before the join_line update read as not granted, no position).
            if answer.granted:
                s.grants.add(ticket)
            elif answer.position is not None:
                self.queue_update(QueueUpdate(model=choice.model, position=answer.position, eta_s=answer.eta_s))
            await workflow.wait_condition(lambda: ticket in s.grants)
        except (Exception, asyncio.CancelledError):  # not GeneratorExit: a cache eviction is no cancel
            # Canceled or out of time while in line: leave it (or hand back a grant that crossed).
            s.ticket = None
            self._send_release(choice.model, ticket, "withdrawn", None)
            raise

    def _release_slot(self, req: GenerationRequest, choice: ModelChoice, outcome: str, duration_s: float) -> None:
        """Give the slot back (outcome: succeeded | busy | failed). Must not block: it runs during cancellation too."""
        s = self._slot
        if s.ticket is None:
            return  # no admission for this model, or an old history
        ticket, s.ticket = s.ticket, None
        self._send_release(choice.model, ticket, "ok" if outcome == "succeeded" else outcome, duration_s)

    def _send_release(self, model: str, ticket: str, outcome: str, duration_s: float | None) -> None:
        """Signal the release without waiting for it: the admission workflow's lease and holder
        check take the slot back should the signal be lost."""
        workflow_id = self._admission_id(model)

        async def send() -> None:
            try:
                await workflow.get_external_workflow_handle(workflow_id).signal(
                    "release_slot", SlotRelease(ticket=ticket, outcome=outcome, duration_s=duration_s))
            except Exception as err:  # noqa: BLE001 - never changes the generation's outcome
                workflow.logger.warning("release of %s not delivered: %s", ticket, err)

        sends = self._slot.sends
        sends[:] = [task for task in sends if not task.done()]
        sends.append(asyncio.create_task(send()))

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

    # ---- webhooks ----------------------------------------------------------------------

    def _send_event(self, event: str) -> None:
        """Start the delivery of a `started` or `progress` webhook, if the request asked for it.
        Deliveries run beside the steps: a slow receiver never holds the generation."""
        req = self._req
        if req is None or not req.webhook_url or event not in req.webhook_events:
            return
        if event == "started":
            if self._started_sent:
                return
            self._started_sent = True
        elif not self._started_sent:
            return  # progress is reported once the generation has started (been charged)
        change = self._events[-1] if self._events else ProgressEvent()
        child_id = f"{req.task_id}-webhook-started" if event == "started" else f"{req.task_id}-webhook-{change.seq}"
        notify = NotifyRequest(task_id=req.task_id, user_id=req.user_id, url=req.webhook_url,
                               created_at=req.created_at, result=self._result(Status(self._progress.status)),
                               retry_for_s=req.timeouts.notify_schedule_to_close_s, event=event, change=change)
        self._deliveries.append(asyncio.ensure_future(self._deliver(notify, child_id)))

    async def _deliver(self, notify: NotifyRequest, child_id: str) -> None:
        try:
            await _uncancellable(workflow.start_child_workflow(
                WebhookDeliveryWorkflow.run,
                notify,
                id=child_id,
                parent_close_policy=workflow.ParentClosePolicy.ABANDON,
                static_summary=f"Webhook ({notify.event}) for {notify.task_id}",
            ))
        except Exception as err:  # noqa: BLE001 - a webhook never changes the outcome
            workflow.logger.warning("webhook %s for %s not started: %s", notify.event, notify.task_id, err)

    async def _notify(self, req: GenerationRequest, result: GenerationResult) -> None:
        """Hand the final webhook to its own workflow: retried for hours, never changing this outcome."""
        if self._deliveries:
            await _uncancellable(workflow.wait(list(self._deliveries)))
        if not req.webhook_url or "completed" not in req.webhook_events:
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
            summary=f"POST webhook ({req.result.status})" if req.event == "completed" else f"POST webhook ({req.event})",
        )
