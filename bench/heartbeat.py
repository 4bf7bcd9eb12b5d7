"""Heartbeats: what N waiting AI calls cost the worker and the server, by heartbeat timeout, and
how soon a dead worker is noticed.

N bare workflows (bench/floor.py) each run one activity that waits and heartbeats exactly as
call_ai does (every third of the heartbeat timeout, at most every 10 s; the SDK sends at most one
heartbeat per 0.8 of the timeout), on one worker process with N activity slots. Per arm (a
heartbeat timeout T, or none: no heartbeats at all): start them all, let them settle, then
measure the CPU of the worker and of the Temporal server over a window of W seconds while all N
wait. Then the worker is killed (SIGKILL) and a sample of the workflows is watched until the
server has timed their activity out and scheduled its retry: that is how long a dead worker
goes unnoticed.

Goal (issue 13, goal 2): with 1,000 calls waiting, worker + server under 0.15 cores; a dead
worker noticed within a minute.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

from bench.common import (
    console,
    parser,
    print_table,
    resolve_paths,
    run_main,
    stack,
    start_floor_worker,
    start_many,
    wait_for_pollers,
    write_result,
)
from bench.floor import FloorHeartbeatWorkflow, HeartbeatWaitInput

NAME = "heartbeat"
GOAL_CORES = 0.15
GOAL_DETECT_S = 60.0
SAMPLE = 10


def _cpu(ps) -> float:
    t = ps.cpu_times()
    return t.user + t.system


async def _pending_attempts(client, ids: list[str]) -> list[int]:
    attempts = []
    for wf in ids:
        desc = await client.get_workflow_handle(wf).describe()
        pending = list(desc.raw_description.pending_activities)
        attempts.append(pending[0].attempt if pending else 0)
    return attempts


async def arm(s, n: int, heartbeat_s: float, window: float, settle: float, detect: bool) -> dict:
    tq = f"hb-{uuid.uuid4().hex[:8]}"
    proc = start_floor_worker(s, tq, max_concurrent_activities=max(n, 200))
    await wait_for_pollers(s.client, [(tq, "workflow"), (tq, "activity")], proc)
    ids = [f"hb-{int(heartbeat_s)}-{i}-{uuid.uuid4().hex[:6]}" for i in range(n)]
    seconds = 3600.0  # they wait through the window; the worker is killed after it

    async def start(i: int):
        await s.client.start_workflow(FloorHeartbeatWorkflow.run,
                                      HeartbeatWaitInput(task_id=ids[i], seconds=seconds, heartbeat_s=heartbeat_s),
                                      id=ids[i], task_queue=tq)

    t0 = time.monotonic()
    await start_many(n, start)
    started_s = time.monotonic() - t0
    await asyncio.sleep(settle)
    w0, s0, c0 = _cpu(proc.ps), _cpu(s.server), time.monotonic()
    await asyncio.sleep(window)
    w1, s1, c1 = _cpu(proc.ps), _cpu(s.server), time.monotonic()
    elapsed = c1 - c0
    out = {"heartbeat_timeout_s": heartbeat_s, "n": n, "started_in_s": round(started_s, 1),
           "window_s": round(elapsed, 1), "worker_cores": round((w1 - w0) / elapsed, 3),
           "server_cores": round((s1 - s0) / elapsed, 3)}
    out["total_cores"] = round(out["worker_cores"] + out["server_cores"], 3)
    out["heartbeat_rpcs_per_s_expected"] = round(n / (0.8 * heartbeat_s), 1) if heartbeat_s else 0.0
    sample = ids[:: max(1, n // SAMPLE)][:SAMPLE]
    before = await _pending_attempts(s.client, sample)
    os.killpg(proc.popen.pid, signal.SIGKILL)  # the worker dies with every call in flight
    proc.popen.wait(timeout=10)
    killed = time.monotonic()
    if detect and heartbeat_s:
        deadline = killed + heartbeat_s + 60
        noticed = None
        while time.monotonic() < deadline:
            now = await _pending_attempts(s.client, sample)
            if all(a > b for a, b in zip(now, before)):
                noticed = time.monotonic() - killed
                break
            await asyncio.sleep(1.0)
        out["dead_worker_noticed_after_s"] = round(noticed, 1) if noticed is not None else None
    else:
        out["dead_worker_noticed_after_s"] = None  # no heartbeat: only the start-to-close timeout
    return out


async def bench(args) -> None:
    started = time.time()
    n, window, settle = (20, 3.0, 1.0) if args.quick else (args.count, args.window, args.settle)
    timeouts = [float(t) for t in args.timeouts.split(",")] if not args.quick else [0.0, 4.0]
    load = os.getloadavg()[0]
    results: dict = {"count": n, "arms": [], "load_average_1m": round(load, 2)}
    async with stack(NAME, keep_tmp=args.keep_tmp) as s:
        for t in timeouts:
            console.print(f"{n} waiting calls, heartbeat timeout {t or 'none'}")
            results["arms"].append(await arm(s, n, t, window, settle, detect=not args.no_detect))
    rows = [[a["heartbeat_timeout_s"] or "none", a["heartbeat_rpcs_per_s_expected"], a["worker_cores"],
             a["server_cores"], a["total_cores"], a["dead_worker_noticed_after_s"]] for a in results["arms"]]
    print_table(f"{n} waiting calls: CPU over {window:g} s, by heartbeat timeout",
                ["heartbeat timeout s", "heartbeats/s (expected)", "worker cores", "server cores", "total cores",
                 "dead worker noticed after s"], rows,
                caption=f"goal: total < {GOAL_CORES} cores, noticed within {GOAL_DETECT_S:g} s; "
                        f"load average {load:.1f} at start")
    results["goal_met"] = {str(a["heartbeat_timeout_s"]): bool(
        a["total_cores"] < GOAL_CORES and (not a["heartbeat_timeout_s"] or (
            a["dead_worker_noticed_after_s"] is not None and a["dead_worker_noticed_after_s"] <= GOAL_DETECT_S)))
        for a in results["arms"]}
    write_result(NAME, args, results, goals={"total_cores_max": GOAL_CORES, "noticed_within_s": GOAL_DETECT_S},
                 started=started)


def main() -> None:
    p = parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=1000, help="waiting calls")
    p.add_argument("--timeouts", default="0,30,60", help="heartbeat timeouts to measure, seconds (0: none)")
    p.add_argument("--window", type=float, default=60.0, help="measured seconds while all wait")
    p.add_argument("--settle", type=float, default=10.0, help="seconds after the last start before measuring")
    p.add_argument("--no-detect", action="store_true", help="skip the dead-worker detection")
    args = resolve_paths(p.parse_args(), NAME)
    run_main(lambda: bench(args))


if __name__ == "__main__":
    main()
