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
from pathlib import Path

from atelier.db import create_engine
from atelier.messages import ImageInput
from atelier.settings import Settings
from bench.common import (
    dev_server_flags,
    PROVIDERS,
    VARIANTS,
    ImageServer,
    Sampler,
    apply_variant,
    closed_workflows,
    console,
    count,
    history_profile,
    make_users,
    parser,
    prepare_database,
    print_profile,
    print_table,
    provider_settings,
    resolve_paths,
    run_main,
    sample_histories,
    small_jpeg,
    stack,
    start_floor_worker,
    start_many,
    start_project_worker,
    summary,
    wait_closed,
    wait_for_pollers,
    write_result,
)
from bench.floor import FloorShapeWorkflow, FloorWaitWorkflow, ShapeInput, WaitInput
from starter.service import build_request, start_generation

NAME = "concurrency"
GOAL_EXTRA_S = 15.0
GOAL_RSS_MB = 1024.0
# Issue 13, goal 1: the slowest within 1.2x the slowest bare workflow of a generation's shape.
GOAL_X_SHAPE_FLOOR = 1.2
IDLE_CPU_CORES = 0.10  # "near idle": a tenth of one core


def chart(results: dict, path: Path) -> Path:
    """In-flight generations and the worker's memory over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = results["timeline"]
    samples = results["samples"]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot([r["t"] for r in timeline], [r["in_flight"] for r in timeline], color="tab:blue",
            label=f"in flight: {results['label']}")
    ax.plot([r["t"] for r in timeline], [r["closed"] for r in timeline], color="tab:green", label=f"completed: {results['label']}")
    for arm, color in ((results.get("floor"), "tab:gray"), *((v, "tab:purple") for v in results.get("variants", []))):
        if arm:
            ax.plot([r["t"] for r in arm["timeline"]], [r["in_flight"] for r in arm["timeline"]], color=color,
                    ls="--", lw=1, label=f"in flight: {arm['label']}")
    ax.axvline(results["submit_s"], color="gray", ls=":", lw=1)
    ax.axvline(results["submit_s"] + results["delay_s"], color="gray", ls="--", lw=1)
    ax.set_xlabel("seconds since the first submit (dotted: all submitted; dashed: + provider delay)")
    ax.set_ylabel("generations")
    ax.set_title(f"{results['count']} generations, provider waiting {results['delay_s']:g} s, one worker process")
    ax.grid(True, alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot([r["t"] for r in samples if "worker_rss_mb" in r], [r["worker_rss_mb"] for r in samples if "worker_rss_mb" in r],
             color="tab:red", alpha=0.6, label="worker RSS (MB)")
    ax2.set_ylabel("worker RSS (MB)")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


async def run_arm(s, label: str, n: int, delay: float, grace: float, task_queue: str, procs: dict,
                  start_one) -> dict:
    """Submit n workflows at once with `start_one(i)`, follow them to the end, measure."""
    timeline: list[dict] = []
    worker = "worker"
    console.print(f"[bold]{label}[/bold]: {n} in flight, waiting {delay:g} s each")
    with Sampler(procs, interval=1.0) as sampler:
        t0 = time.perf_counter()
        submit = await start_many(n, start_one)
        submitted_at = sampler.now()

        def on_sample(_t: float, running: int, closed: int) -> None:
            last = sampler.samples[-1] if sampler.samples else {}
            timeline.append({"t": round(sampler.now(), 2), "in_flight": running, "closed": closed,
                             "worker_rss_mb": last.get(f"{worker}_rss_mb")})

        finished = await wait_closed(s.client, task_queue, n, timeout=delay + grace, interval=1.0,
                                     on_sample=on_sample)
        wall = time.perf_counter() - t0
    closed = await closed_workflows(s.client, task_queue)
    profile = history_profile(await sample_histories(s.client, [c.workflow_id for c in closed]))
    # The quiet stretch: everything submitted and past its first steps, nothing finished yet.
    first_close = next((row["t"] for row in timeline if row["closed"] > 0), math.nan)
    wait_from, wait_to = submitted_at + 10.0, first_close - 3.0
    if not wait_to - wait_from >= 5.0:  # a short delay (quick mode) or a slow start: the middle of the run
        wait_from, wait_to = submitted_at, max(submitted_at + 1.0, first_close - 0.5)
    seconds = [c.seconds for c in closed if c.close is not None]
    slowest = max(seconds) if seconds else math.nan
    return {
        "label": label,
        "count": n,
        "delay_s": delay,
        "finished_in_time": finished,
        "closed": len(seconds),
        "submit_s": round(submitted_at, 2),
        "submit_ms": summary(submit, 1000),
        "wall_s": round(wall, 2),
        "generation_s": summary(seconds),
        "slowest_s": round(slowest, 2),
        "slowest_minus_delay_s": round(slowest - delay, 2),
        "worker_peak_rss_mb": sampler.peak(worker),
        "server_peak_rss_mb": sampler.peak("server"),
        "waiting_window_s": [round(wait_from, 1), round(wait_to, 1)],
        "waiting_cpu_cores": {name: round(sampler.cpu_between(name, wait_from, wait_to), 3) for name in procs},
        "worker_cpu_s_total": round(sampler.cpu_total(worker), 2),
        "server_cpu_s_total": round(sampler.cpu_total("server"), 2),
        "profile": profile,
        "timeline": timeline,
        "samples": sampler.samples,
    }


async def floor_arm(s, n: int, delay: float, grace: float) -> dict:
    tq = f"floor-wait-{uuid.uuid4().hex[:8]}"
    proc = start_floor_worker(s, tq, max_concurrent_activities=max(n, 200))
    await wait_for_pollers(s.client, [(tq, "workflow"), (tq, "activity")], proc)

    async def start(i: int):
        wf_id = f"floor-wait-{i}-{uuid.uuid4().hex[:8]}"
        await s.client.start_workflow(FloorWaitWorkflow.run, WaitInput(task_id=wf_id, seconds=delay), id=wf_id,
                                      task_queue=tq)

    arm = await run_arm(s, "floor: bare workflows of one waiting activity", n, delay, grace, tq,
                        {"worker": proc.ps, "server": s.server}, start)
    proc.stop()
    return arm


async def shape_floor_arm(s, n: int, delay: float, grace: float, heartbeat_s: float, *, side_by_side: int = 2) -> dict:
    """Bare workflows of a generation's shape: the burst goal's baseline (issue 13, goal 1). Of the
    three no-ops before the wait, the first `side_by_side` run side by side and the rest one by one
    (2: as a generation given its inputs by URL runs its charge, model choice and download now)."""
    tq = f"floor-shape-{uuid.uuid4().hex[:8]}"
    proc = start_floor_worker(s, tq, max_concurrent_activities=max(n, 200))
    await wait_for_pollers(s.client, [(tq, "workflow"), (tq, "activity")], proc)

    async def start(i: int):
        wf_id = f"floor-shape-{i}-{uuid.uuid4().hex[:8]}"
        shape = ShapeInput(task_id=wf_id, seconds=delay, heartbeat_s=heartbeat_s, side_by_side=side_by_side)
        await s.client.start_workflow(FloorShapeWorkflow.run, shape, id=wf_id, task_queue=tq)

    what = {1: "the three before one by one", 3: "the three before side by side"}.get(
        side_by_side, f"{side_by_side} of the three before side by side")
    arm = await run_arm(s, f"floor: bare workflows of a generation's shape ({what})", n, delay, grace, tq,
                        {"worker": proc.ps, "server": s.server}, start)
    proc.stop()
    return arm


async def generation_arm(s, provider: str, n: int, delay: float, grace: float, variant: str) -> dict:
    settings, fake = provider_settings(s, provider, delay)
    settings, v = apply_variant(settings, variant)
    await prepare_database(settings)
    engine = create_engine(settings.database_url)
    users = await make_users(engine, 20, settings.cost_of("photography") * n)
    await engine.dispose()
    with ImageServer() as images:
        prefix = uuid.uuid4().hex[:6]
        urls = [images.add(f"/{prefix}/{i}.jpg", small_jpeg(i)) for i in range(n)]
        proc = start_project_worker(s, settings, bytecode_cache=v.bytecode_cache, patches=v.patches)
        await wait_for_pollers(s.client, [(settings.task_queue, "workflow"), (settings.task_queue, "activity"),
                                          (settings.ai_task_queue, "activity")], proc)
        procs = {"worker": proc.ps, "server": s.server}
        if fake is not None:
            procs["provider"] = fake.ps

        async def start(i: int):
            req = build_request(settings, user_id=users[i % len(users)], kind="photography",
                                images=[ImageInput(url=urls[i])], style="studio")
            await start_generation(s.client, req, task_queue=settings.task_queue)

        label = f"generations ({provider})" + ("" if variant == "shipped" else f", {variant}")
        arm = await run_arm(s, label, n, delay, grace, settings.task_queue, procs, start)
        arm["completed"] = await count(s.client, f"TaskQueue='{settings.task_queue}' AND GenerationStatus='completed'")
        arm["provider"], arm["variant"] = provider, variant
        proc.stop()
    if fake is not None:
        fake.stop()
    return arm


def _goals(arm: dict) -> dict:
    goals = {
        "slowest": bool(arm["finished_in_time"] and arm["slowest_s"] <= arm["delay_s"] + GOAL_EXTRA_S),
        "worker_rss": bool(arm["worker_peak_rss_mb"] < GOAL_RSS_MB),
        "idle_while_waiting": bool(arm["waiting_cpu_cores"].get("worker", math.nan) <= IDLE_CPU_CORES),
    }
    if "slowest_x_shape_floor" in arm:  # the shape floor ran
        goals["slowest_x_shape_floor"] = bool(arm["slowest_x_shape_floor"] <= GOAL_X_SHAPE_FLOOR)
    return goals


async def bench(args) -> None:
    started = time.time()
    n, delay = (20, 5.0) if args.quick else (args.count, args.delay)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    async with stack(NAME, keep_tmp=args.keep_tmp, server_args=dev_server_flags(args)) as s:
        floor = await floor_arm(s, n, delay, args.grace) if args.floor else None
        shape = (await shape_floor_arm(s, n, delay, args.grace, Settings.model_fields["ai_heartbeat_s"].default,
                                       side_by_side=args.shape_side_by_side)
                 if args.floor and args.shape_floor else None)
        main_arm = await generation_arm(s, args.provider, n, delay, args.grace, "shipped")
        others = [await generation_arm(s, args.provider, n, delay, args.grace, v) for v in variants]

    if shape is not None and shape.get("slowest_s"):
        for arm in (main_arm, *others):
            arm["slowest_x_shape_floor"] = round(arm["slowest_s"] / shape["slowest_s"], 2)
    results = dict(main_arm)
    results["provider"] = args.provider
    results["goals_met"] = _goals(main_arm)
    results["floor"] = floor
    results["shape_floor"] = shape
    if floor is not None and floor.get("slowest_s"):
        results["slowest_x_floor"] = round(main_arm["slowest_s"] / floor["slowest_s"], 2)
    results["variants"] = others
    for arm in others:
        arm["goals_met"] = _goals(arm)
    arms = [a for a in (floor, shape, main_arm, *others) if a is not None]
    rows = []
    for label, key, goal in (
        ("submitted in (s)", "submit_s", ""),
        ("closed", "closed", f"{n}"),
        ("time each p50 (s)", ("generation_s", "p50"), ""),
        ("slowest (s)", "slowest_s", f"<= {delay + GOAL_EXTRA_S:g}"),
        ("slowest vs the shape floor's", "slowest_x_shape_floor", f"<= {GOAL_X_SHAPE_FLOOR:g}"),
        ("first submit to last close (s)", "wall_s", ""),
        ("worker peak RSS (MB)", "worker_peak_rss_mb", f"< {GOAL_RSS_MB:g}"),
        ("worker CPU while waiting (cores)", ("waiting_cpu_cores", "worker"), f"<= {IDLE_CPU_CORES}"),
        ("server CPU while waiting (cores)", ("waiting_cpu_cores", "server"), ""),
        ("worker CPU in all (s)", "worker_cpu_s_total", ""),
        ("server CPU in all (s)", "server_cpu_s_total", ""),
    ):
        values = [arm[key[0]].get(key[1]) if isinstance(key, tuple) else arm.get(key) for arm in arms]
        rows.append([label, *values, goal])
    print_table(f"Concurrency: {n} in flight, provider waiting {delay:g} s, one worker process",
                ["measure", *[a["label"] for a in arms], "goal"], rows,
                caption="goals (generations as shipped): " + ", ".join(
                    f"{k} {'met' if v else 'missed'}" for k, v in results["goals_met"].items()))
    print_profile("where a generation's time goes (mean of sampled histories)", main_arm["profile"])
    results["chart"] = str(chart(results, args.chart))
    write_result(NAME, args, results, goals={"slowest_max_s": delay + GOAL_EXTRA_S, "worker_rss_max_mb": GOAL_RSS_MB,
                                             "waiting_worker_cpu_max_cores": IDLE_CPU_CORES,
                                             "slowest_x_shape_floor_max": GOAL_X_SHAPE_FLOOR}, started=started)


def main() -> None:
    p = parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=1000, help="generations in flight")
    p.add_argument("--delay", type=float, default=60.0, help="seconds the provider takes to answer")
    p.add_argument("--provider", choices=PROVIDERS, default="fake-gemini")
    p.add_argument("--chart", type=Path, default=None, help="in-flight-over-time chart (default: beside the JSON)")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="skip the floor (bare workflows of one activity waiting as long)")
    p.add_argument("--variants", default="", help="also run generations with these worker variants "
                   f"(comma-separated, from: {', '.join(k for k in VARIANTS if k != 'shipped')})")
    p.add_argument("--no-shape-floor", dest="shape_floor", action="store_false",
                   help="skip the floor of a generation's shape (3 no-op activities, one heartbeating wait, 1 no-op)")
    p.add_argument("--shape-side-by-side", type=int, choices=(1, 2, 3), default=2,
                   help="how many of the shape floor's three no-ops before the wait run side by side: 2 as a "
                   "generation given URLs runs them, 3 as one given uploads, 1 as before generation-2026-12")
    p.add_argument("--grace", type=float, default=120.0, help="seconds past the delay before giving up")
    args = resolve_paths(p.parse_args(), NAME)
    run_main(lambda: bench(args))


if __name__ == "__main__":
    main()
