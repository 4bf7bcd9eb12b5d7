"""Quota: a burst far over a model's quota, from many users, through model admission.

N generations from U users submitted at once (each user's share in one go) against a provider
that serves at most Q calls at once, each taking S seconds, and answers 429 beyond (the fake
Gemini server in quota mode, in its own process); the catalogue declares `max_concurrent: Q`.
One `python worker.py` process serves everything.

Reported against the ideal (N / Q x S: the provider busy all the time and nothing else):
  - total time, first submit to last completion (goal: within 1.15x the ideal);
  - provider utilisation while a backlog exists: mean calls in flight / Q, from the first call
    to the last call's start (goal: >= 90 %);
  - Jain's fairness index over the users' mean waits (submit to AI call start; goal >= 0.9);
  - calls answered 429 and the most calls ever in flight at the provider;
  - a chart of calls in flight and generations waiting over time.

    python -m bench.quota                 # 1,000 generations, 50 users, quota 20, 2 s calls
    python -m bench.quota --quick         # a small run that checks the script works
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

from atelier.db import create_engine
from atelier.messages import ImageInput, admission_workflow_id
from bench.common import (
    VARIANTS,
    apply_variant,
    dev_server_flags,
    ImageServer,
    ManagedProcess,
    Sampler,
    closed_workflows,
    console,
    count,
    make_users,
    parser,
    prepare_database,
    print_table,
    resolve_paths,
    run_main,
    small_jpeg,
    start_fake_gemini,
    start_project_worker,
    stack,
    start_many,
    summary,
    wait_for_pollers,
    write_result,
)
from starter.service import build_request, start_generation
from tests.fakes.gemini_server import RemoteFakeGemini
from workflows.admission import ModelAdmissionWorkflow

NAME = "quota"
MODEL = "bench-quota-model"
GOAL_TOTAL_RATIO = 1.15
GOAL_UTILISATION = 0.90
GOAL_JAIN = 0.9


def jain(values: list[float]) -> float:
    """Jain's fairness index: 1 when all equal, 1/n when one takes everything."""
    values = [v for v in values if v == v]
    if not values or not any(values):
        return float("nan")
    return round(sum(values) ** 2 / (len(values) * sum(v * v for v in values)), 4)


def utilisation(timeline: list[tuple[float, int]], start: float, end: float, quota: int) -> float:
    """Time-weighted mean of calls in flight over [start, end], as a share of the quota."""
    if end <= start or not timeline:
        return float("nan")
    area, level, last = 0.0, 0, start
    for t, in_flight in timeline:
        if t <= start:
            level = in_flight
            continue
        if t >= end:
            break
        area += level * (t - last)
        level, last = in_flight, t
    area += level * (end - last)
    return round(area / (end - start) / quota, 4)


def _at(event) -> float:
    return event.event_time.ToDatetime().timestamp()


