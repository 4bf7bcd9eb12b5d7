"""A burst through the API on the embedded default: N POSTs at once, beside N bare
`start_workflow` calls at once, then every generation to its end.

The stack as `make run` ships it: the API (`python -m starter.api`, one uvicorn process) and
one worker (`python worker.py`, the `local` provider with a D-second delay) on a dev server and
a SQLite database. Arms, in turn, on the same server:

1. **bare**: N `start_workflow` calls sent at once from this process, of a workflow type no
   worker polls for (the server's part of a submission, and nothing after it);
2. **api**: N `POST /v1/generations` sent at once, each on its own connection, while the worker
   starts working on the first ones as they land (the API must not starve behind them);
3. every generation of arm 2 to its end: the slowest (start to close) against the delay, and
   the worker's peak memory.

Goals (issue 13): the N POSTs answer with p99 under 5 s and within 1.5x of the bare arm's p99
(goal 4); all complete, the slowest within 1.3x of the delay, the worker under 1 GB (goal 6).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

import psutil

from atelier import credits, users
from atelier.db import create_engine
from bench.common import (
    free_port,
    dev_server_flags,
    ImageServer,
    VARIANTS,
    ManagedProcess,
    Sampler,
    activity_timeouts,
    apply_variant,
    closed_workflows,
    console,
    history_profile,
    print_profile,
    parser,
    prepare_database,
    print_table,
    ratio,
    resolve_paths,
    run_main,
    settings_env,
    small_jpeg,
    stack,
    start_project_worker,
    summary,
    wait_closed,
    wait_for_pollers,
    write_result,
)
from bench.submit import RawHttpPool, wait_healthy

NAME = "burst"
GOAL_POST_P99_S = 5.0
GOAL_POST_VS_BARE = 1.5
GOAL_SLOWEST_VS_DELAY = 1.3
GOAL_WORKER_MB = 1024.0


async def _at_once(n: int, one) -> tuple[list[float], int]:
    """Start `one(i)` for every i at the same moment; each call's seconds, and how many failed."""
    latencies = [float("nan")] * n
    failed = 0
    gate = asyncio.Event()

    async def run(i: int) -> None:
        nonlocal failed
        await gate.wait()
        t = time.perf_counter()
        try:
            ok = await one(i)
        except Exception:  # noqa: BLE001 - a failed submission is counted, not fatal
            ok = False
        latencies[i] = time.perf_counter() - t
        failed += 0 if ok else 1

    tasks = [asyncio.create_task(run(i)) for i in range(n)]
    await asyncio.sleep(0.1)  # every task is parked at the gate
    gate.set()
    await asyncio.gather(*tasks)
    return latencies, failed


