"""Does the Temporal dev server honour task fairness keys (`temporalio.common.Priority`)?

One backlog on one activity task queue: user `heavy` schedules 40 activities, then four other
users one each, all with `Priority(fairness_key=<user>)`; only then does one worker (one slot)
start taking them. Where the four light users' activities land in the order of execution tells
whether the queue is FIFO (they run 41st to 44th) or fair (they run among the first few).
Each arm is a fresh dev server with its own `--dynamic-config-value` flags.

    python -m bench.fairness_keys           # the arms below
    python -m bench.fairness_keys --quick   # fewer tasks
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.common import Priority
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from bench.common import (
    DEV_SERVER_STARTUP,
    TEMPORAL_BIN,
    console,
    dynamic_config_flags,
    parser,
    print_table,
    resolve_paths,
    run_main,
    write_result,
)

ONE_PARTITION = ["matching.numTaskqueueReadPartitions=1", "matching.numTaskqueueWritePartitions=1"]
ARMS = {
    "default": [],
    "enableFairness": ["matching.enableFairness=true"],
    "autoEnableV2": ["matching.autoEnableV2=true"],
    "useNewMatcher": ["matching.useNewMatcher=true"],
    # The dev server splits a task queue into 4 partitions, each matched on its own: with one,
    # the order the matcher chose is the order the worker sees.
    "default, 1 partition": ONE_PARTITION,
    "enableFairness, 1 partition": ["matching.enableFairness=true", *ONE_PARTITION],
}
LIGHT_USERS = ["ann", "ben", "cat", "dan"]


@dataclass
class Job:
    user: str = ""
    index: int = 0
    activity_queue: str = ""
    priority_key: int = 0


_ran: list[str] = []


@activity.defn(name="fairness_probe_work")
async def work(job: Job) -> None:
    _ran.append(job.user)
    await asyncio.sleep(0.02)


@workflow.defn(name="FairnessProbe")
class FairnessProbe:
    @workflow.run
    async def run(self, job: Job) -> None:
        await workflow.execute_activity(
            work, job, task_queue=job.activity_queue, start_to_close_timeout=timedelta(seconds=60),
            priority=Priority(fairness_key=job.user, priority_key=job.priority_key or None))


async def one_arm(flags: list[str], heavy: int) -> dict:
    extra = dynamic_config_flags(["frontend.enableUpdateWorkflowExecution=true", *flags])
    env = await WorkflowEnvironment.start_local(dev_server_existing_path=str(TEMPORAL_BIN),
                                                dev_server_extra_args=extra,
                                                dev_server_startup_timeout=DEV_SERVER_STARTUP)
    try:
        client = env.client
        wf_queue, act_queue = f"wf-{uuid.uuid4().hex[:8]}", f"act-{uuid.uuid4().hex[:8]}"
        _ran.clear()
        jobs = [Job("heavy", i, act_queue) for i in range(heavy)] + [Job(u, 0, act_queue) for u in LIGHT_USERS]
        # Unsandboxed: this module imports the bench helpers, which the sandbox would refuse.
        async with Worker(client, task_queue=wf_queue, workflows=[FairnessProbe],
                          workflow_runner=UnsandboxedWorkflowRunner()):
            handles = []
            for job in jobs:  # in order: the heavy user's backlog is older
                handles.append(await client.start_workflow(FairnessProbe.run, job, id=f"p-{uuid.uuid4().hex}",
                                                           task_queue=wf_queue))
            # Every activity scheduled before a worker polls the activity queue: a real backlog.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                pending = 0
                for h in handles:
                    desc = await h.describe()
                    pending += len(desc.raw_description.pending_activities)
                if pending == len(jobs):
                    break
                await asyncio.sleep(0.2)
            async with Worker(client, task_queue=act_queue, activities=[work], max_concurrent_activities=1):
                await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 300)
        places = [i + 1 for i, user in enumerate(_ran) if user in LIGHT_USERS]
        return {"light_places": places, "total": len(_ran), "fair": max(places) <= len(LIGHT_USERS) + 4}
    finally:
        await env.shutdown()


async def main() -> None:
    args = resolve_paths(parser("fairness_keys", __doc__.splitlines()[0]).parse_args(), "fairness_keys")
    started = time.time()
    heavy = 12 if args.quick else 40
    arms = {"default": ARMS["default"], "enableFairness": ARMS["enableFairness"]} if args.quick else ARMS
    results = {}
    for name, arm_flags in arms.items():
        flags = [*arm_flags, *args.dynamic_config]
        console.print(f"arm {name}: {flags or 'no flags'}")
        results[name] = {"flags": flags, **await one_arm(flags, heavy)}
    print_table(f"Where 4 light users' activities ran among {heavy + 4} (1 = first)",
                ["arm", "dynamic config", "light users ran at", "fair?"],
                [[n, " ".join(r["flags"]) or "-", str(r["light_places"]), str(r["fair"])] for n, r in results.items()])
    write_result("fairness_keys", args, results, goals={"question": "are fairness keys honoured, and with which flag"},
                 started=started)


if __name__ == "__main__":
    run_main(main)
