"""Run every benchmark (about ten minutes on two quiet cores) and write docs/benchmarks.md.

    python -m bench.run_all                 # all, at the issue's sizes; `make bench` calls this
    python -m bench.run_all --only submit   # some of them (the others' last JSON is reused)
    python -m bench.run_all --render-only   # rewrite the docs from bench/results/*.json

Each script writes bench/results/<name>.json; the results part of docs/benchmarks.md
(between its `bench:results` markers) is regenerated from those files, with the machine
they ran on and the commands to reproduce them; the charts go to docs/img/. The rest of
the page (findings, proposed changes) is prose and is kept as it is.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.common import RESULTS_DIR, ROOT, clean_env, console

DOCS = ROOT / "docs" / "benchmarks.md"
IMG = ROOT / "docs" / "img"
START, END = "<!-- bench:results:start -->", "<!-- bench:results:end -->"

# name -> arguments for the full run (sizes of issue 6, bounded to ~10 minutes in all).
PLAN: dict[str, list[str]] = {
    "overhead": ["--runs", "30"],
    "throughput": ["--count", "500", "--count-local", "100", "--variants", "proposed"],
    "concurrency": ["--count", "1000", "--delay", "60", "--chart", "docs/img/concurrency-in-flight.png"],
    "images": ["--runs", "5"],
    "history": [],
    "submit": ["--concurrency", "1,10,50,200", "--chart", "docs/img/submit-latency.png"],
}


def run(name: str, extra: list[str]) -> tuple[int, float]:
    cmd = [sys.executable, "-m", f"bench.{name}", *PLAN[name], *extra]
    console.rule(f"bench.{name}")
    console.print(" ".join(["python", "-m", f"bench.{name}", *PLAN[name], *extra]), style="dim")
    t = time.monotonic()
    code = subprocess.run(cmd, cwd=ROOT, env=clean_env()).returncode
    return code, time.monotonic() - t


# ---- rendering ----------------------------------------------------------------------------


def f(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:,.{digits}f}"
    return str(value)


def x(value) -> str:
    """A ratio, two decimals."""
    return f(value, 2)


def ok(met) -> str:
    return "-" if met is None else ("**met**" if met else "**missed**")


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["--:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(f(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


def load(name: str) -> dict | None:
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def render_overhead(doc: dict) -> tuple[str, list]:
    r = doc["results"]
    rows = [["generation end to end", *(r["generation_e2e_ms"].get(k) for k in ("p50", "p99"))],
            ["of which provider (`local`, delay 0)", *(r["generation_provider_ms"].get(k) for k in ("p50", "p99"))],
            ["**generation minus provider**", *(r["generation_minus_provider_ms"].get(k) for k in ("p50", "p99"))],
            ["floor: bare Temporal, 6 no-op activities", *(r["floor_6_noop_activities_ms"].get(k) for k in ("p50", "p99"))],
            ["same steps, plain async Python, minus provider",
             *(r["plain_async_minus_provider_ms"].get(k) for k in ("p50", "p99"))]]
    steps = [[name, row["per_workflow"], row["queued_ms"], row["running_ms"]]
             for name, row in r.get("generation_steps", {}).items()]
    text = (f"{r['runs']} sequential runs per arm, interleaved.\n\n" + table(["arm", "p50 ms", "p99 ms"], rows)
            + f"\n\nGeneration minus provider against the floor: **p50 {f(r['ratio_p50_vs_floor'], 2)}x**, "
              f"p99 {f(r['ratio_p99_vs_floor'], 2)}x (goal: within 1.5x, {ok(r['goal_met'])}). "
              f"What durability costs over plain async Python at p50: {f(r.get('durability_cost_p50_ms'))} ms.\n\n"
              "Where a generation's time goes (mean per step, from its histories; *queued*: scheduled to "
              "started, *running*: started to completed, as the server saw them):\n\n"
            + table(["step", "per generation", "queued ms", "running ms"], steps))
    summary = ["Orchestration overhead (p50)", "<= 1.5x floor", f"{f(r['ratio_p50_vs_floor'], 2)}x", ok(r["goal_met"])]
    return text, summary


def render_throughput(doc: dict) -> tuple[str, list]:
    r = doc["results"]
    arms = [r["floor"], *r["generations"]]
    rows = [[a["label"], a["closed"], a["overall_per_s"], x(a.get("ratio_vs_floor", 1.0)), a["latency_s"].get("p50"),
             a["worker_cpu_ms_per_workflow"], a["server_cpu_ms_per_workflow"],
             x(a.get("cpu_capacity_ratio_vs_floor", 1.0)), a["worker_peak_rss_mb"]] for a in arms]
    text = ("All submitted at once; completions per second = completed / (last close - first start), from the "
            "server's own times. The floor ran before and after the generations; its figures are the mean of "
            "both. *x floor by CPU*: the floor's worker + server CPU per completion over the arm's, what the "
            "rate ratio would be if these two processes had the machine to themselves.\n\n"
            + table(["arm", "completed", "per s", "x floor", "latency p50 s", "worker CPU ms each",
                     "server CPU ms each", "x floor by CPU", "worker peak MB"], rows)
            + f"\n\nAs shipped, against the floor: **{f(r['ratio_vs_floor'], 2)}x** (goal: at least 0.7x, "
              f"{ok(r['goal_met'])}).")
    summary = ["Throughput (fake-gemini, 0 s)", ">= 0.7x floor", f"{f(r['ratio_vs_floor'], 2)}x", ok(r["goal_met"])]
    return text, summary


def render_concurrency(doc: dict) -> tuple[str, list]:
    r = doc["results"]
    arms = [a for a in (r.get("floor"), r, *r.get("variants", [])) if a]
    measures = [("submitted in (s)", lambda a: a["submit_s"]), ("completed", lambda a: a["closed"]),
                ("time each p50 (s)", lambda a: a["generation_s"].get("p50")),
                ("**slowest (s)**", lambda a: a["slowest_s"]), ("first submit to last close (s)", lambda a: a["wall_s"]),
                ("**worker peak RSS (MB)**", lambda a: a["worker_peak_rss_mb"]),
                ("**worker CPU while waiting (cores)**", lambda a: a["waiting_cpu_cores"].get("worker")),
                ("server CPU while waiting (cores)", lambda a: a["waiting_cpu_cores"].get("server"))]
    rows = [[label, *(fn(a) for a in arms)] for label, fn in measures]
    g = r["goals_met"]
    text = (f"{r['count']} submitted at once; the provider (`{r['provider']}`) answers after {f(r['delay_s'], 0)} s; "
            "one worker process (`python worker.py`, settings as shipped). The floor: the same number of bare "
            "workflows whose one activity waits as long, on one worker process with as many slots.\n\n"
            + table(["measure", *(a["label"] for a in arms)], rows)
            + f"\n\nGoals: slowest within {f(r['delay_s'] + 15, 0)} s {ok(g['slowest'])}; worker under 1 GB "
              f"{ok(g['worker_rss'])}; near idle while waiting {ok(g['idle_while_waiting'])}.\n\n"
              "![in-flight generations over time](img/concurrency-in-flight.png)")
    summary = [f"Concurrency: slowest of {r['count']} ({f(r['delay_s'], 0)} s AI)", f"<= {f(r['delay_s'] + 15, 0)} s",
               f"{f(r['slowest_s'])} s", ok(g["slowest"])]
    extra = [["Concurrency: worker peak memory", "< 1 GB", f"{f(r['worker_peak_rss_mb'], 0)} MB", ok(g["worker_rss"])],
             ["Concurrency: worker CPU while waiting", "near idle",
              f"{f(r['waiting_cpu_cores'].get('worker'), 2)} cores", ok(g["idle_while_waiting"])]]
    return text, [summary, *extra]


def render_images(doc: dict) -> tuple[str, list]:
    r = doc["results"]
    rows = []
    for kind, e in r["images"].items():
        for method, m in e["methods"].items():
            rows.append([f"{kind.upper()} {e['width']}x{e['height']} ({e['bytes'] / 1e6:.1f} MB): {method}",
                         m["median_ms"], m["median_download_ms"], m["median_convert_ms"], m["peak_rss_delta_mb"],
                         f"{m['output'][0]}x{m['output'][1]}", x(m["speedup_vs_naive"])])
    text = (table(["image: method", "total ms", "download ms", "convert + store ms", "peak RSS + MB", "output",
                   "x naive"], rows)
            + f"\n\nPipeline against naive on the JPEG: **{f(r['speedup_jpeg'], 2)}x** (goal: at least 3x, "
              f"{ok(r['goal_met'])}); before 071638b (the reduced-scale decode only at twice the bound): "
              f"{f(r.get('before_speedup_jpeg'), 2)}x.")
    summary = ["Image pipeline, 12 MP JPEG", ">= 3x naive", f"{f(r['speedup_jpeg'], 2)}x "
               f"(before 071638b: {f(r.get('before_speedup_jpeg'), 2)}x)", ok(r["goal_met"])]
    return text, summary


def render_history(doc: dict) -> tuple[str, list]:
    r = doc["results"]
    rows = [[f"{c['images']} image(s), {c['kind']}, {c['workflow']}", f"{c['input_bytes'] / 1e6:.1f} MB", c["status"],
             c["events"], c["history_proto_bytes"], c["history_json_bytes"]] for c in r["cases"]]
    text = (table(["case", "input", "status", "events", "history bytes (protobuf)", "history bytes (JSON export)"], rows)
            + f"\n\nFlat: about {f(r['bytes_per_extra_image'], 0)} bytes per extra image (a blob reference); the "
              f"largest history is {r['largest_history_bytes']:,} bytes (goal: under 65,536, {ok(r['goal_met'])}). "
              "No kind takes 8 images, so 8 runs on the replica (bench/history_probe.py: the same activities and "
              "arguments without the validation; it omits the save-shield patch marker, two events).")
    summary = ["History per generation (8 MB inputs)", "flat, < 64 KB", f"{r['largest_history_bytes'] / 1024:.1f} KB max",
               ok(r["goal_met"])]
    return text, summary


def render_submit(doc: dict) -> tuple[str, list]:
    r = doc["results"]
    rows = [[c["concurrency"], c["bare"]["latency_ms"]["p50"], c["api"]["latency_ms"]["p50"], x(c["p50_ratio"]),
             c["bare"]["latency_ms"]["p99"], c["api"]["latency_ms"]["p99"], x(c["p99_ratio"]), c["bare"]["rps"],
             c["api"]["rps"], x(c["rps_ratio"]), c.get("healthz", {}).get("latency_ms", {}).get("p50")]
            for c in r["closed_loop"]]
    cpu_rows = [[c["concurrency"], arm, *(c.get(arm, {}).get("cpu_ms_per_request", {}).get(k) for k in ("api", "server", "bench"))]
                for c in r["closed_loop"] for arm in ("bare", "api", "healthz") if arm in c]
    o = r["open_loop"]
    g = r["goals_met"]
    text = ("Closed loop (ms and requests per second; GET /healthz is the HTTP stack alone):\n\n"
            + table(["clients", "bare p50", "API p50", "x", "bare p99", "API p99", "x", "bare req/s", "API req/s", "x",
                     "/healthz p50"], rows)
            + "\n\nCPU per request (ms) of the API process, the Temporal server and the benchmark's own client:\n\n"
            + table(["clients", "arm", "API", "server", "client"], cpu_rows)
            + f"\n\nOpen loop at {f(o['api']['rate'], 0)} per second (ms from each request's scheduled send): "
              f"API p50 {f(o['api']['latency_ms'].get('p50'))}, **p99 {f(o['api']['latency_ms'].get('p99'))}** "
              f"(bare start_workflow: p50 {f(o['bare']['latency_ms'].get('p50'))}, p99 "
              f"{f(o['bare']['latency_ms'].get('p99'))}).\n\nGoals: open-loop p99 under 50 ms {ok(g['open_loop_p99'])}; "
              f"p50 and p99 within 1.2x bare at 1, 10, 50 clients {ok(g['latency_within_1_2x_at_1_10_50'])}; "
              f"requests per second at saturation at least 0.8x bare ({f(r['saturation_rps']['ratio'], 2)}x) "
              f"{ok(g['saturation_rps'])}.\n\n![submit latency against concurrency](img/submit-latency.png)")
    summary = [["Submit, open loop 100/s, p99", "< 50 ms", f"{f(r['open_loop_p99_ms'])} ms", ok(g["open_loop_p99"])],
               ["Submit at saturation", ">= 0.8x bare", f"{f(r['saturation_rps']['ratio'], 2)}x", ok(g["saturation_rps"])]]
    return text, summary


RENDER = {"overhead": ("1. Orchestration overhead", render_overhead),
          "throughput": ("2. Throughput", render_throughput),
          "concurrency": ("3. Concurrency", render_concurrency),
          "images": ("4. Image pipeline", render_images),
          "history": ("5. History size", render_history),
          "submit": ("6. Submit latency", render_submit)}


def render() -> str:
    docs = {name: load(name) for name in RENDER}
    first = next((d for d in docs.values() if d), None)
    parts = []
    summaries = []
    for name, (title, fn) in RENDER.items():
        doc = docs[name]
        if doc is None:
            parts.append(f"### {title}\n\nNot run yet: `python -m bench.{name}`.")
            continue
        if doc["args"].get("quick"):
            parts.append(f"### {title}\n\n(quick mode: tiny sizes, figures meaningless)")
        text, summary = fn(doc)
        summaries.extend(summary if isinstance(summary[0], list) else [summary])
        cmd = " ".join(["python -m", f"bench.{name}", *PLAN[name]])
        parts.append(f"### {title}\n\n{text}\n\n<sub>{doc['started_at'][:19].replace('T', ' ')} UTC, "
                     f"{doc['duration_s']:.0f} s, load average {doc['machine']['load_avg_1m']} at start; "
                     f"`{cmd}`</sub>")
    m = first["machine"] if first else {}
    machine = (f"{m.get('nproc')} cores ({m.get('cpu') or 'unknown CPU'}), {m.get('ram_gb')} GB RAM, "
               f"{m.get('platform')}; Python {m.get('python')}, temporalio {m.get('temporalio')}, "
               f"{m.get('temporal_cli')}, Pillow {m.get('pillow')}.")
    loads = ", ".join(f"{n} {d['machine']['load_avg_1m']}" for n, d in docs.items() if d)
    head = (f"Generated by `python -m bench.run_all` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from "
            f"bench/results/*.json.\n\n**Machine:** {machine}\n\n**Load average (1 min) when each started:** {loads}. "
            "Other work shared the machine: absolute figures move with it, the ratios against the baseline measured "
            "in the same run much less.\n\n**Reproduce:** `make bench` (or `python -m bench.run_all`); one benchmark: "
            "`python -m bench.<name> --help`.\n\n"
            + table(["benchmark", "goal", "measured", ""], summaries))
    return "\n\n".join([START, "## Results", head, *parts, END])


SKELETON = """# Benchmarks

