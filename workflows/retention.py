"""RetentionWorkflow: one clean-up run, started by the retention Schedule (visible in the Temporal
UI as `atelier-retention-<task queue>`): inputs of generations that ended more than
ATELIER_INPUT_RETENTION_HOURS ago, and uploads no generation holds, are deleted; each
clean_inputs call also sweeps part of the blob store for blobs nobody holds (see
atelier/deletion.py, sweep_unheld: the activity does it, this workflow's commands are unchanged)."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.retention import RetentionActivities
    from atelier.messages import RetentionRequest, RetentionResult

# Batches per run: the next scheduled run picks up whatever is left.
MAX_BATCHES = 20
# One batch describes up to `batch` generations and deletes files: minutes at most.
CLEAN_TIMEOUT = timedelta(minutes=10)
CLEAN_HEARTBEAT = timedelta(minutes=1)
# A database or Temporal blip: a few tries, then the next scheduled run tries again.
CLEAN_RETRY = RetryPolicy(initial_interval=timedelta(seconds=2), backoff_coefficient=2.0,
                          maximum_interval=timedelta(minutes=1), maximum_attempts=5)


@workflow.defn(name="RetentionWorkflow")
class RetentionWorkflow:
    @workflow.run
    async def run(self, req: RetentionRequest) -> RetentionResult:
        total = RetentionResult()
        for _ in range(MAX_BATCHES):
            done: RetentionResult = await workflow.execute_activity_method(
                RetentionActivities.clean_inputs, req,
                start_to_close_timeout=CLEAN_TIMEOUT, heartbeat_timeout=CLEAN_HEARTBEAT, retry_policy=CLEAN_RETRY,
                summary="Delete expired inputs and unused uploads",
            )
            total.generations_released += done.generations_released
            total.uploads_deleted += done.uploads_deleted
            total.blobs_deleted += done.blobs_deleted
            if not done.more:
                break
        return total
