"""What must be true after a run, read from the database, the blob store and Temporal:
never from a log line, never from what the run believes it did.

    states = await final_states(client, task_ids)
    violations = await check_money_and_works(engine, blobs, states, costs, submitted_ids)
    violations += await check_replay(client, task_ids)
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError, WorkflowHistory
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError
from temporalio.worker import Replayer

from atelier.blobstore import BlobStore
from atelier.db import files, ledger, users, works
from atelier.messages import GenerationResult, Status
from workflows.generation import GenerationWorkflow, WebhookDeliveryWorkflow

TERMINAL_EXECUTIONS = {
    WorkflowExecutionStatus.COMPLETED, WorkflowExecutionStatus.FAILED, WorkflowExecutionStatus.CANCELED,
}


@dataclass
class Violation:
    kind: str
    task_id: str | None
    detail: str

    def to_dict(self) -> dict:
        return {"kind": self.kind, "task_id": self.task_id, "detail": self.detail}


@dataclass
class FinalState:
    """A generation as Temporal has it: the execution's status and the workflow's own result."""

    task_id: str
    execution: str  # RUNNING, COMPLETED, FAILED, CANCELED, TERMINATED, TIMED_OUT, MISSING
    status: str | None = None  # completed | rejected | failed | canceled (None while open or unknown)
    error_code: str | None = None
    work_id: str | None = None
    image_keys: list[str] = field(default_factory=list)

    @property
    def closed(self) -> bool:
        return self.execution not in ("RUNNING", "MISSING")


async def describe_status(client: Client, task_id: str) -> str:
    try:
        desc = await client.get_workflow_handle(task_id).describe()
    except RPCError as err:
        if "not found" in str(err).lower():
            return "MISSING"
        raise
    return desc.status.name if desc.status else "UNKNOWN"


async def final_state(client: Client, task_id: str) -> FinalState:
    execution = await describe_status(client, task_id)
    state = FinalState(task_id, execution)
    handle = client.get_workflow_handle(task_id, result_type=GenerationResult)
    if execution == "COMPLETED":
        result = await handle.result()
        state.status, state.error_code, state.work_id = result.status, result.error_code, result.work_id
        state.image_keys = [i.key for i in result.images]
    elif execution == "FAILED":
        try:
            await handle.result()
        except WorkflowFailureError as failure:
            cause = failure.cause
            state.status = Status.FAILED.value
            if isinstance(cause, ApplicationError):
                state.error_code = cause.type
                if cause.details:
                    detail = cause.details[0]
                    result = GenerationResult(**detail) if isinstance(detail, dict) else detail
                    state.status = result.status
    elif execution == "CANCELED":
        state.status = Status.CANCELED.value
    return state


async def final_states(client: Client, task_ids: list[str], *, concurrency: int = 16) -> dict[str, FinalState]:
    gate = asyncio.Semaphore(concurrency)

    async def one(task_id: str) -> FinalState:
        async with gate:
            return await final_state(client, task_id)

    return {s.task_id: s for s in await asyncio.gather(*(one(t) for t in task_ids))}


def check_terminal(states: dict[str, FinalState]) -> list[Violation]:
    out = []
    for s in states.values():
        if s.execution == "MISSING":
            out.append(Violation("lost", s.task_id, "accepted by the API but no workflow exists"))
        elif s.execution == "RUNNING":
            out.append(Violation("stuck", s.task_id, "still running past its deadline"))
        elif s.execution not in {e.name for e in TERMINAL_EXECUTIONS}:
            out.append(Violation("not_terminal", s.task_id, f"execution ended {s.execution}: no refund could run"))
        elif s.status not in {"completed", "rejected", "failed", "canceled"}:
            out.append(Violation("unknown_status", s.task_id, f"{s.execution} with status {s.status!r}"))
    return out


async def check_money_and_works(engine: AsyncEngine, blobs: BlobStore, states: dict[str, FinalState],
                                costs: dict[str, int], user_ids: set[str]) -> list[Violation]:
    """Per task: charged - refunded is the cost if completed, else 0. No ledger row or work
    without its task. Balances equal the sum of their ledger and are never negative. At most
    one work per task; a completed task's work holds its images, in the blob store, owned by the user."""
    out: list[Violation] = []
    async with engine.connect() as conn:
        ledger_rows = (await conn.execute(select(ledger.c.task_id, ledger.c.entry, ledger.c.amount,
                                                 ledger.c.user_id))).all()
        work_rows = (await conn.execute(select(works.c.id, works.c.task_id, works.c.user_id, works.c.images))).all()
        balances = dict((await conn.execute(select(users.c.id, users.c.balance))).all())
        output_files = {(r.user_id, r.blob_key) for r in
                        (await conn.execute(select(files.c.user_id, files.c.blob_key)
                                            .where(files.c.origin == "output"))).all()}

    charged: dict[str, int] = defaultdict(int)
    refunded: dict[str, int] = defaultdict(int)
    rows_per_entry: dict[tuple[str, str], int] = defaultdict(int)
    ledger_sum: dict[str, int] = defaultdict(int)
    for r in ledger_rows:
        ledger_sum[r.user_id] += int(r.amount)
        if r.entry == "grant":
            continue
        rows_per_entry[(r.task_id, r.entry)] += 1
        if r.task_id not in states:
            out.append(Violation("orphan_ledger_row", r.task_id, f"{r.entry} of {abs(int(r.amount))} for no submitted generation"))
            continue
        if r.entry == "charge":
            charged[r.task_id] += -int(r.amount)
        else:
            refunded[r.task_id] += int(r.amount)
    for (task_id, entry), n in rows_per_entry.items():
        if n > 1:
            out.append(Violation("duplicate_ledger_row", task_id, f"{n} {entry} rows"))

    for task_id, s in states.items():
        c, r = charged[task_id], refunded[task_id]
        expected = costs[task_id] if s.status == "completed" else 0
        if c - r != expected:
            out.append(Violation("money", task_id, f"{s.status}: charged {c} - refunded {r} != {expected}"))
        if r > c:
            out.append(Violation("money", task_id, f"refunded {r} more than charged {c}"))
        if s.status == "rejected" and c != 0:
            out.append(Violation("money", task_id, f"rejected but charged {c}"))

    for user_id, balance in balances.items():
        if balance < 0:
            out.append(Violation("negative_balance", None, f"user {user_id} has {balance}"))
        if balance != ledger_sum[user_id]:
            out.append(Violation("balance_mismatch", None,
                                 f"user {user_id}: balance {balance} != ledger sum {ledger_sum[user_id]}"))
    unknown_users = set(balances) - user_ids
    if unknown_users:
        out.append(Violation("unknown_user", None, f"users the run did not create: {sorted(unknown_users)}"))

    works_of: dict[str, list] = defaultdict(list)
    for w in work_rows:
        works_of[w.task_id].append(w)
        if w.task_id not in states:
            out.append(Violation("orphan_work", w.task_id, f"work {w.id} for no submitted generation"))
    for task_id, s in states.items():
        found = works_of.get(task_id, [])
        if len(found) > 1:
            out.append(Violation("duplicate_work", task_id, f"{len(found)} works"))
        if s.status != "completed":
            if found:
                out.append(Violation("work_without_completion", task_id,
                                     f"{s.status} (refunded) yet work {found[0].id} was saved"))
            continue
        if not found:
            out.append(Violation("completed_without_work", task_id, "completed but no work saved"))
            continue
        work = found[0]
        keys = [i["key"] for i in work.images]
        if s.work_id != work.id:
            out.append(Violation("work_mismatch", task_id, f"result names work {s.work_id}, saved {work.id}"))
        if not keys or keys != s.image_keys:
            out.append(Violation("work_mismatch", task_id, f"result images {s.image_keys} != work images {keys}"))
        for key in keys:
            if not blobs.exists(key) or blobs.path(key).stat().st_size == 0:
                out.append(Violation("missing_blob", task_id, f"image {key} is not in the blob store"))
            if (work.user_id, key) not in output_files:
                out.append(Violation("output_not_owned", task_id, f"image {key} is not the user's file"))
    return out


async def check_replay(client: Client, task_ids: list[str], *, concurrency: int = 8) -> tuple[list[Violation], int]:
    """Every history replays against the current workflow code. Returns (violations, histories replayed)."""
    gate = asyncio.Semaphore(concurrency)

    missing: list[Violation] = []

    async def fetch(workflow_id: str) -> WorkflowHistory | None:
        async with gate:
            try:
                return await client.get_workflow_handle(workflow_id).fetch_history()
            except RPCError as err:
                missing.append(Violation("history_missing", workflow_id, f"{err.status.name}: {err.message}"))
                return None

    histories = [h for h in await asyncio.gather(*(fetch(t) for t in task_ids)) if h is not None]
    run_to_task = {h.run_id: h.workflow_id for h in histories}

    async def stream():
        for h in histories:
            yield h

    replayer = Replayer(workflows=[GenerationWorkflow, WebhookDeliveryWorkflow])
    results = await replayer.replay_workflows(stream(), raise_on_replay_failure=False)
    violations = missing + [Violation("replay", run_to_task.get(run_id, run_id), f"{type(err).__name__}: {err}")
                            for run_id, err in results.replay_failures.items()]
    return violations, len(histories)
