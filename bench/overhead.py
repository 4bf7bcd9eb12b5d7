"""Orchestration overhead: one generation end to end, minus the provider's own time.

Three arms, run one after the other in turns (so noise hits them alike), on one dev server:

* generation: GenerationWorkflow with the project's real activities and workers (built by
  worker.build_workers, in this process), the `local` provider at zero delay (`--delay`), one small
  image fetched from loopback. Its provider time is measured around `provider.generate`
  and subtracted from each run.
* floor: a bare Temporal workflow of 6 sequential no-op activities on the same server,
  same worker options.
* plain: the same steps as plain async Python, no Temporal: credits.charge, the model
  ranking, Downloader.fetch + prepare_image + BlobStore.put, the local provider, the output
  prepared and stored, works.save_work. What durability costs is generation - plain.

Goal (issue 6): generation minus provider within 1.5x of the floor (p50).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

from temporalio.api.enums.v1 import EventType

from activities.ai import MAX_OUTPUT_PIXELS, MAX_OUTPUT_SIDE
from atelier import credits, model_health, works
from atelier.catalogue import rank
from atelier.images import prepare_image
from atelier.messages import ImageInput, StoredImage
from atelier.providers.base import GenerationInput
from bench.common import (
    dev_server_flags,
    ImageServer,
    history_profile,
    make_users,
    parser,
    prepare_database,
    print_profile,
    print_table,
    ratio,
    resolve_paths,
    run_main,
    small_jpeg,
    stack,
    summary,
    write_result,
)
from bench.floor import FloorInput, FloorWorkflow, floor_worker
from starter.service import build_request, start_generation
from worker import build_dependencies, build_workers

NAME = "overhead"
GOAL_RATIO = 1.5


class TimedProvider:
    """Wraps a provider and records how long each `generate` took."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name = inner.name
        self.durations: list[float] = []

    async def generate(self, request):
        t = time.perf_counter()
        try:
            return await self.inner.generate(request)
        finally:
            self.durations.append(time.perf_counter() - t)

    async def aclose(self) -> None:
        await self.inner.aclose()


def activity_breakdown(history) -> dict[str, float]:
    """Seconds spent inside activities (started -> completed) and waiting for a worker to
    take them (scheduled -> started), summed over one history."""
    scheduled, started = {}, {}
    inside = queued = 0.0
    for ev in history.events:
        t = ev.event_time.ToDatetime()
        if ev.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            scheduled[ev.event_id] = t
        elif ev.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            attrs = ev.activity_task_started_event_attributes
            started[attrs.scheduled_event_id] = t
            queued += (t - scheduled[attrs.scheduled_event_id]).total_seconds()
        elif ev.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            attrs = ev.activity_task_completed_event_attributes
            inside += (t - started[attrs.scheduled_event_id]).total_seconds()
    first = history.events[0].event_time.ToDatetime()
    last = history.events[-1].event_time.ToDatetime()
    return {"inside_activities_s": inside, "activity_queue_s": queued,
            "server_span_s": (last - first).total_seconds(), "events": len(history.events)}


