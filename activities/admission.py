"""Reaching a model's admission workflow from a generation, and checking on slot holders.

A workflow cannot signal-with-start another workflow, so asking for a slot is this short
activity: it signals the model's admission workflow, starting it when it does not run yet.
"""

from __future__ import annotations

import asyncio

from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.common import WorkflowIDConflictPolicy

from atelier.messages import (
    ADMISSION_WORKFLOW_TYPE,
    AdmissionState,
    HolderCheck,
    HolderCheckResult,
    SlotRequest,
    SlotTicket,
    admission_task_queue,
    admission_workflow_id,
)
from atelier.temporal_calls import describe_if_exists


# Slot requests one worker process sends at once (see AdmissionActivities.__init__).
REQUESTS_AT_ONCE = 4


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
            await self._request(workflow_id, req)
        return SlotTicket(workflow_id=workflow_id)

    async def _request(self, workflow_id: str, req: SlotRequest) -> None:
        await self.client.start_workflow(
            ADMISSION_WORKFLOW_TYPE,
            AdmissionState(model=req.model, aging_s=self.aging_s, check_every_s=self.check_every_s),
            id=workflow_id,
            # Its own queue: its tasks never wait behind a burst of generation tasks.
            task_queue=admission_task_queue(self.task_queue),
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            start_signal="request_slot",
            start_signal_args=[req],
            static_summary=f"Call slots of {req.model}",
        )

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
