"""Retention: delete input images a while after their generation ended, and uploads nobody uses;
then sweep the blob store for blobs nobody holds (outputs that never became a work).

The generation's state comes from Temporal (describe: running, or closed and when), the holders
and the blobs from atelier.deletion. A running generation never loses its inputs."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from atelier import deletion
from atelier.blobstore import BlobStore
from atelier.messages import RetentionRequest
from atelier.retention_messages import CleanResult

# A generation Temporal no longer knows (its history passed the namespace's retention) ended long ago.
_LONG_AGO = datetime.min.replace(tzinfo=timezone.utc)


class RetentionActivities:
    def __init__(self, engine: AsyncEngine, blobs: BlobStore, client: Client, *, retention_hours: float) -> None:
        self.engine = engine
        self.blobs = blobs
        self.client = client
        self.retention = timedelta(hours=retention_hours)

    async def _ended_at(self, task_id: str) -> datetime | None:
        """When the generation closed; None while it runs."""
        try:
            desc = await self.client.get_workflow_handle(task_id).describe()
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return _LONG_AGO
            raise
        if desc.status == WorkflowExecutionStatus.RUNNING:
            return None
        return desc.close_time or _LONG_AGO

    async def _ended_before(self, task_ids: list[str], cutoff: datetime) -> list[str]:
        ended = []
        for task_id in task_ids:
            activity.heartbeat(task_id)
            ended_at = await self._ended_at(task_id)
            if ended_at is not None and ended_at < cutoff:
                ended.append(task_id)
        return ended

    @activity.defn
    async def clean_inputs(self, req: RetentionRequest) -> CleanResult:
        cutoff = datetime.now(timezone.utc) - self.retention
        candidates = await deletion.input_tasks_before(self.engine, cutoff, limit=req.batch)
        ended = await self._ended_before(candidates, cutoff)
        deleted = await deletion.release_inputs(self.engine, self.blobs, ended)
        # Outputs of generations whose work a late refund withdrew: nobody's to keep.
        withdrawn = await deletion.withdrawn_output_tasks_before(self.engine, cutoff, limit=req.batch)
        deleted += await deletion.release_outputs(self.engine, self.blobs,
                                                  await self._ended_before(withdrawn, cutoff))
        uploads, deleted_uploads = await deletion.expire_uploads(self.engine, self.blobs, cutoff, limit=req.batch)
        deleted += deleted_uploads
        swept = await self._sweep()
        activity.logger.info("retention: %d generation(s) released their inputs, %d withdrawn output set(s), "
                             "%d upload(s) expired, %d blob(s) deleted; sweep: %d file(s) examined, %d unheld "
                             "blob(s) and %d leftover(s) deleted%s", len(ended), len(withdrawn), uploads,
                             len(deleted), swept.examined, swept.deleted, swept.leftovers,
                             " (store gone through, starting over)" if swept.wrapped else "")
        return CleanResult(
            generations_released=len(ended), uploads_deleted=uploads, blobs_deleted=len(deleted) + swept.deleted,
            more=(len(candidates) == req.batch and bool(ended)) or uploads == req.batch,
            blobs_examined=swept.examined, unheld_blobs_deleted=swept.deleted, leftovers_deleted=swept.leftovers,
        )

    async def _sweep(self) -> deletion.Swept:
        """Blobs nobody holds, older than the input retention (at least an hour): see
        deletion.sweep_unheld. A disk error here is logged, and never stops the input retention."""
        try:
            return await deletion.sweep_unheld(
                self.engine, self.blobs, older_than_s=self.retention.total_seconds(),
                beat=lambda examined: activity.heartbeat(f"sweep: {examined} file(s) examined"))
        except OSError as err:
            activity.logger.warning("retention: the sweep of unheld blobs failed, next run tries again: %s", err)
            return deletion.Swept()