async def bench(args) -> None:
    started = time.time()
    n = 5 if args.quick else args.count
    delay = 2.0 if args.quick else args.delay
    async with stack(NAME, keep_tmp=args.keep_tmp, server_args=dev_server_flags(args)) as s:
        port = free_port()
        settings, v = apply_variant(s.settings(delay_s=delay, api_host="127.0.0.1", api_port=port), args.variant)
        await prepare_database(settings)
        engine = create_engine(settings.database_url)
        cost = settings.cost_of("photography")
        keys = []
        for _ in range(args.users):
            new = await users.create_user(engine)
            await credits.grant(engine, user_id=new.user_id, amount=cost * n, reason="benchmark")
            keys.append(new.api_key)
        await engine.dispose()
        env = settings_env(settings, ATELIER_API_HOST="127.0.0.1", ATELIER_API_PORT=str(port))
        api = ManagedProcess("api", [sys.executable, "-m", "starter.api"], env=env, log_dir=s.tmp).start()
        s.children.append(api)
        await wait_healthy(f"http://127.0.0.1:{port}", api)
        workers = [start_project_worker(s, settings, f"worker-{i}", bytecode_cache=v.bytecode_cache, patches=v.patches)
                   for i in range(args.workers)]
        for worker in workers:
            if args.worker_nice:
                worker.ps.nice(args.worker_nice)
            await wait_for_pollers(s.client, [(settings.task_queue, "workflow"), (settings.task_queue, "activity"),
                                              (settings.ai_task_queue, "activity")], worker)
        results: dict = {"count": n, "delay_s": delay}
        with ImageServer() as images:
            urls = [images.add(f"/{i}.jpg", small_jpeg(i)) for i in range(n)]
            procs = {"api": api.ps, "server": s.server, **{f"worker-{i}": w.ps for i, w in enumerate(workers)}}
            with Sampler(procs) as sampler:
                bare_queue = f"bench-bare-{uuid.uuid4().hex[:8]}"

                async def bare(i: int) -> bool:
                    await s.client.start_workflow("BareBurst", id=f"bare-{i}-{uuid.uuid4().hex[:6]}",
                                                  task_queue=bare_queue)
                    return True

                console.print(f"[bold]bare[/bold]: {n} start_workflow calls at once")
                bare_lat, bare_failed = await _at_once(n, bare)
                await asyncio.sleep(2.0)  # the server settles before the next arm

                async def post(i: int) -> bool:
                    http = RawHttpPool("127.0.0.1", port)  # its own connection, as n clients would
                    body = json.dumps({"kind": "photography", "images": [{"url": urls[i]}],
                                       "style": "studio"}).encode()
                    try:
                        status = await http.request("POST", "/v1/generations", body, headers={
                            "Authorization": f"Bearer {keys[i % len(keys)]}", "Content-Type": "application/json"})
                    finally:
                        await http.aclose()
                    return status == 202

                console.print(f"[bold]api[/bold]: {n} POST /v1/generations at once ({delay:g} s delay)")
                t_api = sampler.now()
                api_lat, api_failed = await _at_once(n, post)
                t_posted = sampler.now()
                console.print(f"all {n} answered in {max(api_lat):.1f} s; waiting for the generations")
                finished = await wait_closed(s.client, settings.task_queue, n - api_failed,
                                             timeout=delay + args.grace)
                t_done = sampler.now()
            closed = [c for c in await closed_workflows(s.client, settings.task_queue)
                      if c.workflow_id.startswith("gen")]
            # Where the slowest spent their time: the 20 slowest histories, step by step; and the
            # activities that timed out among the 60 slowest (a timed-out attempt ends a minute late).
            slowest = sorted((c for c in closed if c.close is not None), key=lambda c: c.seconds)[-60:]
            histories = [await s.client.get_workflow_handle(c.workflow_id).fetch_history() for c in slowest]
            profile = history_profile(histories[-20:])
            timeouts = activity_timeouts(histories)
        statuses: dict[str, int] = {}
        for c in closed:
            statuses[c.status] = statuses.get(c.status, 0) + 1
        durations = sorted(c.seconds for c in closed if c.close is not None)
        bare_s, api_s = summary(bare_lat), summary(api_lat)
        results.update({
            "bare": {"failed": bare_failed, "latency_s": bare_s},
            "api": {"failed": api_failed, "latency_s": api_s,
                    "api_cpu_ms_per_post": round(sampler.cpu_between("api", t_api, t_posted) * (t_posted - t_api)
                                                 / n * 1000, 2)},
            "post_p99_vs_bare": ratio(api_s.get("p99", float("nan")), bare_s.get("p99", float("nan"))),
            "generations": {"finished_in_time": finished, "statuses": statuses,
                            "duration_s": summary(durations),
                            "slowest_vs_delay": ratio(durations[-1], delay) if durations else None,
                            "worker_peak_mb": max(round(sampler.peak(f"worker-{i}"), 1) for i in range(len(workers))),
                            "api_peak_mb": round(sampler.peak("api"), 1),
                            "cpu_s": {k: round(sampler.cpu_between(k, t_api, t_done) * (t_done - t_api), 1)
                                      for k in procs},
                            "activity_timeouts_in_60_slowest": timeouts,
                            "profile": profile},
        })
        for worker in workers:
            worker.stop()
    g = results["generations"]
    results["goals_met"] = {
        "post_p99": bool(api_s.get("p99", 1e9) < GOAL_POST_P99_S),
        "post_vs_bare": bool(results["post_p99_vs_bare"] <= GOAL_POST_VS_BARE),
        "all_completed": statuses.get("COMPLETED", 0) == n,
        "slowest": bool(g["slowest_vs_delay"] is not None and g["slowest_vs_delay"] <= GOAL_SLOWEST_VS_DELAY),
        "worker_memory": bool(g["worker_peak_mb"] < GOAL_WORKER_MB),
    }
    results["load_average_1m"] = round(psutil.getloadavg()[0], 2)
    print_table(f"{n} submitted at once (seconds)", ["arm", "failed", "p50", "p99", "max"], [
        ["bare start_workflow", bare_failed, bare_s.get("p50"), bare_s.get("p99"), bare_s.get("max")],
        ["POST /v1/generations", api_failed, api_s.get("p50"), api_s.get("p99"), api_s.get("max")],
    ], caption=f"goal: POST p99 < {GOAL_POST_P99_S:g} s and <= {GOAL_POST_VS_BARE}x bare "
               f"(now {results['post_p99_vs_bare']}x)")
    d = g["duration_s"]
    print_table("the generations, start to close", ["completed", "p50 s", "max s", "x delay", "worker peak MB",
                                                     "CPU s api/server/worker(s)"], [
        [statuses.get("COMPLETED", 0), d.get("p50"), d.get("max"), g["slowest_vs_delay"], g["worker_peak_mb"],
         "/".join(str(v) for v in g["cpu_s"].values())],
    ], caption=f"goals: all complete, slowest <= {GOAL_SLOWEST_VS_DELAY}x the delay, worker < "
               f"{GOAL_WORKER_MB:g} MB: {results['goals_met']}")
    print_profile("where the 20 slowest spent their time (mean of their histories)", g["profile"])
    console.print(f"activities timed out among the 60 slowest: {timeouts}")
    write_result(NAME, args, results, goals={"post_p99_max_s": GOAL_POST_P99_S, "post_vs_bare_max": GOAL_POST_VS_BARE,
                                             "slowest_vs_delay_max": GOAL_SLOWEST_VS_DELAY,
                                             "worker_peak_max_mb": GOAL_WORKER_MB}, started=started)


def main() -> None:
    p = parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=1000, help="submissions at once, in each arm")
    p.add_argument("--delay", type=float, default=60.0, help="the local provider's delay")
    p.add_argument("--users", type=int, default=20, help="distinct users (API keys)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (`make run` starts one)")
    p.add_argument("--worker-nice", type=int, default=0, help="run the workers at this niceness")
    p.add_argument("--grace", type=float, default=240.0, help="seconds past the delay before giving up")
    p.add_argument("--variant", default="shipped", choices=sorted(VARIANTS),
                   help="run the workers as this variant (bench.common.VARIANTS) instead of as shipped")
    args = resolve_paths(p.parse_args(), NAME)
    run_main(lambda: bench(args))


if __name__ == "__main__":
    main()
