"""Concurrency: N generations in flight at once, each waiting D seconds on the AI, one worker process.

One `python worker.py` process (both queues, settings as shipped: 1,000 AI slots on the AI
queue) serves N generations submitted at once. The provider answers after D seconds:
`fake-gemini` (default) is the real Gemini client against a loopback fake in its own
process, as production waits on a remote AI; `local` is the Pillow compositor, which
spends ~0.2 s of the worker's CPU per generation before it waits (so with N=1000 it
measures Pillow on 2 cores, not waiting).

Measured: each generation's time from start to close (server times), the wall time from
the first submit to the last close, the worker's peak RSS, the CPU of the worker, server
and provider while everything waits (heartbeats only: no polling), and the number in
flight over time (for the chart in docs/benchmarks.md).

Goals (issue 6): the slowest within D + 15 s (75 s for D = 60), worker peak under 1 GB,
CPU near idle while waiting.
"""

from __future__ import annotations

import math
import time
import uuid

from atelier.db import create_engine
from atelier.messages import ImageInput
from bench.common import (
    PROVIDERS,
    ImageServer,
    Sampler,
    closed_workflows,
    console,
    count,
    make_users,
    parser,
    prepare_database,
    print_table,
    provider_settings,
    run_main,
    small_jpeg,
    stack,
    start_many,
    start_project_worker,
    summary,
    wait_closed,
    wait_for_pollers,
    write_result,
)
from starter.service import build_request, start_generation

NAME = "concurrency"
GOAL_EXTRA_S = 15.0
GOAL_RSS_MB = 1024.0
IDLE_CPU_CORES = 0.10  # "near idle": a tenth of one core


async def bench(args) -> None:
    started = time.time()
    n, delay = (20, 5.0) if args.quick else (args.count, args.delay)
    timeline: list[dict] = []
    async with stack(NAME, keep_tmp=args.keep_tmp) as s:
        settings, fake = provider_settings(s, args.provider, delay)
        await prepare_database(settings)
        engine = create_engine(settings.database_url)
        cost = settings.cost_of("photography")
        users = await make_users(engine, 20, cost * n)
        await engine.dispose()
        with ImageServer() as images:
            urls = [images.add(f"/c/{i}.jpg", small_jpeg(i)) for i in range(n)]
            proc = start_project_worker(s, settings)
            await wait_for_pollers(s.client, [(settings.task_queue, "workflow"), (settings.task_queue, "activity"),
                                              (settings.ai_task_queue, "activity")], proc)
            procs = {"worker": proc.ps, "server": s.server}
            if fake is not None:
                procs["provider"] = fake.ps
            console.print(f"[bold]{n} generations[/bold], provider {args.provider} waiting {delay:g} s each")
            with Sampler(procs, interval=1.0) as sampler:
                t0 = time.perf_counter()

                async def start(i: int):
                    req = build_request(settings, user_id=users[i % len(users)], kind="photography",
                                        images=[ImageInput(url=urls[i])], style="studio")
                    await start_generation(s.client, req, task_queue=settings.task_queue)

                submit = await start_many(n, start)
                submitted_at = sampler.now()

                def on_sample(_t: float, running: int, closed: int) -> None:
                    last = sampler.samples[-1] if sampler.samples else {}
                    timeline.append({"t": round(sampler.now(), 2), "in_flight": running, "closed": closed,
                                     "worker_rss_mb": last.get("worker_rss_mb")})

                finished = await wait_closed(s.client, settings.task_queue, n, timeout=delay + args.grace,
                                             interval=1.0, on_sample=on_sample)
                wall = time.perf_counter() - t0
            closed = await closed_workflows(s.client, settings.task_queue)
            completed = await count(s.client, f"TaskQueue='{settings.task_queue}' AND GenerationStatus='completed'")
            proc.stop()

    # The quiet stretch: everything submitted and past its first steps, nothing finished yet.
    first_close = next((row["t"] for row in timeline if row["closed"] > 0), math.nan)
    wait_from, wait_to = submitted_at + 10.0, first_close - 3.0
    if not wait_to - wait_from >= 5.0:  # a short delay (quick mode): the middle of the run
        wait_from, wait_to = submitted_at, max(submitted_at + 1.0, first_close - 0.5)
    seconds = [c.seconds for c in closed if c.close is not None]
    slowest = max(seconds) if seconds else math.nan
    peak_rss = sampler.peak("worker")
    waiting_cpu = {name: round(sampler.cpu_between(name, wait_from, wait_to), 3) for name in procs}
    results = {
        "count": n,
        "delay_s": delay,
        "provider": args.provider,
        "finished_in_time": finished,
        "closed": len(seconds),
        "completed": completed,
        "submit_s": round(submitted_at, 2),
        "submit_ms": summary(submit, 1000),
        "wall_s": round(wall, 2),
        "generation_s": summary(seconds),
        "slowest_s": round(slowest, 2),
        "slowest_minus_delay_s": round(slowest - delay, 2),
        "worker_peak_rss_mb": peak_rss,
        "server_peak_rss_mb": sampler.peak("server"),
        "waiting_window_s": [round(wait_from, 1), round(wait_to, 1)],
        "waiting_cpu_cores": waiting_cpu,
        "worker_cpu_s_total": round(sampler.cpu_total("worker"), 2),
        "server_cpu_s_total": round(sampler.cpu_total("server"), 2),
        "timeline": timeline,
        "samples": sampler.samples,
    }
    results["goals_met"] = {
        "slowest": bool(finished and slowest <= delay + GOAL_EXTRA_S),
        "worker_rss": bool(peak_rss < GOAL_RSS_MB),
        "idle_while_waiting": bool(waiting_cpu.get("worker", math.nan) <= IDLE_CPU_CORES),
    }
    print_table(
        f"Concurrency: {n} generations in flight, provider {args.provider} waiting {delay:g} s, one worker process",
        ["measure", "value", "goal"],
        [
            ["submitted in (s)", results["submit_s"], ""],
            ["completed", f"{completed}/{n}", f"{n}"],
            ["generation time p50 (s)", results["generation_s"].get("p50"), ""],
            ["slowest generation (s)", results["slowest_s"], f"<= {delay + GOAL_EXTRA_S:g}"],
            ["first submit to last close (s)", results["wall_s"], ""],
            ["worker peak RSS (MB)", peak_rss, f"< {GOAL_RSS_MB:g}"],
            ["worker CPU while waiting (cores)", waiting_cpu.get("worker"), f"<= {IDLE_CPU_CORES}"],
            ["server CPU while waiting (cores)", waiting_cpu.get("server"), ""],
            *([["provider CPU while waiting (cores)", waiting_cpu.get("provider"), ""]] if "provider" in waiting_cpu
              else []),
        ],
        caption=f"waiting window {results['waiting_window_s']} s after the first submit; goals: "
                + ", ".join(f"{k} {'met' if v else 'missed'}" for k, v in results["goals_met"].items()),
    )
    write_result(NAME, args, results, goals={"slowest_max_s": delay + GOAL_EXTRA_S, "worker_rss_max_mb": GOAL_RSS_MB,
                                             "waiting_worker_cpu_max_cores": IDLE_CPU_CORES}, started=started)


def main() -> None:
    p = parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=1000, help="generations in flight")
    p.add_argument("--delay", type=float, default=60.0, help="seconds the provider takes to answer")
    p.add_argument("--provider", choices=PROVIDERS, default="fake-gemini")
    p.add_argument("--grace", type=float, default=120.0, help="seconds past the delay before giving up")
    args = p.parse_args()
    run_main(lambda: bench(args))


if __name__ == "__main__":
    main()
