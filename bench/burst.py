"""A burst through the API on the embedded default: N POSTs at once, beside N bare
`start_workflow` calls at once, then every generation to its end.

The stack as `make run` ships it: the API (`python -m starter.api`, one uvicorn process) and
one worker (`python worker.py`, the `local` provider with a D-second delay) on a dev server and
a SQLite database. Arms, in turn, on the same server:

1. **bare**: N `start_workflow` calls sent at once from this process, of a workflow type no
   worker polls for (the server's part of a submission, and nothing after it); then, as a
   diagnostic, N starts of generations built beforehand and sent exactly as the API sends them
   (input, search attributes, summary), on a queue no worker polls, and the bare arm again
   (how much the server slowed after taking 2N starts);
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
from atelier.messages import ImageInput
from bench.common import (
    activity_name,
    cpu_seconds,
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
from starter import service

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


def _bare_starts(client, prefix: str):
    """A fresh queue no worker polls, and `start(i)`: one bare workflow started on it."""
    queue = f"bench-{prefix}-{uuid.uuid4().hex[:8]}"

    async def start(i: int) -> bool:
        await client.start_workflow("BareBurst", id=f"{prefix}-{i}-{uuid.uuid4().hex[:6]}", task_queue=queue)
        return True

    return queue, start


def _timeline(history) -> list[str]:
    """One history as `+seconds EVENT_TYPE (activity)` lines, from the workflow's start."""
    from temporalio.api.enums.v1 import EventType

    events = list(history.events)
    if not events:
        return []
    t0 = events[0].event_time.ToDatetime()
    by_id = {ev.event_id: ev for ev in events}
    lines = []
    for ev in events:
        name = EventType.Name(ev.event_type).removeprefix("EVENT_TYPE_")
        what = ""
        if ev.HasField("activity_task_scheduled_event_attributes"):
            what = ev.activity_task_scheduled_event_attributes.activity_type.name
        elif ev.HasField("activity_task_started_event_attributes"):
            what = activity_name(by_id, ev.activity_task_started_event_attributes.scheduled_event_id)
        elif ev.HasField("activity_task_completed_event_attributes"):
            what = activity_name(by_id, ev.activity_task_completed_event_attributes.scheduled_event_id)
        elif ev.HasField("marker_recorded_event_attributes"):
            what = ev.marker_recorded_event_attributes.marker_name
        offset = (ev.event_time.ToDatetime() - t0).total_seconds()
        lines.append(f"+{offset:8.3f} {name}{' ' + what if what else ''}")
    return lines


async def _arm(n: int, one, procs: dict[str, psutil.Process]) -> tuple[list[float], int, dict[str, float]]:
    """`_at_once`, and the CPU seconds every process spent from the gate to the last answer
    (`client` is this process: the load generator shares the two cores)."""
    before = {name: cpu_seconds(proc) for name, proc in procs.items()}
    t = time.perf_counter()
    cpu: dict[str, float] = {"gate_epoch": time.time()}
    latencies, failed = await _at_once(n, one)
    wall = time.perf_counter() - t
    after = {name: cpu_seconds(proc) for name, proc in procs.items()}
    cpu.update({name: round(after[name] - before[name], 2) for name in procs})
    cpu["wall_s"] = round(wall, 2)
    return latencies, failed, cpu