async def bench(args) -> None:
    started = time.time()
    n, warmup = (3, 1) if args.quick else (args.runs, args.warmup)
    async with stack(NAME, keep_tmp=args.keep_tmp, server_args=dev_server_flags(args)) as s:
        settings = s.settings(delay_s=args.delay)
        await prepare_database(settings)
        deps = build_dependencies(settings)
        timed = TimedProvider(deps.providers["local"])
        deps.providers["local"] = timed
        cost = settings.cost_of("photography")
        [user] = await make_users(deps.engine, 1, cost * (n + warmup) * 2 + 100)
        floor_tq = f"floor-{uuid.uuid4().hex[:8]}"
        gen_e2e, gen_provider, gen_minus, floor_e2e, plain_total, plain_provider, plain_minus = ([] for _ in range(7))
        breakdowns: list[dict[str, float]] = []
        gen_histories: list = []
        floor_histories: list = []

        with ImageServer() as images:
            urls = [images.add(f"/in/{i}.jpg", small_jpeg(i)) for i in range(2 * (n + warmup))]
            url_iter = iter(urls)

            async def generation(record: bool) -> None:
                req = build_request(settings, user_id=user, kind="photography",
                                    images=[ImageInput(url=next(url_iter))], style="studio")
                before = len(timed.durations)
                t = time.perf_counter()
                handle = await start_generation(s.client, req, task_queue=settings.task_queue)
                result = await handle.result()
                e2e = time.perf_counter() - t
                if result.status != "completed":
                    raise RuntimeError(f"generation {req.task_id} ended {result.status}: {result.error}")
                provider = sum(timed.durations[before:])
                if record:
                    gen_e2e.append(e2e)
                    gen_provider.append(provider)
                    gen_minus.append(e2e - provider)
                    history = await handle.fetch_history()
                    breakdowns.append(activity_breakdown(history))
                    gen_histories.append(history)

            async def floor(record: bool) -> None:
                t = time.perf_counter()
                wf_id = f"floor-{uuid.uuid4().hex}"
                handle = await s.client.start_workflow(FloorWorkflow.run, FloorInput(task_id=wf_id), id=wf_id,
                                                       task_queue=floor_tq)
                done = await handle.result()
                e2e = time.perf_counter() - t
                assert done == 6
                if record:
                    floor_e2e.append(e2e)
                    floor_histories.append(await handle.fetch_history())

            async def plain(record: bool) -> None:
                task_id = f"plain_{uuid.uuid4().hex}"
                t = time.perf_counter()
                await credits.charge(deps.engine, task_id=task_id, user_id=user, amount=cost,
                                     reason="photography generation")
                unhealthy = await model_health.unhealthy_models(
                    deps.engine, threshold=settings.model_failure_threshold,
                    window_s=settings.model_failure_window_s)
                choice = rank(deps.catalogue, "photography", set(), unhealthy)[0]
                data = await deps.downloader.fetch(next(url_iter))
                prepared = await asyncio.to_thread(prepare_image, data, max_side=settings.max_image_side,
                                                   max_pixels=settings.max_image_pixels)
                key = await deps.blobs.put(prepared.data, prepared.content_type)
                stored = StoredImage(key, prepared.content_type, prepared.width, prepared.height, len(prepared.data))
                tp = time.perf_counter()
                generated = await timed.inner.generate(GenerationInput(kind="photography", model=choice.name,
                                                                       prompt="", images=[stored], style="studio"))
                provider = time.perf_counter() - tp
                out = await asyncio.to_thread(prepare_image, generated[0].data, max_side=MAX_OUTPUT_SIDE,
                                              max_pixels=MAX_OUTPUT_PIXELS)
                out_key = await deps.blobs.put(out.data, out.content_type)
                await works.save_work(deps.engine, task_id=task_id, user_id=user, kind="photography",
                                      model=choice.name, prompt="",
                                      images=[StoredImage(out_key, out.content_type, out.width, out.height,
                                                          len(out.data))])
                total = time.perf_counter() - t
                if record:
                    plain_total.append(total)
                    plain_provider.append(provider)
                    plain_minus.append(total - provider)

            arms = [generation, floor, plain]
            async with contextlib.AsyncExitStack() as es:
                for w in build_workers(s.client, deps) + [floor_worker(s.client, floor_tq)]:
                    await es.enter_async_context(w)
                for _ in range(warmup):
                    for arm in arms:
                        await arm(False)
                t_runs = time.perf_counter()
                for i in range(n):
                    # Rotate the order so no arm always runs right after another.
                    for arm in arms[i % 3:] + arms[: i % 3]:
                        await arm(True)
                    if time.perf_counter() - t_runs > args.max_seconds:
                        break
        await deps.aclose()

    gm, fl, pm = summary(gen_minus, 1000), summary(floor_e2e, 1000), summary(plain_minus, 1000)
    mean_break = {k: round(sum(b[k] for b in breakdowns) / len(breakdowns) * (1000 if k.endswith("_s") else 1), 2)
                  for k in breakdowns[0]} if breakdowns else {}
    results = {
        "runs": len(gen_e2e),
        "generation_e2e_ms": summary(gen_e2e, 1000),
        "generation_provider_ms": summary(gen_provider, 1000),
        "generation_minus_provider_ms": gm,
        "floor_6_noop_activities_ms": fl,
        "plain_async_total_ms": summary(plain_total, 1000),
        "plain_async_minus_provider_ms": pm,
        "generation_history_breakdown_mean": mean_break,
        "generation_steps": history_profile(gen_histories),
        "floor_steps": history_profile(floor_histories),
        "ratio_p50_vs_floor": ratio(gm.get("p50"), fl.get("p50")),
        "ratio_p99_vs_floor": ratio(gm.get("p99"), fl.get("p99")),
        "durability_cost_p50_ms": round(gm["p50"] - pm["p50"], 2) if gm.get("n") and pm.get("n") else None,
    }
    results["goal_met"] = results["ratio_p50_vs_floor"] <= GOAL_RATIO
    print_table(
        f"Orchestration overhead ({results['runs']} sequential runs per arm)",
        ["arm", "p50 ms", "p99 ms", "mean ms"],
        [
            ["generation end to end", *(results["generation_e2e_ms"][k] for k in ("p50", "p99", "mean"))],
            [f"  of which provider (local, delay {args.delay:g} s)", *(results["generation_provider_ms"][k] for k in ("p50", "p99", "mean"))],
            ["generation minus provider", *(gm[k] for k in ("p50", "p99", "mean"))],
            ["floor: bare Temporal, 6 no-op activities", *(fl[k] for k in ("p50", "p99", "mean"))],
            ["plain async Python minus provider", *(pm[k] for k in ("p50", "p99", "mean"))],
        ],
        caption=(f"generation-minus-provider / floor: p50 {results['ratio_p50_vs_floor']}x, "
                 f"p99 {results['ratio_p99_vs_floor']}x (goal <= {GOAL_RATIO}x: "
                 f"{'met' if results['goal_met'] else 'missed'})"),
    )
    print_profile("where the generation's time goes (mean per step, from its histories)", results["generation_steps"])
    print_profile("where the floor's time goes", results["floor_steps"])
    write_result(NAME, args, results, goals={"ratio_p50_vs_floor_max": GOAL_RATIO}, started=started)


def main() -> None:
    p = parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=50, help="measured runs per arm")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured runs per arm first")
    p.add_argument("--max-seconds", type=float, default=240.0, help="stop measuring after this long")
    p.add_argument("--delay", type=float, default=0.0,
                   help="the local provider's delay in seconds (0: its call takes a few ms of compose)")
    args = resolve_paths(p.parse_args(), NAME)
    run_main(lambda: bench(args))


if __name__ == "__main__":
    main()
