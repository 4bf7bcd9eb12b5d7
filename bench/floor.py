"""The floor: a bare Temporal workflow of N sequential no-op activities, nothing else.

Used in-process (overhead) and as a worker process (`python -m bench.floor --task-queue Q`)
with the same worker options as the project's own worker, so the only difference between
the two is the project's code.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from dataclasses import dataclass
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import PollerBehaviorSimpleMaximum, Worker

FLOOR_ACTIVITIES = 6  # the generation's five activities plus a notify slot, as the issue counts them


@dataclass
class FloorInput:
    task_id: str = ""
    steps: int = FLOOR_ACTIVITIES
    activity_task_queue: str = ""


@dataclass
class StepInput:
    task_id: str = ""
    step: int = 0


@dataclass
class StepOutput:
    step: int = 0


@activity.defn(name="bench_noop")
async def noop(req: StepInput) -> StepOutput:
    return StepOutput(step=req.step)


@dataclass
class WaitInput:
    task_id: str = ""
    seconds: float = 60.0


@activity.defn(name="bench_wait")
async def wait(req: WaitInput) -> StepOutput:
    """A slow call that costs nothing: the floor of the concurrency benchmark."""
    await asyncio.sleep(req.seconds)
    return StepOutput(step=1)


@dataclass
class HeartbeatWaitInput:
    task_id: str = ""
    seconds: float = 60.0
    heartbeat_s: float = 0.0  # the activity's heartbeat timeout; 0: none, and no heartbeats
    beat_every_s: float = 0.0  # how often it calls heartbeat(); 0: as call_ai does (activities.heartbeat.beat_every)


@activity.defn(name="bench_wait_heartbeating")
async def wait_heartbeating(req: HeartbeatWaitInput) -> StepOutput:
    """A slow call that heartbeats exactly as call_ai does (activities.heartbeat.beat_every: every
    0.4 of the timeout; the SDK then sends at most one per 0.8 of it), or every `beat_every_s`."""
    from activities.heartbeat import beat_every, heartbeating

    timeout = activity.info().heartbeat_timeout
    if not timeout:
        await asyncio.sleep(req.seconds)
        return StepOutput(step=1)
    async with heartbeating(req.beat_every_s or beat_every(timeout)):
        await asyncio.sleep(req.seconds)
    return StepOutput(step=1)


@workflow.defn(name="BenchFloorHeartbeatWorkflow")
class FloorHeartbeatWorkflow:
    """One activity that waits and heartbeats like the AI call: the heartbeat benchmark."""

    @workflow.run
    async def run(self, req: HeartbeatWaitInput) -> int:
        out = await workflow.execute_activity(
            wait_heartbeating, req, start_to_close_timeout=timedelta(seconds=req.seconds + 300),
            heartbeat_timeout=timedelta(seconds=req.heartbeat_s) if req.heartbeat_s else None)
        return out.step


@dataclass
class ShapeInput:
    task_id: str = ""
    before: int = 3  # charge, download, select_model
    seconds: float = 60.0
    heartbeat_s: float = 55.0  # the AI call's heartbeat timeout (ATELIER_AI_HEARTBEAT_S)
    after: int = 1  # save_work
    # The first this many of the `before` steps side by side, scheduled by one workflow task, the
    # rest one after another: since the generation-2026-12 bundle, a generation whose inputs are
    # URLs (as in every benchmark) runs its charge and model choice side by side and downloads
    # after the charge (2); with uploaded inputs all three go side by side (3); before it, one by one (1).
    side_by_side: int = 2


@workflow.defn(name="BenchFloorShapeWorkflow")
class FloorShapeWorkflow:
    """A generation's shape with nothing in it: no-op activities before and after one activity
    that waits and heartbeats like the AI call (the burst goal's baseline, issue 13)."""

    @workflow.run
    async def run(self, req: ShapeInput) -> int:
        def step_(step: int):
            return workflow.execute_activity(noop, StepInput(task_id=req.task_id, step=step),
                                             start_to_close_timeout=timedelta(seconds=30))

        done = 0
        together = min(max(1, req.side_by_side), req.before)
        outs = await asyncio.gather(*(step_(step) for step in range(together)))
        done += sum(out.step == step for step, out in enumerate(outs))
        for step in range(together, req.before):
            done += (await step_(step)).step == step
        await workflow.execute_activity(
            wait_heartbeating, HeartbeatWaitInput(task_id=req.task_id, seconds=req.seconds, heartbeat_s=req.heartbeat_s),
            start_to_close_timeout=timedelta(seconds=req.seconds + 300),
            heartbeat_timeout=timedelta(seconds=req.heartbeat_s) if req.heartbeat_s else None)
        for step in range(req.after):
            done += (await step_(step)).step == step
        return done


@workflow.defn(name="BenchFloorWaitWorkflow")
class FloorWaitWorkflow:
    """One activity that waits: 1,000 of these in flight is the concurrency floor."""

    @workflow.run
    async def run(self, req: WaitInput) -> int:
        out = await workflow.execute_activity(wait, req, start_to_close_timeout=timedelta(seconds=req.seconds + 300))
        return out.step


@workflow.defn(name="BenchFloorWorkflow")
class FloorWorkflow:
    @workflow.run
    async def run(self, req: FloorInput) -> int:
        done = 0
        for step in range(req.steps):
            out = await workflow.execute_activity(
                noop, StepInput(task_id=req.task_id, step=step),
                start_to_close_timeout=timedelta(seconds=10),
                task_queue=req.activity_task_queue or None,
            )
            done += 1 if out.step == step else 0
        return done


def floor_worker(client: Client, task_queue: str, *, max_concurrent_activities: int = 200,
                 max_concurrent_workflow_tasks: int = 200, max_cached_workflows: int = 2000) -> Worker:
    """The same options build_workers gives the project's main worker (settings defaults)."""
    return Worker(
        client, task_queue=task_queue, workflows=[FloorWorkflow, FloorWaitWorkflow, FloorHeartbeatWorkflow, FloorShapeWorkflow],
        activities=[noop, wait, wait_heartbeating],
        max_concurrent_activities=max_concurrent_activities,
        max_concurrent_workflow_tasks=max_concurrent_workflow_tasks,
        max_cached_workflows=max_cached_workflows,
        workflow_task_poller_behavior=PollerBehaviorSimpleMaximum(maximum=5),
        activity_task_poller_behavior=PollerBehaviorSimpleMaximum(maximum=5),
        graceful_shutdown_timeout=timedelta(seconds=5),
    )


async def _serve(address: str, task_queue: str, max_concurrent_activities: int) -> None:
    client = await Client.connect(address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with floor_worker(client, task_queue, max_concurrent_activities=max_concurrent_activities):
        print("floor worker up", flush=True)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the bare-Temporal floor worker (used by the benchmarks).")
    parser.add_argument("--address", default="127.0.0.1:7233")
    parser.add_argument("--task-queue", required=True)
    parser.add_argument("--max-concurrent-activities", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(_serve(args.address, args.task_queue, args.max_concurrent_activities))


if __name__ == "__main__":
    main()
