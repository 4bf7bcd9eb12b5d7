"""Heartbeats: what N waiting AI calls cost the worker and the server, by heartbeat timeout, and
how soon a dead worker is noticed.

N bare workflows (bench/floor.py) each run one activity that waits and heartbeats exactly as
call_ai does (activities.heartbeat.beat_every: every 0.4 of the heartbeat timeout; the SDK sends
at most one heartbeat per 0.8 of the timeout), on one worker process with N activity slots. Per
arm (a heartbeat timeout T, or none: no heartbeats at all; `T/P` beats every P seconds instead,
e.g. `50/10` as call_ai did before): start them all, wait until every call has passed its first
throttle window (the steady state), then measure the CPU of the worker and of the Temporal server
over a window of W seconds while all N wait, and count from the server's own metrics the
heartbeats it recorded and the heartbeat-timeout timers it processed. Then the worker is killed (SIGKILL) and a sample of the workflows is watched until the
server has timed their activity out and scheduled its retry: that is how long a dead worker
goes unnoticed.

Goal (issue 13, goal 2): with 1,000 calls waiting, worker + server under 0.15 cores; a dead
worker noticed within a minute.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import urllib.request
import uuid
from datetime import timedelta

from bench.common import (
    dev_server_flags,
    free_port,
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


# What the server does for waiting calls, from its Prometheus metrics (operation label).
COUNTED = {("service_requests", "RecordActivityTaskHeartbeat"): "heartbeat_rpcs",
           ("task_requests", "TimerActiveTaskActivityTimeout"): "activity_timer_tasks",
           ("persistence_requests", "UpdateWorkflowExecution"): "workflow_writes"}
_SAMPLE = re.compile(r'(\w+)\{([^}]*)\} ([0-9.eE+-]+)')
_OPERATION = re.compile(r'operation="([^"]*)"')


def _scrape(port: int) -> dict[str, float]:
    """The counters above, summed over their other labels. The dev server runs frontend and
    history in one process, so an RPC both pass counts twice under service_requests: halved."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read(50_000_000).decode()
    out = dict.fromkeys(COUNTED.values(), 0.0)
    for line in text.splitlines():
        m = _SAMPLE.fullmatch(line)
        if not m:
            continue
        op = _OPERATION.search(m.group(2))
        key = COUNTED.get((m.group(1), op.group(1) if op else ""))
        if key:
            out[key] += float(m.group(3))
    out["heartbeat_rpcs"] /= 2
    return out