What the project costs on top of Temporal itself, measured side by side with a baseline in the same
run (bare Temporal on the same dev server, or naive code), so each figure is a ratio that survives a
noisy machine. Scripts: `bench/` (each `python -m bench.<name> --help`); the smoke test
`tests/test_bench_smoke.py` runs each in `--quick` mode and checks only that it runs.

{results}
"""


def write_docs() -> Path:
    results = render()
    if DOCS.is_file() and START in (text := DOCS.read_text()) and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        DOCS.write_text(head + results + tail)
    else:
        DOCS.parent.mkdir(parents=True, exist_ok=True)
        DOCS.write_text(SKELETON.format(results=results))
    return DOCS


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(PLAN)}")
    p.add_argument("--render-only", action="store_true", help="only rewrite docs/benchmarks.md from the JSON files")
    p.add_argument("--no-docs", action="store_true", help="run, but leave docs/benchmarks.md alone")
    args = p.parse_args()
    failed = []
    if not args.render_only:
        IMG.mkdir(parents=True, exist_ok=True)
        names = [n.strip() for n in args.only.split(",") if n.strip()] or list(PLAN)
        unknown = set(names) - set(PLAN)
        if unknown:
            p.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
        took = {}
        for name in names:
            code, seconds = run(name, [])
            took[name] = round(seconds)
            if code != 0:
                failed.append(name)
        console.print(f"took (s): {took}")
    if not args.no_docs:
        console.print(f"wrote {write_docs()}")
    if failed:
        console.print(f"[red]failed: {', '.join(failed)}[/red]")
    sys.stdout.flush()
    os._exit(1 if failed else 0)


if __name__ == "__main__":
    main()