async def _accepted(client, task_queue: str, gate_epoch: float, prefix: str = "") -> dict[str, float]:
    """When the server recorded the arm's workflows as started, in seconds after the gate: the
    server's side of the arm's timeline (against the callers' latencies)."""
    starts = summary([c.start.timestamp() - gate_epoch for c in await closed_workflows(client, task_queue)
                      if c.workflow_id.startswith(prefix)])
    if not starts["n"]:
        return {}
    return {"first": round(starts["min"], 2), "p50": round(starts["p50"], 2), "p99": round(starts["p99"], 2),
            "last": round(starts["max"], 2)}


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
        # Diagnostic: more API processes, each on its own port, the POSTs spread over them in
        # turn (as a load balancer in front of them would).
        ports, more_apis = [port], []
        for extra in range(1, args.api_processes):
            ports.append(free_port())
            more = ManagedProcess(f"api-{extra}", [sys.executable, "-m", "starter.api"], log_dir=s.tmp,
                                  env={**env, "ATELIER_API_PORT": str(ports[-1])}).start()
            s.children.append(more)
            await wait_healthy(f"http://127.0.0.1:{ports[-1]}", more)
            more_apis.append(more)
        if args.py_spy is not None:
            args.py_spy.mkdir(parents=True, exist_ok=True)
            api.profile(args.py_spy / "burst-api.txt", rate=100)
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
            procs = {"api": api.ps, **{f"api-{i + 1}": a.ps for i, a in enumerate(more_apis)}, "server": s.server,
                     **{f"worker-{i}": w.ps for i, w in enumerate(workers)}}
            with Sampler(procs) as sampler:
                bare_queue, bare = _bare_starts(s.client, "bare")
                console.print(f"[bold]bare[/bold]: {n} start_workflow calls at once")
                arm_procs = {**procs, "client": psutil.Process()}
                bare_lat, bare_failed, bare_cpu = await _arm(n, bare, arm_procs)
                await asyncio.sleep(2.0)  # the server settles before the next arm

                # Diagnostic: the server's part of a submission as the API sends it (the same
                # input, search attributes and summary), built beforehand, on a queue no worker
                # polls. Its gap to `bare` is the server's; the POSTs' gap to it is the API's.
                same = [service.build_request(settings, user_id=f"usr_bench{i % args.users}", kind="photography",
                                              images=[ImageInput(url=urls[i])], style="studio") for i in range(n)]
                same_queue = f"bench-same-{uuid.uuid4().hex[:8]}"

                async def bare_as_api(i: int) -> bool:
                    await service.start_generation(s.client, same[i], task_queue=same_queue)
                    return True

                console.print(f"[bold]bare, as the API starts them[/bold]: {n} start_workflow calls at once")
                same_lat, same_failed, same_cpu = await _arm(n, bare_as_api, arm_procs)
                await asyncio.sleep(2.0)
                # The bare arm again, just before the POSTs: whether a server that has taken 2N
                # starts since has slowed (the POSTs come last, on the biggest database).
                again_queue, bare_again = _bare_starts(s.client, "again")
                console.print(f"[bold]bare again[/bold]: {n} start_workflow calls at once")
                again_lat, again_failed, again_cpu = await _arm(n, bare_again, arm_procs)
                await asyncio.sleep(2.0)

                async def post(i: int) -> bool:
                    http = RawHttpPool("127.0.0.1", ports[i % len(ports)])  # its own connection, as n clients would
                    body = json.dumps({"kind": "photography", "images": [{"url": urls[i]}],
                                       "style": "studio"}).encode()
                    try:
                        status = await http.request("POST", "/v1/generations", body, headers={
                            "Authorization": f"Bearer {keys[i % len(keys)]}", "Content-Type": "application/json"})
                    finally:
                        await http.aclose()
                    return status == 202

                console.print(f"[bold]api[/bold]: {n} POST /v1/generations at once ({delay:g} s delay)")
                if args.hold_workers:  # diagnostic: the POSTs with no generation work beside them
                    for worker in workers:
                        worker.ps.suspend()
                if args.py_spy is not None:
                    # The workers from the first POST until the calls wait: the burst's pre-call work.
                    for i, worker in enumerate(workers):
                        worker.profile(args.py_spy / f"burst-worker-{i}.txt", rate=100,
                                       duration_s=max(1, round(delay * 0.6)))
                t_api = sampler.now()
                api_lat, api_failed, api_cpu = await _arm(n, post, arm_procs)
                t_posted = sampler.now()
                if args.hold_workers:
                    for worker in workers:
                        worker.ps.resume()
                console.print(f"all {n} answered in {max(api_lat):.1f} s; waiting for the generations")
                finished = await wait_closed(s.client, settings.task_queue, n - api_failed,
                                             timeout=delay + args.grace)
                t_done = sampler.now()
            closed = [c for c in await closed_workflows(s.client, settings.task_queue)
                      if c.workflow_id.startswith("gen")]
            accepted = {"bare": await _accepted(s.client, bare_queue, bare_cpu.pop("gate_epoch")),
                        "bare_as_api": await _accepted(s.client, same_queue, same_cpu.pop("gate_epoch")),
                        "bare_again": await _accepted(s.client, again_queue, again_cpu.pop("gate_epoch")),
                        "api": await _accepted(s.client, settings.task_queue, api_cpu.pop("gate_epoch"), "gen")}
            # Where the slowest spent their time: the 20 slowest histories, step by step; and the
            # activities that timed out among the 60 slowest (a timed-out attempt ends a minute late).
            slowest = sorted((c for c in closed if c.close is not None), key=lambda c: c.seconds)[-60:]
            histories = [await s.client.get_workflow_handle(c.workflow_id).fetch_history() for c in slowest]
            profile = history_profile(histories[-20:])
            slowest_timeline = _timeline(histories[-1]) if histories else []
            timeouts = activity_timeouts(histories)
        statuses: dict[str, int] = {}
        for c in closed:
            statuses[c.status] = statuses.get(c.status, 0) + 1
        durations = sorted(c.seconds for c in closed if c.close is not None)
        bare_s, same_s, api_s = summary(bare_lat), summary(same_lat), summary(api_lat)
        again_s = summary(again_lat)
        results.update({
            "bare": {"failed": bare_failed, "latency_s": bare_s, "cpu_s": bare_cpu},
            "bare_as_api": {"failed": same_failed, "latency_s": same_s, "cpu_s": same_cpu},
            "bare_again": {"failed": again_failed, "latency_s": again_s, "cpu_s": again_cpu},
            "api": {"failed": api_failed, "latency_s": api_s, "cpu_s": api_cpu,
                    "api_cpu_ms_per_post": round(sum(v for k, v in api_cpu.items()
                                                     if k.startswith("api")) / n * 1000, 2)},
            "server_started_s_after_gate": accepted,
            "post_p99_vs_bare": ratio(api_s.get("p99", float("nan")), bare_s.get("p99", float("nan"))),
            "post_p99_vs_bare_again": ratio(api_s.get("p99", float("nan")), again_s.get("p99", float("nan"))),
            "post_p99_vs_bare_as_api": ratio(api_s.get("p99", float("nan")), same_s.get("p99", float("nan"))),
            "generations": {"finished_in_time": finished, "statuses": statuses,
                            "duration_s": summary(durations),
                            "slowest_vs_delay": ratio(durations[-1], delay) if durations else None,
                            "worker_peak_mb": max(round(sampler.peak(f"worker-{i}"), 1) for i in range(len(workers))),
                            "api_peak_mb": round(sampler.peak("api"), 1),
                            "cpu_s": {k: round(sampler.cpu_between(k, t_api, t_done) * (t_done - t_api), 1)
                                      for k in procs},
                            "activity_timeouts_in_60_slowest": timeouts,
                            "profile": profile,
                            "slowest_timeline": slowest_timeline},
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
    names = [k for k in api_cpu if k != "wall_s"]
    arms = [("bare start_workflow", bare_failed, bare_s, bare_cpu),
            ("(bare, as the API starts them)", same_failed, same_s, same_cpu),
            ("(bare again, third)", again_failed, again_s, again_cpu),
            ("POST /v1/generations", api_failed, api_s, api_cpu)]
    print_table(f"{n} submitted at once (seconds; CPU seconds of each process from the gate to the last answer)",
                ["arm", "failed", "p50", "p99", "max", *[f"CPU {k}" for k in names]],
                [[label, failed, lat.get("p50"), lat.get("p99"), lat.get("max"), *[cpu[k] for k in names]]
                 for label, failed, lat, cpu in arms],
                caption=f"goal: POST p99 < {GOAL_POST_P99_S:g} s and <= {GOAL_POST_VS_BARE}x bare "
                        f"(now {results['post_p99_vs_bare']}x)")
    d = g["duration_s"]
    print_table("the generations, start to close", ["completed", "p50 s", "max s", "x delay", "worker peak MB",
                                                     "CPU s api/server/worker(s)"], [
        [statuses.get("COMPLETED", 0), d.get("p50"), d.get("max"), g["slowest_vs_delay"], g["worker_peak_mb"],
         "/".join(str(v) for v in g["cpu_s"].values())],
    ], caption=f"goals: all complete, slowest <= {GOAL_SLOWEST_VS_DELAY}x the delay, worker < "
               f"{GOAL_WORKER_MB:g} MB: {results['goals_met']}")
    print_table("when the server recorded each arm's workflows as started (s after the gate)",
                ["arm", "first", "p50", "p99", "last"],
                [[arm, a.get("first"), a.get("p50"), a.get("p99"), a.get("last")] for arm, a in accepted.items()])
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
    p.add_argument("--api-processes", type=int, default=1,
                   help="diagnostic: this many API processes, each on its own port, the POSTs spread over them")
    p.add_argument("--hold-workers", action="store_true",
                   help="diagnostic: suspend the workers while the POSTs are answered, resume them after")
    p.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                   help="record the API with py-spy, and the workers from the first POST for 0.6 of the delay")
    p.add_argument("--variant", default="shipped", choices=sorted(VARIANTS),
                   help="run the workers as this variant (bench.common.VARIANTS) instead of as shipped")
    args = resolve_paths(p.parse_args(), NAME)
    run_main(lambda: bench(args))


if __name__ == "__main__":
    main()