def _parse_arm(spec: str) -> tuple[float, float]:
    """`T` (heartbeat timeout, the project's cadence) or `T/P` (beat every P seconds)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(?:/(\d+(?:\.\d+)?))?", spec.strip())
    if not m:
        raise SystemExit(f"an arm is T or T/P in seconds, not {spec!r}")
    return float(m.group(1)), float(m.group(2) or 0)


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


async def arm(s, n: int, heartbeat_s: float, beat_every_s: float, window: float, settle: float, detect: bool,
              metrics_port: int) -> dict:
    from activities.heartbeat import beat_every

    tq = f"hb-{uuid.uuid4().hex[:8]}"
    proc = start_floor_worker(s, tq, max_concurrent_activities=max(n, 200))
    await wait_for_pollers(s.client, [(tq, "workflow"), (tq, "activity")], proc)
    ids = [f"hb-{int(heartbeat_s)}-{i}-{uuid.uuid4().hex[:6]}" for i in range(n)]
    seconds = 3600.0  # they wait through the window; the worker is killed after it

    async def start(i: int):
        await s.client.start_workflow(FloorHeartbeatWorkflow.run,
                                      HeartbeatWaitInput(task_id=ids[i], seconds=seconds, heartbeat_s=heartbeat_s,
                                                         beat_every_s=beat_every_s),
                                      id=ids[i], task_queue=tq)

    t0 = time.monotonic()
    await start_many(n, start)
    started_s = time.monotonic() - t0
    # Steady state: every call past its first heartbeat and first throttle window (0.8 T).
    await asyncio.sleep(max(settle, heartbeat_s))
    m0, w0, s0, c0 = _scrape(metrics_port), _cpu(proc.ps), _cpu(s.server), time.monotonic()
    await asyncio.sleep(window)
    m1, w1, s1, c1 = _scrape(metrics_port), _cpu(proc.ps), _cpu(s.server), time.monotonic()
    elapsed = c1 - c0
    cadence = (beat_every_s or beat_every(timedelta(seconds=heartbeat_s))) if heartbeat_s else 0.0
    out = {"heartbeat_timeout_s": heartbeat_s, "beat_every_s": round(cadence, 2), "n": n,
           "started_in_s": round(started_s, 1),
           "window_s": round(elapsed, 1), "worker_cores": round((w1 - w0) / elapsed, 3),
           "server_cores": round((s1 - s0) / elapsed, 3)}
    out["total_cores"] = round(out["worker_cores"] + out["server_cores"], 3)
    for key in m1:
        out[f"{key}_per_s"] = round((m1[key] - m0[key]) / elapsed, 1)
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
    arms = [_parse_arm(a) for a in (args.timeouts.split(",") if not args.quick else ["0", "4"])]
    load = os.getloadavg()[0]
    results: dict = {"count": n, "arms": [], "load_average_1m": round(load, 2)}
    for t, every in arms:
        # A dev server of its own per arm: an arm's killed calls stay pending on the server and
        # would cost the next arm's window.
        port = free_port()
        async with stack(NAME, keep_tmp=args.keep_tmp, server_args=["--metrics-port", str(port), *dev_server_flags(args)]) as s:
            console.print(f"{n} waiting calls, heartbeat timeout {t or 'none'}" + (f", beat every {every:g} s" if every else ""))
            results["arms"].append(await arm(s, n, t, every, window, settle, detect=not args.no_detect,
                                             metrics_port=port))
    rows = [[a["heartbeat_timeout_s"] or "none", a["beat_every_s"] or "-", a["heartbeat_rpcs_per_s_expected"],
             a["heartbeat_rpcs_per_s"], a["activity_timer_tasks_per_s"], a["workflow_writes_per_s"], a["worker_cores"],
             a["server_cores"], a["total_cores"], a["dead_worker_noticed_after_s"]] for a in results["arms"]]
    print_table(f"{n} waiting calls: CPU over {window:g} s, by heartbeat timeout",
                ["heartbeat timeout s", "beat every s", "heartbeats/s (expected)", "heartbeats/s (server)",
                 "timeout timers/s", "workflow writes/s", "worker cores", "server cores", "total cores",
                 "dead worker noticed after s"], rows,
                caption=f"goal: total < {GOAL_CORES} cores, noticed within {GOAL_DETECT_S:g} s; "
                        f"load average {load:.1f} at start")
    # An arm without heartbeats never notices a dead worker: it cannot meet the goal.
    results["goal_met"] = {f'{a["heartbeat_timeout_s"]:g}/{a["beat_every_s"]:g}': bool(
        a["total_cores"] < GOAL_CORES and a["dead_worker_noticed_after_s"] is not None
        and a["dead_worker_noticed_after_s"] <= GOAL_DETECT_S) for a in results["arms"]}
    write_result(NAME, args, results, goals={"total_cores_max": GOAL_CORES, "noticed_within_s": GOAL_DETECT_S},
                 started=started)


def main() -> None:
    p = parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=1000, help="waiting calls")
    p.add_argument("--timeouts", default="0,50/10,50,55,60",
                   help="arms: heartbeat timeouts in seconds (0: none), T/P to beat every P s instead of 0.4 T")
    p.add_argument("--window", type=float, default=60.0, help="measured seconds while all wait")
    p.add_argument("--settle", type=float, default=10.0, help="seconds after the last start before measuring")
    p.add_argument("--no-detect", action="store_true", help="skip the dead-worker detection")
    args = resolve_paths(p.parse_args(), NAME)
    run_main(lambda: bench(args))


if __name__ == "__main__":
    main()
