"""Image pipeline: download_and_convert's plain pieces on big images served on loopback.

For a 12-megapixel JPEG and a 4000x4000 PNG (made once, photo-like: gradients, shapes,
noise), the methods below run R times each, interleaved in one child process (so the
machine's load drifts over all alike); each method's peak RSS comes from a fresh process
of its own (VmHWM, reset before the run).

* pipeline: what the activity does, without Temporal: `Downloader.fetch` (guarded,
  streamed, size-capped), then `ImageActivities.store` (prepare_image on a thread: sniff,
  bomb check, JPEG draft decode, EXIF orientation, bound to max_side, re-encode; then
  BlobStore.put with fsync), settings as shipped (max_side 2048).
* naive: httpx GET, Pillow full decode, resize to the same bound (LANCZOS), JPEG encode,
  file write: what the old system did.
  Since 071638b a JPEG larger than max_side decodes at 1/2, 1/4 or 1/8 scale (libjpeg's
  DCT scaling) whenever that lands within 5 % under max_side, and EXIF orientation is
  applied in place: a 4000x3000 photo comes out 2000x1500.
* before (JPEG): the pipeline with the decode as it was before 071638b: the draft only
  for photos at least twice max_side (so a 4000-px photo was fully decoded, 12 MP, and
  resampled) and EXIF orientation applied on a full-size copy.
* exact-2048 (JPEG): today's decode, then resized up to exactly max_side (2048x1536): what
  keeping the old output size would cost.

Goal (issue 6): the pipeline at least 3x faster than naive on the JPEG.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from bench.common import (
    ROOT,
    ImageServer,
    clean_env,
    console,
    parser,
    print_table,
    ratio,
    resolve_paths,
    run_main,
    write_result,
)

NAME = "images"
GOAL_RATIO = 3.0
CACHE = Path(tempfile.gettempdir()) / "atelier-bench-cache"


# ---- the test images ----------------------------------------------------------------------


def photo_like(width: int, height: int, *, noise_sigma: float, noise_blend: float) -> Image.Image:
    """Smooth colour fields and shapes under sensor-like noise: decodes and compresses like a
    photo, unlike the flat two-tone test images."""
    r = Image.linear_gradient("L").resize((width, height))
    g = Image.linear_gradient("L").rotate(90).resize((width, height))
    b = Image.radial_gradient("L").resize((width, height))
    image = Image.merge("RGB", (r, g, b))
    draw = ImageDraw.Draw(image)
    for i in range(40):
        x, y = (i * 997) % width, (i * 613) % height
        draw.ellipse((x, y, x + width // 8, y + height // 8), fill=((i * 50) % 256, (i * 90) % 256, (i * 130) % 256))
    image = image.filter(ImageFilter.GaussianBlur(6))
    if noise_blend:
        image = Image.blend(image, Image.effect_noise((width, height), noise_sigma).convert("RGB"), noise_blend)
    return image


def test_image(kind: str, quick: bool) -> bytes:
    """The JPEG (12 MP) or PNG (4000x4000), cached between runs (the PNG takes seconds to make)."""
    w, h = {"jpeg": (4000, 3000), "png": (4000, 4000)}[kind]
    if quick:
        w, h = w // 4, h // 4
    path = CACHE / f"{kind}-{w}x{h}-v1.{'jpg' if kind == 'jpeg' else 'png'}"
    if path.is_file():
        return path.read_bytes()
    if kind == "jpeg":
        image, options = photo_like(w, h, noise_sigma=50, noise_blend=0.2), {"quality": 90}
    else:
        image, options = photo_like(w, h, noise_sigma=10, noise_blend=0.03), {"compress_level": 1}
    out = io.BytesIO()
    image.save(out, "JPEG" if kind == "jpeg" else "PNG", **options)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(out.getvalue())
    os.replace(tmp, path)
    return out.getvalue()


# ---- one method, in a child process ---------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    """This process's resident high-water mark. VmHWM, not ru_maxrss: the latter keeps the
    parent's peak across fork and exec, so a child would report the benchmark's own size."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak is the next run's own."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def before_decode():
    """atelier.images._decode as it was before 071638b (the benchmark's baseline for it)."""
    import atelier.images as m
    from atelier.errors import BadImage
    from PIL import ImageOps

    def decode(data, content_type, *, max_side, max_pixels):
        image = Image.open(io.BytesIO(data), formats=[m.ACCEPTED[content_type]])
        width, height = image.size
        if width < 1 or height < 1:
            raise BadImage(f"image declares an empty canvas ({width}x{height})")
        if width * height > max_pixels:
            raise BadImage(f"image declares {width}x{height} = {width * height} pixels, more than the "
                           f"{max_pixels} allowed (possible decompression bomb)")
        longest = max(width, height)
        if content_type == m.JPEG and longest >= 2 * max_side:
            scale = max_side / longest
            image.draft("RGB", (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))))
        image.load()
        try:
            return ImageOps.exif_transpose(image)
        except Exception:
            return image

    return decode