async def handoff_profile(client, admission, sample_ids: list[str]) -> dict:
    """Where a slot's hand-over time goes, from histories: in the admission workflow, a release
    arriving to the next grant sent; in generations, the call ending to its release sent, a grant
    arriving to the call scheduled, and the call scheduled to started (a worker took it)."""
    from temporalio.api.enums.v1 import EventType as E

    release_to_grant: list[float] = []
    history = await admission.fetch_history()
    pending_release = None
    for e in history.events:
        if e.event_type == E.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED \
                and e.workflow_execution_signaled_event_attributes.signal_name == "release_slot":
            pending_release = pending_release or _at(e)
        elif e.event_type == E.EVENT_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED and pending_release:
            if e.signal_external_workflow_execution_initiated_event_attributes.signal_name == "slot_granted":
                release_to_grant.append(_at(e) - pending_release)
                pending_release = None
    end_to_release, grant_to_schedule, schedule_to_start = [], [], []
    for wf_id in sample_ids:
        events = (await client.get_workflow_handle(wf_id).fetch_history()).events
        granted = scheduled = completed = None
        for e in events:
            if e.event_type == E.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED \
                    and e.workflow_execution_signaled_event_attributes.signal_name == "slot_granted":
                granted = _at(e)
            elif e.event_type == E.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED \
                    and e.activity_task_scheduled_event_attributes.activity_type.name == "call_ai":
                scheduled = _at(e)
                if granted:
                    grant_to_schedule.append(scheduled - granted)
            elif e.event_type == E.EVENT_TYPE_ACTIVITY_TASK_STARTED and scheduled and not completed:
                schedule_to_start.append(_at(e) - scheduled)
            elif e.event_type == E.EVENT_TYPE_ACTIVITY_TASK_COMPLETED and scheduled and not completed:
                completed = _at(e)
            elif e.event_type == E.EVENT_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED and completed:
                end_to_release.append(_at(e) - completed)
                completed = None
    return {"admission_release_to_grant": summary(release_to_grant),
            "generation_call_end_to_release": summary(end_to_release),
            "generation_grant_to_call_scheduled": summary(grant_to_schedule),
            "call_scheduled_to_started": summary(schedule_to_start)}


