"""The benchmarks still run: each script in --quick mode (tiny sizes) as a subprocess, checked
only for exit status 0 and a JSON result with the expected keys. Figures are never asserted:
they belong to docs/benchmarks.md, measured by `make bench` on a quiet machine.

All scripts start at once (each has its own dev server and temp dir) so the whole smoke
stays well under two minutes on two cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
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


def _start(name: str, out: Path, *args: str) -> tuple[subprocess.Popen, object]:
    """One benchmark as a subprocess, in a process group of its own: the dev server and the
    workers it starts join that group, so `_stop` can end them with it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATELIER_", "GEMINI_"))}
    cmd = [sys.executable, "-m", f"bench.{name}", *args, "--out", str(out / f"{name}.json")]
    log = open(out / f"{name}.log", "wb")  # noqa: SIM115 - the caller closes it
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _stop(proc: subprocess.Popen) -> None:
    """End a benchmark and whatever it started. Killing the benchmark alone would leave its dev
    server running, adopted by init, for the rest of the session."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every benchmark at once; each test waits for its own."""
    out = tmp_path_factory.mktemp("bench")
    started = {}
    for name in EXPECTED:
        args = ["--quick"]
        if name in ("submit", "concurrency", "quota"):
            args += ["--chart", str(out / f"{name}.png")]
        started[name] = _start(name, out, *args)
    yield out, started
    for proc, log in started.values():
        _stop(proc)  # a run with -k leaves most of them running
        log.close()


@pytest.mark.timeout(TIMEOUT_S + 30)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_benchmark_runs_and_writes_its_json(runs, name):
    out, started = runs
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


@pytest.mark.timeout(150)
def test_stopping_a_benchmark_stops_its_dev_server(tmp_path):
    """A benchmark stopped while it runs (the smoke run with -k, a failure, a timeout) takes its
    dev server with it: no server lives on under init, holding memory for the rest of the run."""
    proc, log = _start("overhead", tmp_path, "--runs", "1000", "--max-seconds", "120")
    try:
        servers: list[psutil.Process] = []
        deadline = time.monotonic() + 90
        while not servers and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            for candidate in psutil.process_iter(["cmdline"]):
                with contextlib.suppress(psutil.Error):
                    if "start-dev" in (candidate.info["cmdline"] or []) and os.getpgid(candidate.pid) == proc.pid:
                        servers.append(candidate)
        assert servers, "the benchmark's dev server never started:\n" + (tmp_path / "overhead.log").read_text()[-2000:]
        assert proc.poll() is None, "the benchmark ended before it could be stopped"
        _stop(proc)
        _, alive = psutil.wait_procs(servers, timeout=15)
        assert alive == [], f"dev server {[p.pid for p in alive]} outlived its benchmark"
    finally:
        _stop(proc)
        log.close()
