"""The benchmarks still run: each script in --quick mode (tiny sizes) as a subprocess, checked
only for exit status 0 and a JSON result with the expected keys. Figures are never asserted:
they belong to docs/benchmarks.md, measured by `make bench` on a quiet machine.

All scripts start at once (each has its own dev server and temp dir) so the whole smoke
stays well under two minutes on two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

EXPECTED = {
    "overhead": {"runs", "generation_minus_provider_ms", "floor_6_noop_activities_ms",
                 "plain_async_minus_provider_ms", "ratio_p50_vs_floor", "goal_met"},
    "throughput": {"floor", "generations", "ratio_vs_floor", "goal_met"},
    "concurrency": {"count", "slowest_s", "worker_peak_rss_mb", "waiting_cpu_cores", "timeline", "goals_met",
                    "chart"},
    "images": {"images", "speedup_jpeg", "speedup_png", "goal_met"},
    "history": {"cases", "largest_history_bytes", "goal_met"},
    "submit": {"closed_loop", "open_loop", "saturation_rps", "goals_met", "chart"},
    "reads": {"arms", "credits_vs_healthz", "running_vs_healthz", "goals_met"},
    "heartbeat": {"count", "arms", "goal_met"},
    "local_provider": {"arms", "cpu_ms_per_generation", "cpu_ratio_before_over_now", "goal_met"},
    "quota": {"total_vs_ideal", "utilisation_while_backlog", "jain_users_mean_wait", "provider_max_in_flight",
              "handoff_s", "goal_met", "chart"},
    "fairness_keys": {"default", "enableFairness"},
    "burst": {"count", "bare", "api", "post_p99_vs_bare", "generations", "goals_met"},
    "api_cpu": {"count", "cpu_us_per_post", "sdk_start_us"},
}
TIMEOUT_S = 150


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every benchmark at once; each test waits for its own."""
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATELIER_", "GEMINI_"))}
    started = {}
    for name in EXPECTED:
        cmd = [sys.executable, "-m", f"bench.{name}", "--quick", "--out", str(out / f"{name}.json")]
        if name in ("submit", "concurrency", "quota"):
            cmd += ["--chart", str(out / f"{name}.png")]
        log = open(out / f"{name}.log", "wb")  # noqa: SIM115 - closed below
        started[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    yield out, started
    for proc, log in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.timeout(TIMEOUT_S + 30)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_benchmark_runs_and_writes_its_json(runs, name):
    out, started = runs
    if name not in started:
        _start(out, name, started)
    proc, _ = started[name]
    deadline = time.monotonic() + TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    log = (out / f"{name}.log").read_text(errors="replace")
    assert proc.poll() is not None, f"bench.{name} --quick still running after {TIMEOUT_S} s:\n{log[-3000:]}"
    assert proc.returncode == 0, f"bench.{name} --quick exited {proc.returncode}:\n{log[-3000:]}"
    doc = json.loads((out / f"{name}.json").read_text())
    assert doc["name"] == name
    assert {"machine", "args", "goals", "results"} <= set(doc)
    missing = EXPECTED[name] - set(doc["results"])
    assert not missing, f"bench.{name} result lacks {sorted(missing)}"
    if "chart" in EXPECTED[name]:
        assert Path(doc["results"]["chart"]).is_file()


def test_every_benchmark_has_help():
    for name in [*EXPECTED, "run_all"]:
        done = subprocess.run([sys.executable, "-m", f"bench.{name}", "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0 and "usage:" in done.stdout, done.stderr
        if name != "run_all":
            assert "--quick" in done.stdout
