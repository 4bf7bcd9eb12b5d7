"""History size: bytes of workflow history per generation as the input images grow.

Input images of ~8 MB each (incompressible noise PNGs, distinct), fetched from loopback,
the `local` provider at zero delay, the project's real activities and worker:

* 1 and 4 images: photography (it takes 1 to 4 photos), the real GenerationWorkflow;
* 5 images: fitting (a person and 1 to 4 garments), the real GenerationWorkflow;
* 8 images: no kind accepts 8 (the workflow rejects such a request before anything runs),
  so a replica workflow in bench/ calls the same activities, in the same order, with the
  same request types, timeouts and summaries as GenerationWorkflow does. It also runs at
  1 image, beside the real workflow, so its calibration is visible in the table.

Bytes are the sum of the history events' protobuf sizes (what the server stores) and the
JSON export's size (what `atelier history export` writes). Goal (issue 6): flat, < 64 KB.
"""

from __future__ import annotations

import contextlib
import io
import random
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

from PIL import Image
from temporalio.api.enums.v1 import EventType
from temporalio.worker import Worker

from atelier.messages import ImageInput
from bench.common import (
    dev_server_flags,
    ImageServer,
    console,
    make_users,
    parser,
    prepare_database,
    print_table,
    resolve_paths,
    run_main,
    stack,
    write_result,
)
from bench.history_probe import HistoryProbeWorkflow

NAME = "history"
GOAL_BYTES = 64 * 1024
CACHE = Path(tempfile.gettempdir()) / "atelier-bench-cache"


def noise_png(side: int, seed: int) -> bytes:
    """Random pixels: incompressible, ~3 bytes a pixel (side 1700: ~8.7 MB). Cached."""
    path = CACHE / f"noise-{side}-{seed}.png"
    if path.is_file():
        return path.read_bytes()
    image = Image.frombytes("RGB", (side, side), random.Random(seed).randbytes(side * side * 3))
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=1)
    CACHE.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_bytes(out.getvalue())
    path.with_suffix(".tmp").replace(path)
    return out.getvalue()


async def bench(args) -> None:
    from starter.service import build_request, start_generation
    from worker import build_dependencies, build_workers

    started = time.time()
    side = 200 if args.quick else args.side
    max_images = 8
    async with stack(NAME, keep_tmp=args.keep_tmp, server_args=dev_server_flags(args)) as s:
        settings = s.settings(delay_s=0.0)
        await prepare_database(settings)
        deps = build_dependencies(settings)
        [user] = await make_users(deps.engine, 1, 10_000)
        probe_tq = f"probe-{uuid.uuid4().hex[:8]}"
        cases = [("photography", 1, "GenerationWorkflow"), ("photography", 4, "GenerationWorkflow"),
                 ("fitting", 5, "GenerationWorkflow"), ("photography", 1, "replica"),
                 ("photography", 8, "replica")]
        rows, measured = [], []
        with ImageServer() as server:
            blobs = [noise_png(side, seed) for seed in range(max_images)]
            urls = [server.add(f"/noise{i}.png", data, "image/png") for i, data in enumerate(blobs)]
            async with contextlib.AsyncExitStack() as es:
                for w in build_workers(s.client, deps) + [Worker(s.client, task_queue=probe_tq,
                                                                 workflows=[HistoryProbeWorkflow])]:
                    await es.enter_async_context(w)
                for kind, count, how in cases:
                    images = [ImageInput(url=u) for u in urls[:count]]
                    if how == "GenerationWorkflow":
                        req = build_request(settings, user_id=user, kind=kind, images=images, style="studio")
                        handle = await start_generation(s.client, req, task_queue=settings.task_queue)
                    else:
                        req = build_request(settings, user_id=user, kind=kind, images=images[:1], style="studio")
                        req.images = images  # past validation: no kind takes 8
                        req.parameters = {"main_queue": settings.task_queue}
                        handle = await s.client.start_workflow(
                            HistoryProbeWorkflow.run, req, id=req.task_id, task_queue=probe_tq,
                            execution_timeout=timedelta(minutes=10))
                    result = await handle.result()
                    history = await handle.fetch_history()
                    proto = sum(ev.ByteSize() for ev in history.events)
                    largest = max(ev.ByteSize() for ev in history.events)
                    js = len(history.to_json().encode())
                    event_types = [ev.event_type for ev in history.events]
                    entry = {"kind": kind, "images": count, "workflow": how, "status": result.status,
                             "input_bytes": sum(len(b) for b in blobs[:count]), "events": len(history.events),
                             "history_proto_bytes": proto, "history_json_bytes": js, "largest_event_bytes": largest,
                             "event_types": [EventType.Name(t).removeprefix("EVENT_TYPE_") for t in event_types]}
                    measured.append(entry)
                    rows.append([f"{count} image(s), {kind}, {how}", f"{entry['input_bytes'] / 1e6:.1f} MB",
                                 result.status, entry["events"], proto, js, largest])
                    console.print(f"  {count} image(s) {how}: {proto} bytes")
        await deps.aclose()
    largest_history = max(max(m["history_proto_bytes"], m["history_json_bytes"]) for m in measured)
    by_count = {m["images"]: m["history_proto_bytes"] for m in measured if m["workflow"] == "replica"}
    growth = (by_count.get(8, 0) - by_count.get(1, 0)) / 7 if 8 in by_count and 1 in by_count else None
    results = {"image_bytes_each": len(blobs[0]), "cases": measured, "largest_history_bytes": largest_history,
               "bytes_per_extra_image": round(growth, 1) if growth is not None else None,
               "goal_met": bool(largest_history < GOAL_BYTES and all(m["status"] == "completed" for m in measured))}
    print_table("History per generation (input images ~{:.1f} MB each)".format(len(blobs[0]) / 1e6),
                ["case", "input", "status", "events", "history bytes (proto)", "history bytes (JSON)",
                 "largest event"], rows,
                caption=f"goal: flat and < {GOAL_BYTES} bytes ({'met' if results['goal_met'] else 'missed'}); "
                        f"~{results['bytes_per_extra_image']} bytes per extra image (references, never bytes)")
    write_result(NAME, args, results, goals={"history_bytes_max": GOAL_BYTES}, started=started)


def main() -> None:
    p = parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--side", type=int, default=1700, help="side of the square noise PNGs (1700: ~8.7 MB each)")
    args = resolve_paths(p.parse_args(), NAME)
    run_main(lambda: bench(args))


if __name__ == "__main__":
    main()