def exact_decode(current):
    """Today's decode, then resized up to exactly the bound where the draft undershot."""

    def decode(data, content_type, *, max_side, max_pixels):
        image = current(data, content_type, max_side=max_side, max_pixels=max_pixels)
        longest = max(image.size)
        if longest < max_side:
            with Image.open(io.BytesIO(data)) as header:
                full = header.size
            if max(full) > max_side:  # drafted under the bound: up to exactly the bound
                scale = max_side / max(full)
                image = image.resize((max(1, round(full[0] * scale)), max(1, round(full[1] * scale))),
                                     Image.Resampling.LANCZOS)
        return image

    return decode


METHODS = ("pipeline", "naive", "before", "exact-2048")


class _Runner:
    """One way of turning a URL into a stored, bounded image."""

    def __init__(self, blob_root: Path) -> None:
        import httpx

        from atelier.downloader import Downloader, UrlGuard, build_http_client
        from atelier.settings import Settings

        self.settings = st = Settings(allow_private_urls=True)
        self.http = build_http_client(st.connect_timeout_s, st.read_timeout_s)
        self.plain_http = httpx.AsyncClient(timeout=30, trust_env=False)
        self.downloader = Downloader(self.http, UrlGuard(allow_private=True), max_bytes=st.max_download_bytes,
                                     max_redirects=st.max_redirects, total_timeout_s=st.download_total_timeout_s)
        self.blob_root = blob_root
        self.count = 0
        import atelier.images as m

        self.decoders = {"pipeline": m._decode, "before": before_decode(), "exact-2048": exact_decode(m._decode)}

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.plain_http.aclose()

    async def run(self, method: str, url: str) -> tuple[list[float], list]:
        """(download ms, convert+store ms), output [w, h, bytes, type]."""
        from activities.images import ImageActivities
        from atelier.blobstore import BlobStore
        import atelier.images as m

        self.count += 1
        blob_dir = self.blob_root / f"{os.getpid()}-{self.count}"  # a fresh store: content addressing would skip the write
        st = self.settings
        t0 = time.perf_counter()
        if method == "naive":
            data = (await self.plain_http.get(url)).content
            t1 = time.perf_counter()
            image = Image.open(io.BytesIO(data))
            image.load()
            image = image.convert("RGB")
            scale = min(1.0, st.max_image_side / max(image.size))
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.LANCZOS)
            out = io.BytesIO()
            image.save(out, "JPEG", quality=90)
            blob_dir.mkdir(parents=True, exist_ok=True)
            (blob_dir / "out.jpg").write_bytes(out.getvalue())
            t2 = time.perf_counter()
            return [(t1 - t0) * 1000, (t2 - t1) * 1000], [image.width, image.height, len(out.getvalue()), "image/jpeg"]
        m._decode = self.decoders[method]
        images = ImageActivities(None, BlobStore(blob_dir, fsync=st.blob_fsync), self.downloader,
                                 max_side=st.max_image_side, max_pixels=st.max_image_pixels)
        data = await self.downloader.fetch(url)
        t1 = time.perf_counter()
        stored = await images.store(data, label="image")
        t2 = time.perf_counter()
        return [(t1 - t0) * 1000, (t2 - t1) * 1000], [stored.width, stored.height, stored.size, stored.content_type]


async def _child(mode: str, methods: list[str], url: str, warm_url: str, runs: int, blob_root: Path) -> dict:
    """mode "time": every method R times, interleaved (A B C A B C ...) so the machine's load
    drifts over all alike. mode "memory": one method once, its peak RSS above the start."""
    runner = _Runner(blob_root)
    out: dict = {m: {"runs_ms": [], "download_ms": [], "convert_ms": [], "output": None} for m in methods}
    for method in methods:  # warm up: imports, connections, thread pool, on a small image
        await runner.run(method, warm_url)
    if mode == "memory":
        [method] = methods
        _reset_peak()
        before = _rss_mb()
        _, output = await runner.run(method, url)
        out[method].update(peak_rss_delta_mb=round(_peak_mb() - before, 1), output=output)
    else:
        for _ in range(runs):
            for method in methods:
                (download, convert), output = await runner.run(method, url)
                r = out[method]
                r["runs_ms"].append(round(download + convert, 2))
                r["download_ms"].append(round(download, 2))
                r["convert_ms"].append(round(convert, 2))
                r["output"] = output
    await runner.aclose()
    return out


