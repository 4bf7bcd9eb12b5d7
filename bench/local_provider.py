"""The `local` provider (the embedded default's stand-in for the AI): its own CPU per
generation, and the memory a waiting call holds.

Inputs are made as production stores them: a photo-like 4000x3000 JPEG and two garment shots
on white go through `prepare_image` (max_side 2048), giving 2000x1500 and 1200x1600 JPEGs in
a blob store. Arms, interleaved in one child process so the machine's load drifts over all
alike:

* now: `LocalProvider.generate` as on this tree, delay 0;
* before: the provider as it was at BEFORE_COMMIT (`git show`, loaded as a module): decode
  every input in full, compose at full size, optimised JPEG at quality 90, then sleep
  holding the decoded images.

CPU is the process's CPU time (all threads) per generation: what a generation costs the
worker whatever else shares the machine. Memory: a fresh process per arm starts N calls at
once with a delay of D seconds and samples its RSS while they all wait; per call = (peak RSS
during the wait - RSS before) / N.

Goal (issue 13, goal 6): at most 30 ms of CPU per generation at the default output size, and
no decoded image held while waiting.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

from bench.common import ROOT, clean_env, console, parser, print_table, ratio, resolve_paths, run_main, write_result
from bench.images import photo_like

NAME = "local_provider"
BEFORE_COMMIT = "ee6b82e"
GOAL_CPU_MS = 30.0
ARMS = ("now", "before")


def _provider_class(arm: str):
    if arm == "now":
        from atelier.providers.local import LocalProvider

        return LocalProvider
    source = subprocess.run(["git", "show", f"{BEFORE_COMMIT}:atelier/providers/local.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True, timeout=30).stdout
    path = Path(tempfile.gettempdir()) / f"atelier_local_before_{BEFORE_COMMIT}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("atelier_local_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LocalProvider


def _garment(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    draw.polygon([(width * 0.2, height * 0.1), (width * 0.8, height * 0.1), (width * 0.9, height * 0.9),
                  (width * 0.1, height * 0.9)], fill=(40, 60, 160))
    return image


async def _inputs(blobs, quick: bool):
    """(photography request, fitting request), inputs stored as download_and_convert stores them."""
    from atelier.images import store_image
    from atelier.messages import Kind
    from atelier.providers.base import GenerationInput

    scale = 4 if quick else 1
    stored = []
    for image in (photo_like(4000 // scale, 3000 // scale, noise_sigma=50, noise_blend=0.2),
                  _garment(1200 // scale, 1600 // scale), _garment(1000 // scale, 1400 // scale)):
        out = io.BytesIO()
        image.save(out, "JPEG", quality=90)
        stored.append(await store_image(blobs, out.getvalue(), max_side=2048, max_pixels=50_000_000))
    photo = GenerationInput(kind=Kind.PHOTOGRAPHY.value, model="local-preview", prompt="studio portrait",
                            style="warm studio", images=stored[:1], parameters={})
    fitting = GenerationInput(kind=Kind.FITTING.value, model="local-preview", prompt="try on", style="",
                              images=stored, parameters={})
    return photo, fitting, [[s.width, s.height] for s in stored]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def _child(mode: str, arms: list[str], runs: int, waiting: int, delay_s: float, blob_dir: Path) -> dict:
    from atelier.blobstore import BlobStore

    blobs = BlobStore(blob_dir, fsync=False)
    photo, fitting, sizes = await _inputs(blobs, quick=runs <= 2)
    providers = {arm: _provider_class(arm)(blobs, delay_s=0) for arm in arms}
    out: dict = {"input_sizes": sizes}
    if mode == "cpu":
        for provider in providers.values():  # warm up: imports, caches, the thread pool
            await provider.generate(photo)
            await provider.generate(fitting)
        for arm in arms:
            out[arm] = {"photography": [], "fitting": [], "wall_photography": [], "output": {}}
        for _ in range(runs):
            for arm, provider in providers.items():
                for kind, request in (("photography", photo), ("fitting", fitting)):
                    c0, w0 = time.process_time(), time.perf_counter()
                    [image] = await provider.generate(request)
                    c1, w1 = time.process_time(), time.perf_counter()
                    out[arm][kind].append((c1 - c0) * 1000)
                    if kind == "photography":
                        out[arm]["wall_photography"].append((w1 - w0) * 1000)
                    with Image.open(io.BytesIO(image.data)) as decoded:
                        out[arm]["output"][kind] = [decoded.width, decoded.height, len(image.data)]
        return out
    [arm] = arms
    provider = _provider_class(arm)(blobs, delay_s=delay_s)
    await provider.generate(photo)  # warm: the pool and caches exist before the baseline
    provider = _provider_class(arm)(blobs, delay_s=delay_s)
    before = _rss_mb()
    tasks = [asyncio.create_task(provider.generate(photo)) for _ in range(waiting)]
    peak, deadline = before, time.monotonic() + delay_s * 0.9
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        peak = max(peak, _rss_mb())
    await asyncio.gather(*tasks)
    out[arm] = {"rss_before_mb": round(before, 1), "rss_peak_waiting_mb": round(peak, 1),
                "per_waiting_call_mb": round((peak - before) / waiting, 2)}
    return out


def run_child(mode: str, arms: list[str], runs: int, waiting: int, delay_s: float, tmp: Path) -> dict:
    cmd = [sys.executable, "-m", f"bench.{NAME}", "--child", mode, "--arms", ",".join(arms), "--runs", str(runs),
           "--waiting", str(waiting), "--delay", str(delay_s), "--blob-dir", str(tmp)]
    done = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 1), "mean": round(statistics.fmean(values), 1),
            "min": round(min(values), 1), "max": round(max(values), 1)}


async def bench(args) -> None:
    started = time.time()
    runs = 2 if args.quick else args.runs
    waiting = 10 if args.quick else args.waiting
    delay = 1.0 if args.quick else args.delay
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="atelier-bench-local-") as tmp:
        cpu = await asyncio.to_thread(run_child, "cpu", list(ARMS), runs, waiting, delay, Path(tmp) / "cpu")
        memory = {arm: (await asyncio.to_thread(run_child, "wait", [arm], runs, waiting, delay,
                                                Path(tmp) / f"wait-{arm}"))[arm] for arm in ARMS}
    results: dict = {"input_sizes": cpu["input_sizes"], "load_average_1m": round(load, 2), "arms": {}}
    rows = []
    for arm in ARMS:
        r = {"cpu_ms_photography": _summary(cpu[arm]["photography"]),
             "cpu_ms_fitting": _summary(cpu[arm]["fitting"]),
             "wall_ms_photography": _summary(cpu[arm]["wall_photography"]),
             "output": cpu[arm]["output"], **memory[arm]}
        results["arms"][arm] = r
        rows.append([arm, r["cpu_ms_photography"]["median"], r["cpu_ms_fitting"]["median"],
                     r["wall_ms_photography"]["median"], "x".join(map(str, r["output"]["photography"][:2])),
                     r["output"]["photography"][2] // 1024, r["per_waiting_call_mb"]])
    now, before = results["arms"]["now"], results["arms"]["before"]
    results["cpu_ms_per_generation"] = now["cpu_ms_photography"]["median"]
    results["cpu_ratio_before_over_now"] = ratio(before["cpu_ms_photography"]["median"],
                                                 now["cpu_ms_photography"]["median"])
    results["goal_met"] = bool(now["cpu_ms_photography"]["median"] <= GOAL_CPU_MS)
    print_table(f"local provider, CPU per generation (median of {runs} interleaved runs) and memory while "
                f"{waiting} calls wait {delay} s", ["arm", "CPU ms photography", "CPU ms fitting (3 inputs)",
                                                    "wall ms photography", "output", "KB", "MB per waiting call"],
                rows, caption=f"goal: <= {GOAL_CPU_MS} ms CPU at the default output size "
                              f"({'met' if results['goal_met'] else 'missed'}); load average {load:.1f}")
    write_result(NAME, args, results, goals={"cpu_ms_max": GOAL_CPU_MS}, started=started)


def main() -> None:
    import argparse

    p = parser(NAME, __doc__.split("\n\n")[0], dev_server=False)
    p.add_argument("--runs", type=int, default=20, help="generations per arm and kind")
    p.add_argument("--waiting", type=int, default=100, help="calls waiting at once in the memory arm")
    p.add_argument("--delay", type=float, default=4.0, help="their delay, seconds")
    p.add_argument("--child", choices=["cpu", "wait"], help=argparse.SUPPRESS)
    p.add_argument("--arms", help=argparse.SUPPRESS)
    p.add_argument("--blob-dir", type=Path, help=argparse.SUPPRESS)
    args = resolve_paths(p.parse_args(), NAME)
    if args.child:
        print(json.dumps(asyncio.run(_child(args.child, args.arms.split(","), args.runs, args.waiting, args.delay,
                                            args.blob_dir))))
        sys.stdout.flush()
        os._exit(0)
    run_main(lambda: bench(args))


if __name__ == "__main__":
    main()
