"""Reaching a model's admission workflow from a generation, and checking on slot holders.

A workflow cannot signal-with-start (nor update-with-start) another workflow, so asking for a
slot is this short local activity: it sends the model's admission workflow the `join_line`
update, starting it when it does not run yet, whose answer is the slot itself when one is free.
Should the update not be answered (Temporal refuses more than a few updates in flight per
workflow, or the admission workflow is slow to take it), it falls back to the `request_slot`
signal, whose grant comes as a signal later; the admission workflow takes the same ticket once.
"""

from __future__ import annotations

import asyncio
import logging

from temporalio import activity
from temporalio.client import Client, WithStartWorkflowOperation, WorkflowExecutionStatus
from temporalio.common import WorkflowIDConflictPolicy

from atelier.messages import (
    ADMISSION_WORKFLOW_TYPE,
    AdmissionState,
    HolderCheck,
    HolderCheckResult,
    LineAnswer,
    SlotRequest,
    SlotTicket,
    admission_task_queue,
    admission_workflow_id,
)
from atelier.temporal_calls import describe_if_exists


log = logging.getLogger(__name__)

# Slot requests one worker process sends at once (see AdmissionActivities.__init__). Temporal keeps
# at most 10 updates in flight per workflow (history.maxInFlightUpdates): with more worker
# processes than two, a burst can exceed it; the client retries a refused update with a backoff of
# seconds (measured on the dev server: 14 at once, all answered within 3-10 s).
REQUESTS_AT_ONCE = 4
# How long a join_line update may take (one admission workflow task, normally well under a second)
# before the request falls back to the signal.
ANSWER_WITHIN_S = 5.0


class AdmissionActivities:
    def __init__(self, client: Client, *, task_queue: str, aging_s: float = 120.0,
                 check_every_s: float = 30.0) -> None:
        self.client = client
        self.task_queue = task_queue
        self.aging_s = aging_s
        self.check_every_s = check_every_s
        # Requests this process sends at once. Temporal applies a workflow's signals one at a time
        # under that workflow's lock; a burst of hundreds at once queued the admission workflow's
        # own task completions behind them (grants stalled for 20 s in bench/quota.py's burst).
        self._sending = asyncio.Semaphore(REQUESTS_AT_ONCE)

    @activity.defn
    async def request_slot(self, req: SlotRequest) -> SlotTicket:
        """Queue `req` at the model's admission workflow (started if none runs)."""
        workflow_id = admission_workflow_id(req.model, self.task_queue)
        async with self._sending:
            try:
                async with asyncio.timeout(ANSWER_WITHIN_S):
                    answer = await self._join(workflow_id, req)
            except Exception as err:  # noqa: BLE001 - refused, slow or failed: the signal still queues it
                log.info("join_line for %s not answered (%s: %s); requesting by signal", req.ticket,
                         type(err).__name__, err)
                await self._request(workflow_id, req)
                answer = LineAnswer()
        return SlotTicket(workflow_id=workflow_id, granted=answer.granted, position=answer.position,
                          eta_s=answer.eta_s)

    def _start(self, workflow_id: str, req: SlotRequest) -> dict:
        return dict(
            id=workflow_id,
            # Its own queue: its tasks never wait behind a burst of generation tasks.
            task_queue=admission_task_queue(self.task_queue),
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            static_summary=f"Call slots of {req.model}",
        )

    def _state(self, req: SlotRequest) -> AdmissionState:
        return AdmissionState(model=req.model, aging_s=self.aging_s, check_every_s=self.check_every_s)

    async def _join(self, workflow_id: str, req: SlotRequest) -> LineAnswer:
        start = WithStartWorkflowOperation(ADMISSION_WORKFLOW_TYPE, self._state(req), **self._start(workflow_id, req))
        return await self.client.execute_update_with_start_workflow(
            "join_line", req, start_workflow_operation=start, result_type=LineAnswer)

    async def _request(self, workflow_id: str, req: SlotRequest) -> None:
        await self.client.start_workflow(ADMISSION_WORKFLOW_TYPE, self._state(req), start_signal="request_slot",
                                         start_signal_args=[req], **self._start(workflow_id, req))

    @activity.defn
    async def check_holders(self, req: HolderCheck) -> HolderCheckResult:
        """Which of these generations are no longer running (closed, or unknown to Temporal)."""

        async def closed(task_id: str) -> bool:
            desc = await describe_if_exists(self.client.get_workflow_handle(task_id))
            return desc is None or desc.status != WorkflowExecutionStatus.RUNNING

        gate = asyncio.Semaphore(20)

        async def bounded(task_id: str) -> bool:
            async with gate:
                return await closed(task_id)

        answers = await asyncio.gather(*(bounded(t) for t in req.task_ids))
        return HolderCheckResult(closed=[t for t, gone in zip(req.task_ids, answers) if gone])