def _median(values: list[float]) -> float:
    data = sorted(values)
    return data[len(data) // 2] if data else math.nan


def run_child(mode: str, methods: list[str], url: str, warm_url: str, runs: int, tmp: Path) -> dict:
    cmd = [sys.executable, "-m", "bench.images", "--child", mode, "--methods", ",".join(methods), "--url", url,
           "--warm-url", warm_url, "--runs", str(runs), "--blob-root", str(tmp)]
    done = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


async def bench(args) -> None:
    started = time.time()
    runs = 2 if args.quick else args.runs
    results: dict = {"images": {}, "max_side": 2048}
    with tempfile.TemporaryDirectory(prefix="atelier-bench-images-") as tmp, ImageServer() as server:
        for kind in ("jpeg", "png"):
            data = test_image(kind, args.quick)
            with Image.open(io.BytesIO(data)) as probe:
                size = probe.size
            ctype = "image/jpeg" if kind == "jpeg" else "image/png"
            url = server.add(f"/big.{kind}", data, ctype)
            warm = io.BytesIO()
            Image.new("RGB", (64, 48), (120, 90, 60)).save(warm, "JPEG" if kind == "jpeg" else "PNG")
            warm_url = server.add(f"/warm.{kind}", warm.getvalue(), ctype)
            console.print(f"[bold]{kind}[/bold] {size[0]}x{size[1]}, {len(data) / 1e6:.1f} MB")
            methods = list(METHODS) if kind == "jpeg" else ["pipeline", "naive", "before"]
            timing = await asyncio.to_thread(run_child, "time", methods, url, warm_url, runs, Path(tmp))
            entry: dict = {"width": size[0], "height": size[1], "bytes": len(data), "methods": {}}
            for method in methods:
                memory = await asyncio.to_thread(run_child, "memory", [method], url, warm_url, 1, Path(tmp))
                r = timing[method]
                r["peak_rss_delta_mb"] = memory[method]["peak_rss_delta_mb"]
                r["median_ms"] = round(_median(r["runs_ms"]), 1)
                r["median_download_ms"] = round(_median(r["download_ms"]), 1)
                r["median_convert_ms"] = round(_median(r["convert_ms"]), 1)
                entry["methods"][method] = r
            naive = entry["methods"]["naive"]["median_ms"]
            for method, r in entry["methods"].items():
                r["speedup_vs_naive"] = ratio(naive, r["median_ms"])
            entry["speedup_vs_naive"] = entry["methods"]["pipeline"]["speedup_vs_naive"]
            results["images"][kind] = entry
    rows = []
    for kind, entry in results["images"].items():
        for method, r in entry["methods"].items():
            rows.append([f"{kind} {entry['width']}x{entry['height']} ({entry['bytes'] / 1e6:.1f} MB): {method}",
                         r["median_ms"], r["median_download_ms"], r["median_convert_ms"], r["peak_rss_delta_mb"],
                         f"{r['output'][0]}x{r['output'][1]}", r["speedup_vs_naive"]])
    jpeg = results["images"]["jpeg"]
    results["speedup_jpeg"] = jpeg["speedup_vs_naive"]
    results["speedup_png"] = results["images"]["png"]["speedup_vs_naive"]
    results["before_speedup_jpeg"] = jpeg["methods"]["before"]["speedup_vs_naive"]
    results["exact_2048_speedup_jpeg"] = jpeg["methods"]["exact-2048"]["speedup_vs_naive"]
    results["goal_met"] = bool(jpeg["speedup_vs_naive"] >= GOAL_RATIO)
    print_table(f"Image pipeline (median of {runs} interleaved runs; peak RSS from a fresh process per method)",
                ["image: method", "total ms", "download ms", "convert+store ms", "peak RSS +MB", "output",
                 "x naive"], rows,
                caption=f"goal: pipeline >= {GOAL_RATIO}x faster than naive on the JPEG "
                        f"({'met' if results['goal_met'] else 'missed'}: {results['speedup_jpeg']}x; "
                        f"before 071638b {results['before_speedup_jpeg']}x, "
                        f"exact-2048 {results['exact_2048_speedup_jpeg']}x)")
    write_result(NAME, args, results, goals={"jpeg_speedup_min": GOAL_RATIO}, started=started)


def main() -> None:
    p = parser(NAME, __doc__.split("\n\n")[0], dev_server=False)
    p.add_argument("--runs", type=int, default=5, help="runs per method and image")
    p.add_argument("--child", choices=["time", "memory"], help=argparse_hidden())
    p.add_argument("--methods", help=argparse_hidden())
    p.add_argument("--url", help=argparse_hidden())
    p.add_argument("--warm-url", help=argparse_hidden())
    p.add_argument("--blob-root", type=Path, help=argparse_hidden())
    args = resolve_paths(p.parse_args(), NAME)
    if args.child:
        print(json.dumps(asyncio.run(_child(args.child, args.methods.split(","), args.url, args.warm_url,
                                            args.runs, args.blob_root))))
        sys.stdout.flush()
        os._exit(0)
    run_main(lambda: bench(args))


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