def chart(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    flight = results["in_flight_series"]
    ax.step([p[0] for p in flight], [p[1] for p in flight], where="post", color="tab:blue",
            label="calls in flight at the provider")
    ax.axhline(results["quota"], color="tab:blue", ls=":", lw=1, label=f"quota ({results['quota']})")
    ax.set_ylabel("calls in flight")
    ax.set_xlabel("seconds since the first submit (dashed: the ideal total)")
    ax.axvline(results["ideal_s"], color="gray", ls="--", lw=1)
    ax2 = ax.twinx()
    waiting = results["waiting_series"]
    ax2.plot([p[0] for p in waiting], [p[1] for p in waiting], color="tab:orange", label="generations waiting")
    ax2.set_ylabel("generations waiting for a slot")
    lines, lines2 = ax.get_legend_handles_labels(), ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right", fontsize=8)
    ax.set_title(f"{results['count']} generations from {results['users']} users, quota {results['quota']} "
                 f"in flight, {results['call_s']:g} s calls")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def start_quota_fake(s, quota: int, call_s: float) -> tuple[ManagedProcess, str]:
    """The fake Gemini in quota mode: at most `quota` calls at once, 429 with Retry-After beyond."""
    return start_fake_gemini(s, call_s, extra_args=("--quota", str(quota), "--retry-after", "1"))


async def bench(args) -> None:
    started = time.time()
    n, n_users, quota, call_s = (40, 5, 4, 0.5) if args.quick else (args.count, args.users, args.quota, args.call_s)
    ideal = n / quota * call_s
    async with stack(NAME, keep_tmp=args.keep_tmp, server_args=dev_server_flags(args)) as s:
        fake_proc, url = start_quota_fake(s, quota, call_s)
        fake = RemoteFakeGemini(url)
        catalogue = s.tmp / "models.json"
        catalogue.write_text(json.dumps({"models": [
            {"name": MODEL, "provider": "gemini", "priority": 1, "cost": 1, "max_concurrent": quota}]}))
        settings = s.settings(ai_provider="gemini", gemini_api_key="bench-key", gemini_base_url=url,
                              model_catalogue=catalogue)
        await prepare_database(settings)
        engine = create_engine(settings.database_url)
        cost = settings.cost_of("photography")
        users = await make_users(engine, n_users, cost * n)
        await engine.dispose()
        settings, variant = apply_variant(settings, args.variant)
        worker = start_project_worker(s, settings, patches=variant.patches, ATELIER_MODEL_CATALOGUE=str(catalogue))
        await wait_for_pollers(s.client, [(settings.task_queue, "workflow"), (settings.task_queue, "activity"),
                                          (settings.ai_task_queue, "activity")], worker)
        admission = s.client.get_workflow_handle(admission_workflow_id(MODEL, settings.task_queue))
        waiting_series: list[tuple[float, int]] = []
        submitted_at: dict[int, float] = {}
        per_user = n // n_users
        with ImageServer() as images, Sampler({"worker": worker.ps, "server": s.server, "provider": fake_proc.ps},
                                              interval=1.0) as sampler:
            prefix = uuid.uuid4().hex[:6]
            urls = [images.add(f"/{prefix}/{u}.jpg", small_jpeg(u)) for u in range(n_users)]
            console.print(f"[bold]{n} generations[/bold] from {n_users} users, quota {quota}, {call_s:g} s calls "
                          f"(ideal {ideal:.0f} s)")
            t0 = time.time()

            async def start(i: int):
                # Each user's share in one go: user 0's all, then user 1's... the worst case for FIFO.
                u = i // per_user if per_user else i % n_users
                u = min(u, n_users - 1)
                req = build_request(settings, user_id=users[u], kind="photography", images=[ImageInput(url=urls[u])],
                                    prompt=f"user {u} generation {i}")
                submitted_at[i] = time.time()
                await start_generation(s.client, req, task_queue=settings.task_queue)

            submit = await start_many(n, start, concurrency=32)
            submit_s = time.time() - t0

            async def sample_waiting() -> None:
                while True:
                    try:
                        st = await admission.query(ModelAdmissionWorkflow.status)
                        waiting_series.append((round(time.time() - t0, 2), st.waiting))
                    except Exception:  # noqa: BLE001 - not started yet, or busy continuing as new
                        pass
                    await asyncio.sleep(0.5)

            sampler_task = asyncio.create_task(sample_waiting())
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline:
                if await count(s.client, f"TaskQueue='{settings.task_queue}' AND WorkflowType='GenerationWorkflow' "
                                         f"AND ExecutionStatus!='Running'") >= n:
                    break
                await asyncio.sleep(1.0)
            sampler_task.cancel()
        closed = [c for c in await closed_workflows(s.client, settings.task_queue) if c.workflow_id.startswith("gen_")]
        completed = await count(s.client, f"TaskQueue='{settings.task_queue}' AND GenerationStatus='completed'")
        stats = await asyncio.to_thread(fake.quota_stats)
        requests = await asyncio.to_thread(fake.requests)
        status = await admission.query(ModelAdmissionWorkflow.status)
        handoff = await handoff_profile(s.client, admission, [c.workflow_id for c in closed][:40])
        fake.close()

    ends = [c.close.timestamp() for c in closed if c.close is not None]
    total = (max(ends) - t0) if ends else float("nan")
    served = sorted((r for r in requests if r["reply"] != "quota"), key=lambda r: r["at"])
    first_call, last_call = (served[0]["at"], served[-1]["at"]) if served else (t0, t0)
    # Each generation's wait: from its submit to its (first served) call, found by its prompt
    # ("user U generation I"); a user's mean wait over their generations.
    call_at: dict[int, float] = {}
    user_of: dict[int, int] = {}
    for r in served:
        text = next((t for t in r["texts"] if "Instructions from the user: user " in t), "")
        try:
            words = text.split("Instructions from the user: user ", 1)[1].split()
            user_of[int(words[2])] = int(words[0])
            call_at.setdefault(int(words[2]), r["at"])
        except (IndexError, ValueError):
            continue
    waits: dict[int, list[float]] = {}
    for i, at in call_at.items():
        if i in submitted_at:
            waits.setdefault(user_of[i], []).append(at - submitted_at[i])
    user_means = [sum(w) / len(w) for w in waits.values() if w]
    # The backlog: generations waiting in the admission line (sampled); before the line formed
    # the server was still starting and charging the burst, which is not the quota's doing.
    backlog = [t0 + t for t, waiting in waiting_series if waiting > 0]
    util_span = (min(backlog), max(backlog)) if len(backlog) >= 2 else (first_call, last_call)
    util = utilisation([tuple(p) for p in stats.timeline], *util_span, quota)
    util_calls = utilisation([tuple(p) for p in stats.timeline], first_call, last_call, quota)
    results = {
        "variant": args.variant, "count": n, "users": n_users, "quota": quota, "call_s": call_s, "ideal_s": round(ideal, 1),
        "completed": completed, "closed": len(closed), "submit_s": round(submit_s, 2),
        "total_s": round(total, 1), "total_vs_ideal": round(total / ideal, 3),
        "utilisation_while_backlog": util,
        "backlog_span_s": [round(util_span[0] - t0, 1), round(util_span[1] - t0, 1)],
        "utilisation_first_to_last_call": util_calls,
        "first_call_s": round(first_call - t0, 1),
        "jain_users_mean_wait": jain(user_means),
        "user_mean_wait_s": summary(user_means),
        "provider_429s": stats.busy_answers, "provider_max_in_flight": stats.max_in_flight_seen,
        "admission": {"granted": status.granted, "granted_at_once": status.granted_at_once, "busy": status.busy,
                      "reclaimed": status.reclaimed, "runs (continue-as-new + 1)": status.runs, "limit": status.limit},
        "latency_s": summary([c.seconds for c in closed if c.close is not None]),
        "handoff_s": handoff,
        "submit_ms": summary(submit, 1000),
        "worker_cpu_s": round(sampler.cpu_total("worker"), 1), "server_cpu_s": round(sampler.cpu_total("server"), 1),
        "in_flight_series": [(round(t - t0, 3), v) for t, v in stats.timeline],
        "waiting_series": waiting_series,
    }
    results["goal_met"] = (results["total_vs_ideal"] <= GOAL_TOTAL_RATIO and util >= GOAL_UTILISATION
                           and results["jain_users_mean_wait"] >= GOAL_JAIN and completed == n)
    results["chart"] = str(chart(results, args.chart))
    print_table("Quota: a burst over the quota through model admission", ["measure", "value", "goal"], [
        ["completed", f"{completed} / {n}", "all"],
        ["total time (s)", results["total_s"], f"<= {GOAL_TOTAL_RATIO} x {ideal:.0f}"],
        ["total / ideal", results["total_vs_ideal"], f"<= {GOAL_TOTAL_RATIO}"],
        ["provider utilisation while a backlog exists", util, f">= {GOAL_UTILISATION}"],
        ["Jain's index over users' mean waits", results["jain_users_mean_wait"], f">= {GOAL_JAIN}"],
        ["calls answered 429", stats.busy_answers, "-"],
        ["most calls in flight at the provider", stats.max_in_flight_seen, f"<= {quota}"],
        ["admission workflow runs (continue-as-new)", status.runs, "-"],
        *[[f"hand-over: {k.replace('_', ' ')} (p50 / p90 s)", f"{v.get('p50')} / {v.get('p90')}", "-"]
          for k, v in handoff.items()],
    ])
    write_result(NAME, args, results, goals={"total_vs_ideal_max": GOAL_TOTAL_RATIO,
                                             "utilisation_min": GOAL_UTILISATION, "jain_min": GOAL_JAIN},
                 started=started)


def main() -> None:
    p = parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=1000, help="generations submitted at once")
    p.add_argument("--users", type=int, default=50, help="users they come from (an equal share each)")
    p.add_argument("--quota", type=int, default=20, help="the provider's calls in flight (declared in the catalogue)")
    p.add_argument("--call-s", type=float, default=2.0, help="seconds each provider call takes")
    p.add_argument("--timeout", type=float, default=900.0, help="give up waiting after this long")
    p.add_argument("--chart", type=Path, default=None, help="the chart (default: beside the JSON)")
    p.add_argument("--variant", default="shipped", choices=sorted(VARIANTS),
                   help="run the worker as this variant (bench.common.VARIANTS) instead of as shipped")
    args = resolve_paths(p.parse_args(), NAME)
    run_main(lambda: bench(args))


if __name__ == "__main__":
    main()
