"""Start, read and cancel generations: what the API and the command line share.

Nothing here does the work: it starts a workflow and reads the workflow's own state.
Reading works while the workflow runs (the `progress` query), after it closed (describe
and result, from history: no worker needed) and while no worker is up (describe: the
pending activity, its attempt and last failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import (
    Client,
    WorkflowExecution,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
)
from temporalio.common import QueryRejectCondition, SearchAttributeKey, SearchAttributePair, TypedSearchAttributes, WorkflowIDReusePolicy
from temporalio.api.common.v1 import WorkflowExecution as WorkflowExecutionProto
from temporalio.api.workflowservice.v1 import GetWorkflowExecutionHistoryReverseRequest
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from atelier import credits
from atelier.messages import (
    DEFAULT_TASK_QUEUE,
    SA_KIND,
    SA_STATUS,
    SA_USER_ID,
    WORKFLOW_TYPE,
    EventsPage,
    EventsRequest,
    GenerationRequest,
    GenerationResult,
    ImageInput,
    Kind,
    Progress,
    ProgressEvent,
    QueueUpdate,
    Stage,
    Status,
    StoredImage,
    Timeouts,
    admission_workflow_id,
)
from atelier.representation import GenerationView, attempts_of, view_of_result
from atelier.settings import Settings
from atelier.temporal_calls import describe_if_exists
from atelier.validation import current_limits, validate_request
from starter.watch import GenerationWatchers
from workflows.admission import ModelAdmissionWorkflow
from workflows.generation import PERCENT, GenerationWorkflow

USER_KEY = SearchAttributeKey.for_keyword(SA_USER_ID)
KIND_KEY = SearchAttributeKey.for_keyword(SA_KIND)
STATUS_KEY = SearchAttributeKey.for_keyword(SA_STATUS)

# Which stage a pending activity means, when the workflow cannot be queried.
STAGE_OF_ACTIVITY = {
    "charge_credits": Stage.CHARGING,
    "select_model": Stage.SELECTING_MODEL,
    "download_and_convert": Stage.DOWNLOADING,
    "call_ai": Stage.GENERATING,
    "request_slot": Stage.WAITING_FOR_MODEL,
    "save_work": Stage.SAVING,
    "refund_credits": Stage.REFUNDING,
}

QUERY_TIMEOUT = timedelta(seconds=2)

log = logging.getLogger(__name__)


def earliest_pending(pending: list):
    """Of the activities a describe lists as pending, the one of the earliest stage: the charge,
    download and model choice run side by side, and the server lists them in no set order."""
    def rank(act) -> int:
        stage = STAGE_OF_ACTIVITY.get(act.activity_type.name)
        return PERCENT[stage] if stage is not None else max(PERCENT.values()) + 1
    return min(pending, key=rank)


def new_task_id() -> str:
    return f"gen_{uuid.uuid4().hex}"


def timeouts_from(settings: Settings) -> Timeouts:
    return Timeouts(
        short_start_to_close_s=settings.short_timeout_s,
        download_start_to_close_s=settings.download_timeout_s,
        download_heartbeat_s=settings.download_heartbeat_s,
        ai_start_to_close_s=settings.ai_timeout_s,
        ai_heartbeat_s=settings.ai_heartbeat_s,
        ai_schedule_to_start_s=settings.ai_schedule_to_start_s,
        ai_max_attempts=settings.ai_max_attempts,
        notify_schedule_to_close_s=settings.webhook_retry_hours * 3600,
        deadline_s=settings.generation_deadline_s,
    )


def build_request(settings: Settings, *, user_id: str, kind: str, images: list[ImageInput], prompt: str = "",
                  style: str = "", parameters: dict[str, str] | None = None, webhook_url: str | None = None,
                  task_id: str | None = None, timeouts: Timeouts | None = None,
                  webhook_events: list[str] | None = None, priority: str = "normal") -> GenerationRequest:
    """A typed, validated request. Raises InvalidRequest before anything starts. It carries the
    validation limits in force now, so the workflow keeps them whatever a later deploy changes."""
    req = GenerationRequest(
        task_id=task_id or new_task_id(), user_id=user_id, kind=kind, images=list(images), prompt=prompt,
        style=style, parameters=dict(parameters or {}), webhook_url=webhook_url,
        cost=settings.cost_of(kind) if kind in ("photography", "fitting") else 0,
        ai_task_queue=settings.ai_task_queue, timeouts=timeouts or timeouts_from(settings),
        created_at=datetime.now(timezone.utc).isoformat(),
        webhook_events=list(webhook_events) if webhook_events is not None else ["completed"],
        priority=priority, limits=current_limits(),
    )
    validate_request(req)
    return req


async def start_generation(client: Client, req: GenerationRequest, *, task_queue: str) -> WorkflowHandle:
    """Start the workflow and return at once: the API never waits on the work."""
    return await client.start_workflow(
        GenerationWorkflow.run,
        req,
        id=req.task_id,
        task_queue=task_queue,
        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        search_attributes=TypedSearchAttributes([
            SearchAttributePair(USER_KEY, req.user_id),
            SearchAttributePair(KIND_KEY, req.kind),
            SearchAttributePair(STATUS_KEY, Status.QUEUED.value),
        ]),
        static_summary=f"{req.kind} for {req.user_id} ({len(req.images)} image(s), {req.cost} credits)",
    )


@dataclass
class GenerationState:
    """What a reader learns of one generation; `view` is what clients see."""

    view: GenerationView
    user_id: str
    running: bool
    source: str  # query | history | describe


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(timezone.utc).isoformat() if value else None


def _stored(images) -> list[StoredImage]:
    return [i if isinstance(i, StoredImage) else StoredImage(**i) for i in images or []]


def _view_from_result(task_id: str, kind: str, r: GenerationResult, desc: WorkflowExecutionDescription) -> GenerationView:
    return view_of_result(r, task_id=task_id, kind=kind, created_at=_iso(desc.start_time),
                          completed_at=_iso(desc.close_time))


@dataclass(frozen=True)
class KnownGeneration:
    """What never changes once a generation runs: its owner, kind and start."""

    user_id: str
    kind: str
    created_at: str | None


class KnownGenerations:
    """Generations seen running, remembered (bounded, oldest dropped first) so that the next read
    of one needs no describe: a `progress` query that the server rejects once the workflow has
    closed answers it in one round trip (docs/benchmarks.md, "Reads"). Nothing here is a
    generation's state: that is always the workflow's answer."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, KnownGeneration] = OrderedDict()

    def get(self, task_id: str) -> KnownGeneration | None:
        return self._entries.get(task_id)

    def put(self, task_id: str, known: KnownGeneration) -> None:
        self._entries[task_id] = known
        self._entries.move_to_end(task_id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def forget(self, task_id: str) -> None:
        self._entries.pop(task_id, None)

    def __len__(self) -> int:
        return len(self._entries)


async def _ledger_totals(engine: AsyncEngine | None, task_id: str) -> tuple[int, int] | None:
    return await credits.task_totals(engine, task_id) if engine is not None else None


async def _read_known_running(client: Client, task_id: str, known: KnownGeneration,
                              engine: AsyncEngine | None, watchers: GenerationWatchers | None = None,
                              ) -> GenerationState | RPCError | None:
    """A generation known to have been running, read with one query (then its ledger rows), or
    with none while it is watched; None when it has closed since (read it in
    full), the RPCError when the query could not be answered (no worker: read it from describe)."""
    watched = watchers.get(task_id) if watchers is not None else None
    if watched is not None:
        progress, source = watched.progress, "watch"
        money = await _ledger_totals(engine, task_id)
    else:
        handle = client.get_workflow_handle(task_id)
        if watchers is not None:
            # The whole log (a few dozen changes) as well: it starts the watch.
            query = handle.query(GenerationWorkflow.events, EventsRequest(after_seq=0),
                                 reject_condition=QueryRejectCondition.NOT_OPEN, rpc_timeout=QUERY_TIMEOUT)
        else:
            query = handle.query(GenerationWorkflow.progress, reject_condition=QueryRejectCondition.NOT_OPEN,
                                 rpc_timeout=QUERY_TIMEOUT)
        try:
            answer = await query
        except RPCError as err:
            return err
        except (WorkflowQueryRejectedError, WorkflowQueryFailedError):
            return None
        # The ledger after the state, never beside it: a state that says "refunded" was reached
        # after the refund committed, so a ledger read that starts later sees it (read at the same
        # time, it could be older than the state it is shown with).
        money = await _ledger_totals(engine, task_id)
        if isinstance(answer, EventsPage):
            watchers.watch(task_id, answer)
            answer = answer.progress
        progress, source = answer, "query"
    view = _view_of_progress(progress, task_id, known.kind, known.created_at)
    if money is not None:
        view.charged, view.refunded = money
    return GenerationState(view, known.user_id, True, source)


async def read_generation(client: Client, task_id: str, *, engine: AsyncEngine | None = None,
                          admission_queue: str = DEFAULT_TASK_QUEUE,
                          known: KnownGenerations | None = None,
                          watchers: GenerationWatchers | None = None) -> GenerationState | None:
    """The state of one generation, or None if there is no such workflow. `admission_queue` is
    the task queue of the admission workflows (the workers' generation queue). `known`: facts of
    generations seen running, kept and used to read a running one without a describe;
    `watchers`: with `known`, a running one read twice is watched and then read with no query."""
    facts = known.get(task_id) if known is not None else None
    query_failed = False
    if facts is not None:
        read = await _read_known_running(client, task_id, facts, engine, watchers)
        if isinstance(read, GenerationState):
            if read.view.stage == Stage.WAITING_FOR_MODEL.value and read.view.model:
                await _read_place_in_line(client, read.view, admission_queue)
            return read
        known.forget(task_id)
        query_failed = read is not None  # no second query timeout below
    handle = client.get_workflow_handle(task_id, result_type=GenerationResult)
    desc = await describe_if_exists(handle)
    if desc is None:
        return None
    attrs = desc.typed_search_attributes
    user_id = attrs.get(USER_KEY) or ""
    kind = attrs.get(KIND_KEY) or ""
    sa_status = attrs.get(STATUS_KEY) or Status.QUEUED.value
    state: GenerationState

    if desc.status == WorkflowExecutionStatus.RUNNING:
        state = await _read_running(client, handle, desc, task_id, user_id, kind, sa_status,
                                    query=not query_failed)
        if known is not None and state.source == "query":
            known.put(task_id, KnownGeneration(user_id, kind, _iso(desc.start_time)))
        if state.view.stage == Stage.WAITING_FOR_MODEL.value and state.view.model:
            await _read_place_in_line(client, state.view, admission_queue)
    elif desc.status == WorkflowExecutionStatus.COMPLETED:
        result: GenerationResult = await handle.result()
        state = GenerationState(_view_from_result(task_id, kind, result, desc), user_id, False, "history")
    elif desc.status == WorkflowExecutionStatus.FAILED:
        state = GenerationState(await _failed_view(handle, desc, task_id, kind), user_id, False, "history")
    else:
        # Canceled (refund already ran inside the workflow), or terminated / timed out by an operator.
        status = Status.CANCELED if desc.status == WorkflowExecutionStatus.CANCELED else Status.FAILED
        error = {"code": "Canceled", "message": "canceled by request"} if status == Status.CANCELED else {
            "code": "Terminated", "message": f"workflow {desc.status.name.lower()} by an operator"}
        view = GenerationView(id=task_id, kind=kind, status=status.value, stage=Stage.DONE.value, progress=100,
                              error=error, created_at=_iso(desc.start_time), completed_at=_iso(desc.close_time))
        state = GenerationState(view, user_id, False, "describe")

    if engine is not None:
        # Money is read from the ledger itself: the one source of truth for credits.
        state.view.charged, state.view.refunded = await credits.task_totals(engine, task_id)
    return state


async def _read_running(client, handle, desc, task_id, user_id, kind, sa_status, *, query: bool = True
                        ) -> GenerationState:
    # Still "queued": no worker has run the workflow's first task, so no worker could answer a
    # query either; describe says all there is, without waiting out the query timeout.
    if query and sa_status != Status.QUEUED.value:
        try:
            return await _read_by_query(handle, desc, task_id, user_id, kind)
        except RPCError:
            pass
    # No worker answered: describe still knows the pending activity, its attempt and last failure.
    raw = desc if sa_status == Status.QUEUED.value or not query else await handle.describe()
    stage, attempt, error = Stage.QUEUED, 0, None
    pending = list(raw.raw_description.pending_activities)
    if pending:
        act = earliest_pending(pending)
        stage = STAGE_OF_ACTIVITY.get(act.activity_type.name, Stage.QUEUED)
        attempt = act.attempt
        if act.HasField("last_failure") and act.last_failure.message:
            error = {"code": act.last_failure.application_failure_info.type or "ActivityFailure",
                     "message": act.last_failure.message}
    elif sa_status != Status.QUEUED.value:
        # Between activities (an AI attempt ended and the workflow, with no worker, has not yet
        # scheduled the next): the last activity scheduled says where it stands.
        last = await _last_scheduled_activity(client, task_id)
        if last:
            stage = STAGE_OF_ACTIVITY.get(last, Stage.QUEUED)
            attempt = max(attempt, 1)
    view = GenerationView(id=task_id, kind=kind, status=sa_status, stage=stage.value, progress=PERCENT[stage],
                          attempt=attempt, error=error, created_at=_iso(desc.start_time))
    return GenerationState(view, user_id, True, "describe")


async def _read_place_in_line(client: Client, view: GenerationView, admission_queue: str) -> None:
    """A waiting generation's live place in its model's line, from the admission workflow (the
    generation's own copy is from when it joined the line). Kept as is when that cannot answer."""
    handle = client.get_workflow_handle(admission_workflow_id(view.model, admission_queue))
    try:
        place: QueueUpdate = await handle.query(ModelAdmissionWorkflow.position, view.id, rpc_timeout=QUERY_TIMEOUT)
    except (RPCError, WorkflowQueryFailedError):
        return
    if place.position is not None:
        view.queue_position, view.eta_s = place.position, place.eta_s


async def _last_scheduled_activity(client: Client, task_id: str) -> str | None:
    """The type of the last activity the workflow scheduled: one page of its history, newest first."""
    request = GetWorkflowExecutionHistoryReverseRequest(
        namespace=client.namespace,
        execution=WorkflowExecutionProto(workflow_id=task_id),
        maximum_page_size=25,
    )
    try:
        response = await client.workflow_service.get_workflow_execution_history_reverse(
            request, timeout=QUERY_TIMEOUT)
    except RPCError:
        return None
    for event in response.history.events:
        if event.HasField("activity_task_scheduled_event_attributes"):
            return event.activity_task_scheduled_event_attributes.activity_type.name
    return None


def _view_of_progress(p: Progress, task_id: str, kind: str, created_at: str | None) -> GenerationView:
    return GenerationView(
        id=task_id, kind=p.kind or kind, status=p.status, stage=p.stage, progress=p.percent, model=p.model,
        attempt=p.attempt, queue_position=p.queue_position, eta_s=p.eta_s,
        error={"code": p.error_code or "", "message": p.last_error} if p.last_error else None,
        created_at=created_at, charged=p.credits_charged, refunded=p.credits_refunded,
        work_id=p.work_id, images=_stored(p.images), attempts=attempts_of(p.attempts), error_stage=p.error_stage,
        retryable=p.retryable,
    )


async def _read_by_query(handle, desc, task_id, user_id, kind) -> GenerationState:
    p: Progress = await handle.query(GenerationWorkflow.progress, rpc_timeout=QUERY_TIMEOUT)
    return GenerationState(_view_of_progress(p, task_id, kind, _iso(desc.start_time)), user_id, True, "query")


async def _failed_view(handle, desc, task_id, kind) -> GenerationView:
    try:
        await handle.result()
    except WorkflowFailureError as failure:
        cause = failure.cause
        if isinstance(cause, ApplicationError) and cause.details:
            detail = cause.details[0]
            r = GenerationResult(**detail) if isinstance(detail, dict) else detail
            return _view_from_result(task_id, kind, r, desc)
        message = str(cause) if cause else "the workflow failed"
        return GenerationView(id=task_id, kind=kind, status=Status.FAILED.value, stage=Stage.DONE.value,
                              progress=100, error={"code": getattr(cause, "type", None) or "Internal", "message": message},
                              created_at=_iso(desc.start_time), completed_at=_iso(desc.close_time))
    raise RuntimeError("a failed workflow returned a result")  # pragma: no cover - Temporal invariant


async def wait_closed(client: Client, task_id: str, *, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for the generation's workflow to close; True if it did. Reads its
    result (a long poll on the history): nothing is written to the workflow."""
    handle = client.get_workflow_handle(task_id, result_type=GenerationResult)
    try:
        await asyncio.wait_for(handle.result(), timeout=timeout_s)
    except asyncio.TimeoutError:
        return False
    except WorkflowFailureError:
        return True  # failed or canceled: closed all the same
    except RPCError:
        return False  # Temporal unreachable: the client gets 202 and can poll
    return True


async def cancel_generation(client: Client, task_id: str) -> None:
    await client.get_workflow_handle(task_id).cancel()


# ---- listing and describing, without a worker ------------------------------------------

LIST_TIMEOUT = timedelta(seconds=10)
# What may be spliced into a visibility query: ids we minted and enum values, nothing else.
_TERMINAL = frozenset(s.value for s in Status if s.terminal)
_QUERY_SAFE = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")


@dataclass
class GenerationSummary:
    """What visibility knows of a generation: enough for a list, no query, no worker."""

    id: str
    user_id: str
    kind: str
    status: str
    created_at: str | None
    completed_at: str | None
    running: bool


def _summary_status(execution: WorkflowExecutionStatus | None, sa_status: str | None) -> str:
    """The generation's status from visibility: the workflow's own search attribute, unless the
    execution was closed from outside (terminated, timed out) before it could write one."""
    if execution == WorkflowExecutionStatus.RUNNING or execution is None:
        return sa_status or Status.QUEUED.value
    if sa_status in _TERMINAL:
        return sa_status
    if execution == WorkflowExecutionStatus.CANCELED:
        return Status.CANCELED.value
    if execution == WorkflowExecutionStatus.COMPLETED:
        return Status.COMPLETED.value
    return Status.FAILED.value


def _summary(execution: WorkflowExecution) -> GenerationSummary:
    attrs = execution.typed_search_attributes
    return GenerationSummary(
        id=execution.id, user_id=attrs.get(USER_KEY) or "", kind=attrs.get(KIND_KEY) or "",
        status=_summary_status(execution.status, attrs.get(STATUS_KEY)),
        created_at=_iso(execution.start_time), completed_at=_iso(execution.close_time),
        running=execution.status == WorkflowExecutionStatus.RUNNING,
    )


async def describe_generation(client: Client, task_id: str) -> GenerationSummary | None:
    """One describe call: owner, kind and status of a generation, or None if there is none."""
    desc = await describe_if_exists(client.get_workflow_handle(task_id))
    if desc is None or desc.workflow_type != WORKFLOW_TYPE:
        return None
    return _summary(desc)


def _quoted(value: str) -> str:
    if not _QUERY_SAFE.fullmatch(value):
        raise ValueError(f"not a value for a visibility query: {value!r}")
    return f'"{value}"'


def generations_query(user_id: str, *, status: str | None = None, kind: str | None = None) -> str:
    """The visibility query for a user's generations. Filters must be enum values (ValueError otherwise)."""
    clauses = [f"WorkflowType={_quoted(WORKFLOW_TYPE)}", f"{SA_USER_ID}={_quoted(user_id)}"]
    if status is not None:
        clauses.append(f"{SA_STATUS}={_quoted(Status(status).value)}")
    if kind is not None:
        clauses.append(f"{SA_KIND}={_quoted(Kind(kind).value)}")
    return " AND ".join(clauses)


async def list_generations(client: Client, user_id: str, *, status: str | None = None, kind: str | None = None,
                           page_size: int = 20, page_token: bytes | None = None,
                           ) -> tuple[list[GenerationSummary], bytes | None]:
    """One page of a user's generations through Temporal visibility, in its order: running
    ones first, then closed ones, most recently closed first. Returns (page, next token)."""
    pages = client.list_workflows(generations_query(user_id, status=status, kind=kind), page_size=page_size,
                                  next_page_token=page_token, rpc_timeout=LIST_TIMEOUT)
    await pages.fetch_next_page()
    return [_summary(e) for e in pages.current_page or []], pages.next_page_token


# ---- deleting what a generation left behind --------------------------------------------

MAX_ERASED_GENERATIONS = 10_000


async def closed_generations(client: Client, task_ids: list[str]) -> list[str]:
    """Those of `task_ids` that are no longer running (or no longer exist)."""
    closed = []
    for task_id in task_ids:
        summary = await describe_generation(client, task_id)
        if summary is None or not summary.running:
            closed.append(task_id)
    return closed


# Codes a delete can meet from a busy or restarting server that are worth another try: the
# dev server has answered CANCELLED ("operation was canceled") to a delete that came just after
# the workflow closed. Deleting is idempotent (NOT_FOUND means already gone), so trying again is safe.
_RETRIED_DELETE_CODES = frozenset({RPCStatusCode.CANCELLED, RPCStatusCode.UNAVAILABLE,
                                   RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.RESOURCE_EXHAUSTED,
                                   RPCStatusCode.ABORTED})
DELETE_BACKOFF_S = (0.2, 0.5, 1.0)
DELETE_TIMEOUT = timedelta(seconds=10)


async def _delete_execution(client: Client, workflow_id: str) -> bool | None:
    """Delete one execution's history: True if deleted, False if it was already gone, None if
    the server kept failing with a passing error (the history stays; erasing again removes it)."""
    from temporalio.api.common.v1 import WorkflowExecution as ExecutionRef
    from temporalio.api.workflowservice.v1 import DeleteWorkflowExecutionRequest

    request = DeleteWorkflowExecutionRequest(namespace=client.namespace,
                                             workflow_execution=ExecutionRef(workflow_id=workflow_id))
    for attempt in range(len(DELETE_BACKOFF_S) + 1):
        try:
            await client.workflow_service.delete_workflow_execution(request, timeout=DELETE_TIMEOUT)
            return True
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return False
            if err.status not in _RETRIED_DELETE_CODES:
                raise
            if attempt == len(DELETE_BACKOFF_S):
                log.warning("Temporal would not delete %s (%s: %s); it stays until the next erase",
                            workflow_id, err.status.name, err.message)
                return None
            await asyncio.sleep(DELETE_BACKOFF_S[attempt])
    return None  # not reached: the loop returns on its last attempt


@dataclass
class ErasedGenerations:
    canceled: int
    histories_deleted: int
    still_running: int
    histories_left: int = 0


async def erase_generations(client: Client, user_id: str, *, settle_s: float = 10.0) -> ErasedGenerations:
    """Cancel the user's running generations (they refund), then delete the histories of the
    closed ones and of their webhook deliveries: prompts and image references leave Temporal too.
    A generation still closing after `settle_s` keeps its history; erasing again removes it."""
    query = f"{SA_USER_ID}={_quoted(user_id)}"
    executions = [e async for e in client.list_workflows(query, limit=MAX_ERASED_GENERATIONS, rpc_timeout=LIST_TIMEOUT)]
    running = [e.id for e in executions if e.status == WorkflowExecutionStatus.RUNNING]
    for task_id in running:
        with contextlib.suppress(RPCError):
            await cancel_generation(client, task_id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settle_s
    pending = list(running)
    while pending and loop.time() < deadline:
        closed = set(await closed_generations(client, pending))
        pending = [t for t in pending if t not in closed]
        if pending:
            await asyncio.sleep(0.25)
    closed = [e.id for e in executions if e.id not in pending]
    deleted = left = 0
    for start in range(0, len(closed), 50):
        chunk = closed[start:start + 50]
        # Their webhook deliveries carry the generation object too: gone with them, finished or not.
        family = f"RootWorkflowId IN ({', '.join(_quoted(i) for i in chunk)})"
        children = [w.id async for w in client.list_workflows(family, limit=MAX_ERASED_GENERATIONS,
                                                              rpc_timeout=LIST_TIMEOUT) if w.id not in chunk]
        for workflow_id in children:
            left += await _delete_execution(client, workflow_id) is None
        for workflow_id in chunk:
            outcome = await _delete_execution(client, workflow_id)
            deleted += outcome is True
            left += outcome is None
    return ErasedGenerations(canceled=len(running), histories_deleted=deleted, still_running=len(pending),
                             histories_left=left)


# ---- the progress stream ----------------------------------------------------------------


@dataclass
class EventsRead:
    """One look at a generation for the progress stream."""

    user_id: str
    running: bool
    # The changes after the asked sequence number and the current progress; empty and None when
    # no worker answered (queued with no worker yet, or a closed workflow with none to replay it).
    events: list[ProgressEvent]
    progress: Progress | None


async def read_events(client: Client, task_id: str, after_seq: int) -> EventsRead | None:
    """The generation's visible changes after `after_seq` through the workflow's `events` query
    (read-only: nothing is written to its history), or None if there is no such generation."""
    from temporalio.client import WorkflowQueryFailedError, WorkflowQueryRejectedError

    handle = client.get_workflow_handle(task_id)
    desc = await describe_if_exists(handle)
    if desc is None or desc.workflow_type != WORKFLOW_TYPE:
        return None
    attrs = desc.typed_search_attributes
    user_id = attrs.get(USER_KEY) or ""
    running = desc.status == WorkflowExecutionStatus.RUNNING
    if running and (attrs.get(STATUS_KEY) or Status.QUEUED.value) == Status.QUEUED.value:
        # No worker has run its first task: none could answer a query either.
        return EventsRead(user_id, running, [], None)
    try:
        page: EventsPage = await handle.query(GenerationWorkflow.events, EventsRequest(after_seq=after_seq),
                                              rpc_timeout=QUERY_TIMEOUT)
    except (RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError):
        return EventsRead(user_id, running, [], None)
    return EventsRead(user_id, running, list(page.events), page.progress)
