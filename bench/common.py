"""What every benchmark shares: a throw-away Temporal dev server and app database, the
project's settings pointed at them, worker processes watched with psutil, images served
on loopback, statistics, a rich table and the JSON result file.

The dev server runs as production-on-one-machine does (`make run`): a SQLite file in WAL
mode with synchronous=normal, the custom search attributes registered. Everything lives
in one temp dir, removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

import psutil
from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.testing import WorkflowEnvironment

from atelier import credits, users
from atelier.db import create_engine, create_schema_for_tests
from atelier.messages import SEARCH_ATTRIBUTES
from atelier.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
QUICK_DIR = Path(tempfile.gettempdir()) / "atelier-bench-quick"
TEMPORAL_BIN = Path(sys.executable).parent / "temporal"
SEARCH_ATTRIBUTE_KEYS = [SearchAttributeKey.for_keyword(name) for name in SEARCH_ATTRIBUTES]
# The SDK gives a dev server 5 s to answer: not enough when several start at once on two
# cores (the benchmark smoke test starts every benchmark together).
DEV_SERVER_STARTUP = timedelta(seconds=60)
SQLITE_PRAGMAS = ["--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal"]

console = Console(width=None if sys.stdout.isatty() else 150)


# ---- command line and result files ------------------------------------------------------


def parser(name: str, description: str, *, dev_server: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs (smoke test)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"where the JSON result goes (default: bench/results/{name}.json; with --quick, "
                        f"{QUICK_DIR}/{name}.json, so a smoke run never replaces real results)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (server and app databases, logs)")
    if dev_server:
        p.add_argument("--dynamic-config", action="append", default=[], metavar="KEY=VALUE",
                       help="a dynamic config value for the dev server (repeatable), to measure a server setting")
    return p


def dynamic_config_flags(values) -> list[str]:
    """`temporal server start-dev` flags setting each KEY=VALUE of dynamic config."""
    flags: list[str] = []
    for value in values:
        flags += ["--dynamic-config-value", value]
    return flags


def dev_server_flags(args: argparse.Namespace) -> list[str]:
    """The dev server flags `--dynamic-config` asked for."""
    return dynamic_config_flags(args.dynamic_config)


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resolve_paths(args: argparse.Namespace, name: str) -> argparse.Namespace:
    """Fill the default output paths: real runs into bench/results, quick ones into a temp dir."""
    base = QUICK_DIR if args.quick else RESULTS_DIR
    if args.out is None:
        args.out = base / f"{name}.json"
    if getattr(args, "chart", "") is None:
        args.chart = args.out.with_suffix(".png")  # beside the JSON, as the help says
    return args


def machine() -> dict[str, Any]:
    """Where the figures were measured; the load average tells how noisy it was."""
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    temporal_cli = ""
    with contextlib.suppress(Exception):
        temporal_cli = subprocess.run([str(TEMPORAL_BIN), "--version"], capture_output=True, text=True,
                                      timeout=10).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model,
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "temporalio": metadata.version("temporalio"),
        "temporal_cli": temporal_cli,
        "pillow": metadata.version("pillow"),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def write_result(name: str, args: argparse.Namespace, results: dict[str, Any], *, goals: dict[str, Any],
                 started: float) -> Path:
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "name": name,
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "duration_s": round(time.time() - started, 1),
        "machine": machine(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "goals": goals,
        "results": results,
    }
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    console.print(f"[dim]wrote {out}[/dim]")
    return out


def run_main(coro_fn: Callable[[], Any]) -> None:
    """Run the benchmark and leave with its status. The Temporal SDK can abort at interpreter
    exit (PyGILState_Release) once the work is done: exit before it can."""
    code = 0
    use_bytecode_cache()
    try:
        asyncio.run(coro_fn())
    except KeyboardInterrupt:
        code = 130
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - print it, then exit non-zero
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---- statistics and tables --------------------------------------------------------------


def pct(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks; nan for no values."""
    data = sorted(values)
    if not data:
        return math.nan
    if len(data) == 1:
        return data[0]
    rank = (len(data) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (rank - low)


def summary(values: list[float], scale: float = 1.0) -> dict[str, float]:
    """p50/p90/p99/mean/min/max of `values` times `scale` (1000 turns seconds into ms)."""
    if not values:
        return {"n": 0}
    v = [x * scale for x in values]
    return {"n": len(v), "p50": round(pct(v, 50), 3), "p90": round(pct(v, 90), 3), "p99": round(pct(v, 99), 3),
            "mean": round(sum(v) / len(v), 3), "min": round(min(v), 3), "max": round(max(v), 3)}


def cpu_seconds(proc: psutil.Process) -> float:
    """CPU seconds (user + system) a process has used so far; NaN once it is gone."""
    try:
        t = proc.cpu_times()
        return t.user + t.system
    except Exception:  # noqa: BLE001 - a process gone: no figure
        return float("nan")


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b and not math.isnan(a) and not math.isnan(b) else math.nan


def fmt(value: Any, digits: int = 1) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.{digits}f}"
    return str(value)


def print_table(title: str, headers: list[str], rows: list[list[Any]], caption: str | None = None) -> None:
    table = Table(title=title, caption=caption, show_lines=False)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[fmt(c) for c in row])
    console.print(table)


# ---- the dev server ---------------------------------------------------------------------


@dataclass
class Stack:
    """One benchmark's world: temp dir, dev server, a client."""

    tmp: Path
    env: WorkflowEnvironment
    client: Client
    address: str
    server: psutil.Process | None
    children: list["ManagedProcess"] = field(default_factory=list)

    def settings(self, *, delay_s: float = 0.0, **overrides: Any) -> Settings:
        """The project's settings, defaults as shipped, pointed at this stack's temp dir."""
        suffix = uuid.uuid4().hex[:8]
        values: dict[str, Any] = dict(
            temporal_address=self.address,
            database_url=f"sqlite+aiosqlite:///{self.tmp}/atelier.db",
            blob_dir=self.tmp / "blobs",
            allow_private_urls=True,  # the image server lives on loopback
            ai_provider="local",
            local_ai_delay_s=delay_s,
            task_queue=f"bench-{suffix}",
            ai_task_queue=f"bench-ai-{suffix}",
        )
        values.update(overrides)
        return Settings(**values)


def _find_server(tmp: Path) -> psutil.Process | None:
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if str(tmp) in " ".join(child.cmdline()):
                return child
    return None


@contextlib.asynccontextmanager
async def stack(name: str, *, keep_tmp: bool = False, server_args: list[str] | None = None):
    tmp = Path(tempfile.mkdtemp(prefix=f"atelier-bench-{name}-"))
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(TEMPORAL_BIN),
        search_attributes=SEARCH_ATTRIBUTE_KEYS,
        dev_server_database_filename=str(tmp / "temporal.db"),
        dev_server_extra_args=SQLITE_PRAGMAS + list(server_args or []),
        dev_server_log_level="error",
        dev_server_startup_timeout=DEV_SERVER_STARTUP,
    )
    address = env.client.service_client.config.target_host
    s = Stack(tmp=tmp, env=env, client=env.client, address=address, server=_find_server(tmp))
    try:
        yield s
    finally:
        for child in s.children:
            child.stop()
        await env.shutdown()
        if keep_tmp:
            console.print(f"[dim]kept {tmp}[/dim]")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


# ---- the app database -------------------------------------------------------------------


async def prepare_database(settings: Settings) -> None:
    """The schema as production gets it (Alembic migrations) when they exist in this tree,
    else the tests' create_all."""
    try:
        from atelier import migrate

        migrate.script_location()
    except Exception:  # noqa: BLE001 - no migrations yet: the tests' way
        engine = create_engine(settings.database_url)
        try:
            await create_schema_for_tests(engine)
        finally:
            await engine.dispose()
        return
    migrate.upgrade(settings.database_url)


async def make_users(engine, count: int, credits_each: int) -> list[str]:
    made = []
    for _ in range(count):
        new = await users.create_user(engine)
        await credits.grant(engine, user_id=new.user_id, amount=credits_each, reason="benchmark")
        made.append(new.user_id)
    return made


# ---- images -----------------------------------------------------------------------------


def small_jpeg(index: int, width: int = 320, height: int = 240) -> bytes:
    """A small photo-sized JPEG, different for every index (the blob store is content
    addressed: equal bytes would skip the write and hide its cost)."""
    image = Image.new("RGB", (width, height), (200, 180, 160))
    draw = ImageDraw.Draw(image)
    draw.rectangle((width // 3, height // 5, 2 * width // 3, height), fill=(60, 70, 90))
    draw.ellipse((width // 2 - 30, 10, width // 2 + 30, 80), fill=(230, 200, 170))
    draw.rectangle((0, 0, 15, 7), fill=(index % 256, (index // 256) % 256, (index // 65536) % 256))
    draw.text((5, height - 15), f"#{index}", fill=(0, 0, 0))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


class ImageServer:
    """Images on a real HTTP server on 127.0.0.1 (the tests' fake server, in its own thread)."""

    def __init__(self) -> None:
        from tests.fakes.http_server import FakeHttpServer

        self._server = FakeHttpServer(max_body_bytes=256 * 1024 * 1024)

    def __enter__(self) -> ImageServer:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()

    def add(self, path: str, data: bytes, content_type: str = "image/jpeg") -> str:
        self._server.route(path, body=data, headers={"Content-Type": content_type})
        return self._server.url(path)


# ---- processes ----------------------------------------------------------------------------


class ManagedProcess:
    """A child process (worker, API, fake provider) with its output in a log file."""

    def __init__(self, name: str, cmd: list[str], *, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.cmd = cmd
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen | None = None
        self.ps: psutil.Process | None = None
        self.profiler: subprocess.Popen | None = None

    def start(self) -> ManagedProcess:
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        self.popen = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        self.ps = psutil.Process(self.popen.pid)
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def profile(self, out: Path, rate: int = 50, duration_s: int | None = None) -> None:
        """Attach py-spy (a dev tool, not a dependency: `pip install py-spy`) until stop(), or for
        `duration_s` seconds."""
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        fmt = {".json": "speedscope", ".svg": "flamegraph"}.get(out.suffix, "raw")  # raw: collapsed stacks
        limit = ["--duration", str(duration_s)] if duration_s else []
        self.profiler = subprocess.Popen([py_spy, "record", "--pid", str(self.popen.pid), "--rate", str(rate),
                                          "--format", fmt, "-o", str(out), "--nonblocking", *limit],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self, timeout: float = 15.0) -> None:
        if self.profiler is not None and self.profiler.poll() is None:
            self.profiler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.profiler.wait(timeout=30)
        if not self.alive():
            return
        assert self.popen is not None
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=5)


BYTECODE_CACHE = Path(tempfile.gettempdir()) / "atelier-bench-pycache"


def use_bytecode_cache() -> None:
    """Let this process cache compiled modules even where PYTHONDONTWRITEBYTECODE is set (it
    is in some dev shells). The workflow sandbox re-imports the workflow's module for every new
    workflow: without a .pyc that is a compile each time (~4 ms for workflows/generation.py),
    which a production image (pip compiles on install) never pays. Benchmarks measure that."""
    sys.dont_write_bytecode = False
    sys.pycache_prefix = str(BYTECODE_CACHE)


def clean_env(*, bytecode_cache: bool = True, **values: str) -> dict[str, str]:
    """This process's environment without any ATELIER_/GEMINI_ setting, plus `values`; with the
    bytecode cache on (see use_bytecode_cache) unless asked otherwise."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATELIER_", "GEMINI_"))}
    env["PYTHONUNBUFFERED"] = "1"
    if bytecode_cache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(BYTECODE_CACHE)
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("PYTHONPYCACHEPREFIX", None)
    env.update(values)
    return env


_ENV_FIELDS = ("temporal_address", "database_url", "blob_dir", "blob_fsync", "task_queue", "ai_task_queue",
               "allow_private_urls", "ai_provider", "local_ai_delay_s", "max_concurrent_activities",
               "max_concurrent_ai_calls", "max_concurrent_workflow_tasks", "max_cached_workflows",
               "database_pool_size", "workflow_sandbox")


def settings_env(settings: Settings, *, bytecode_cache: bool = True, **extra: str) -> dict[str, str]:
    """The environment that gives `python worker.py` these settings."""
    values: dict[str, str] = {}
    for name in _ENV_FIELDS:
        value = getattr(settings, name)
        if value is None:
            continue
        values[f"ATELIER_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    if settings.gemini_api_key is not None:
        values["GEMINI_API_KEY"] = settings.gemini_api_key.get_secret_value()
        values["GEMINI_BASE_URL"] = settings.gemini_base_url
    values.update(extra)
    return clean_env(bytecode_cache=bytecode_cache, **values)


def start_project_worker(s: Stack, settings: Settings, name: str = "worker", *,
                         bytecode_cache: bool = True, patches: tuple[str, ...] = (),
                         **extra_env: str) -> ManagedProcess:
    """`python worker.py` with these settings (and the bytecode cache, see use_bytecode_cache)."""
    env = settings_env(settings, bytecode_cache=bytecode_cache, **extra_env)
    cmd = [sys.executable, str(ROOT / "worker.py")]
    if patches:  # a proposed code change, applied in memory (bench/patched.py)
        cmd = [sys.executable, "-m", "bench.patched", *(f"--patch={p}" for p in patches), "worker"]
    proc = ManagedProcess(name, cmd, env=env, log_dir=s.tmp).start()
    s.children.append(proc)
    return proc


def start_floor_worker(s: Stack, task_queue: str, name: str = "floor-worker", *,
                       max_concurrent_activities: int = 200) -> ManagedProcess:
    proc = ManagedProcess(name, [sys.executable, "-m", "bench.floor", "--address", s.address,
                                 "--task-queue", task_queue,
                                 f"--max-concurrent-activities={max_concurrent_activities}"],
                          env=clean_env(), log_dir=s.tmp).start()
    s.children.append(proc)
    return proc


async def wait_for_pollers(client: Client, queues: list[tuple[str, str]], proc: ManagedProcess | None = None,
                           timeout: float = 60.0) -> None:
    """Wait until each (queue, 'workflow'|'activity') has a poller: the worker is really up."""
    deadline = time.monotonic() + timeout
    pending = list(queues)
    while pending:
        queue, kind = pending[0]
        ttype = (TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW if kind == "workflow"
                 else TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY)
        resp = await client.workflow_service.describe_task_queue(DescribeTaskQueueRequest(
            namespace=client.namespace, task_queue=TaskQueue(name=queue), task_queue_type=ttype))
        if resp.pollers:
            pending.pop(0)
            continue
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode if proc.popen else '?'}:\n"
                               f"{proc.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no poller on {queue} ({kind}) within {timeout} s")
        await asyncio.sleep(0.2)


class Sampler:
    """Samples RSS and CPU of processes every `interval` s on a thread (never the event loop),
    plus any extra async-free probe (e.g. a counter) the caller feeds with `mark`."""

    def __init__(self, processes: dict[str, psutil.Process], interval: float = 0.5) -> None:
        self.processes = {k: p for k, p in processes.items() if p is not None}
        self.interval = interval
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self.t0 = time.monotonic()

    def _one(self) -> dict[str, Any]:
        row: dict[str, Any] = {"t": round(time.monotonic() - self.t0, 3)}
        for name, proc in self.processes.items():
            with contextlib.suppress(psutil.Error):
                with proc.oneshot():
                    cpu = proc.cpu_times()
                    row[f"{name}_rss_mb"] = round(proc.memory_info().rss / 2**20, 1)
                    row[f"{name}_cpu_s"] = round(cpu.user + cpu.system, 3)
        return row

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._one())
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.samples.append(self._one())

    def now(self) -> float:
        return time.monotonic() - self.t0

    def peak(self, name: str, key: str = "rss_mb") -> float:
        values = [s[f"{name}_{key}"] for s in self.samples if f"{name}_{key}" in s]
        return max(values) if values else math.nan

    def cpu_between(self, name: str, t_from: float, t_to: float) -> float:
        """Average CPU use (1.0 = one core busy) of `name` between two sample times."""
        rows = [s for s in self.samples if f"{name}_cpu_s" in s and t_from <= s["t"] <= t_to]
        if len(rows) < 2:
            return math.nan
        return (rows[-1][f"{name}_cpu_s"] - rows[0][f"{name}_cpu_s"]) / max(1e-9, rows[-1]["t"] - rows[0]["t"])

    def cpu_total(self, name: str) -> float:
        rows = [s for s in self.samples if f"{name}_cpu_s" in s]
        return rows[-1][f"{name}_cpu_s"] - rows[0][f"{name}_cpu_s"] if len(rows) >= 2 else math.nan


# ---- workflows as seen from visibility ----------------------------------------------------


async def count(client: Client, query: str) -> int:
    return (await client.count_workflows(query)).count


async def wait_closed(client: Client, task_queue: str, total: int, *, timeout: float,
                      interval: float = 0.5, on_sample: Callable[[float, int, int], None] | None = None) -> bool:
    """Poll visibility (cheap, one RPC a tick) until `total` workflows on the queue are closed.
    `on_sample(t, running, closed)` sees every tick. False when the timeout passed first."""
    t0 = time.monotonic()
    while True:
        running = await count(client, f"TaskQueue='{task_queue}' AND ExecutionStatus='Running'")
        closed = await count(client, f"TaskQueue='{task_queue}' AND ExecutionStatus!='Running'")
        if on_sample:
            on_sample(time.monotonic() - t0, running, closed)
        if closed >= total:
            return True
        if time.monotonic() - t0 > timeout:
            return False
        await asyncio.sleep(interval)


@dataclass
class Closed:
    workflow_id: str
    status: str
    start: datetime
    close: datetime | None

    @property
    def seconds(self) -> float:
        return (self.close - self.start).total_seconds() if self.close else math.nan


async def closed_workflows(client: Client, task_queue: str) -> list[Closed]:
    out = []
    # Small pages with a long timeout: a loaded dev server timed out a 1,000-row page.
    async for wf in client.list_workflows(f"TaskQueue='{task_queue}'", page_size=200,
                                          rpc_timeout=timedelta(seconds=60)):
        out.append(Closed(wf.id, wf.status.name if wf.status else "?", wf.start_time, wf.close_time))
    return out


def rate_of(closed: list[Closed]) -> dict[str, float]:
    """Completions per second: over the whole run (first start to last close), and in the
    steady middle (10th to 90th percentile of close times)."""
    done = sorted(c.close for c in closed if c.close is not None)
    if len(done) < 2:
        return {"overall_per_s": math.nan, "steady_per_s": math.nan, "span_s": math.nan}
    first_start = min(c.start for c in closed)
    span = (done[-1] - first_start).total_seconds()
    lo, hi = int(len(done) * 0.1), max(int(len(done) * 0.9) - 1, int(len(done) * 0.1) + 1)
    mid = (done[hi] - done[lo]).total_seconds()
    return {
        "overall_per_s": round(len(done) / span, 2) if span > 0 else math.nan,
        "steady_per_s": round((hi - lo) / mid, 2) if mid > 0 else math.nan,
        "span_s": round(span, 2),
    }


async def start_many(n: int, start_one: Callable[[int], Any], *, concurrency: int = 64) -> list[float]:
    """Call `start_one(i)` for i in range(n), at most `concurrency` at a time; the latencies."""
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = [0.0] * n

    async def one(i: int) -> None:
        async with sem:
            t = time.perf_counter()
            await start_one(i)
            latencies[i] = time.perf_counter() - t

    await asyncio.gather(*(one(i) for i in range(n)))
    return latencies


# ---- providers ------------------------------------------------------------------------------

PROVIDERS = ("fake-gemini", "local")


def start_fake_gemini(s: Stack, delay_s: float, name: str = "fake-gemini",
                      extra_args: tuple[str, ...] = ()) -> tuple[ManagedProcess, str]:
    """The tests' fake Gemini REST server in its own process (its CPU is not the worker's):
    a stand-in for a remote AI that answers after `delay_s` with a small PNG. `extra_args` go to
    its command line (e.g. quota mode: `--quota N --retry-after S`)."""
    proc = ManagedProcess(name, [sys.executable, "-m", "tests.fakes.gemini_server", "--port", "0",
                                 "--delay", str(delay_s), *extra_args], env=clean_env(), log_dir=s.tmp).start()
    s.children.append(proc)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for line in proc.log_path.read_text(errors="replace").splitlines():
            if "listening on " in line:
                return proc, line.rsplit("listening on ", 1)[1].strip()
        if not proc.alive():
            break
        time.sleep(0.1)
    raise RuntimeError(f"fake Gemini server did not start:\n{proc.log_tail()}")


@dataclass(frozen=True)
class Variant:
    """A way to run the project's worker other than as shipped, to measure a proposed change
    without editing the code: settings, the bytecode cache, in-memory patches (bench/patched.py)."""

    what: str
    settings: tuple[tuple[str, Any], ...] = ()
    bytecode_cache: bool = True
    patches: tuple[str, ...] = ()


VARIANTS: dict[str, Variant] = {
    "shipped": Variant("as shipped"),
    "ai-same-queue": Variant("call_ai on the main task queue (eager dispatch)", (("ai_task_queue", "="),)),
    "sandboxed": Variant("the workflows in the SDK's sandbox (ATELIER_WORKFLOW_SANDBOX=true, the default before "
                         "the sixth pass)", (("workflow_sandbox", True),)),
    "unsandboxed": Variant("the workflows outside the SDK's sandbox (ATELIER_WORKFLOW_SANDBOX=false)",
                           (("workflow_sandbox", False),)),
    "unsandboxed-heartbeat-22s": Variant("outside the sandbox, heartbeats sent every 22 s (two per window)",
                                         (("workflow_sandbox", False),), patches=("heartbeat-twice-per-window",)),
    "polls-2": Variant("2 polls per queue (ATELIER_TASK_QUEUE_POLLS=2)", (("task_queue_polls", 2),)),
    "polls-10": Variant("10 polls per queue (ATELIER_TASK_QUEUE_POLLS=10)", (("task_queue_polls", 10),)),
    "polls-20": Variant("20 polls per queue (ATELIER_TASK_QUEUE_POLLS=20)", (("task_queue_polls", 20),)),
    "autoscaling-pollers": Variant("the SDK's autoscaling pollers (as shipped before the sixth pass)",
                                   patches=("autoscaling-pollers",)),
    "unsandboxed-autoscaling-pollers": Variant("outside the sandbox, with the SDK's autoscaling pollers",
                                               (("workflow_sandbox", False),), patches=("autoscaling-pollers",)),
    # Diagnostics: what each extra of a generation's history costs the server (bench/patched.py).
    "unsandboxed-no-patch-marker": Variant("outside the sandbox, no patch marker (diagnostic)",
                                           (("workflow_sandbox", False),), patches=("no-patch-marker",)),
    "unsandboxed-no-upserts": Variant("outside the sandbox, no search-attribute upserts (diagnostic)",
                                      (("workflow_sandbox", False),), patches=("no-search-attribute-upserts",)),
    "unsandboxed-no-deadline-timer": Variant("outside the sandbox, no deadline timer (diagnostic)",
                                             (("workflow_sandbox", False),), patches=("no-deadline-timer",)),
    "unsandboxed-bare-history": Variant("outside the sandbox, none of the three (diagnostic)",
                                        (("workflow_sandbox", False),),
                                        patches=("no-patch-marker", "no-search-attribute-upserts",
                                                 "no-deadline-timer")),
    "no-admission": Variant("remote models' calls skip the admission line (diagnostic)", patches=("no-admission",)),
    "join-by-signal": Variant("the slot request a signal and every grant a signal back (before the join_line "
                              "update)", patches=("join-by-signal",)),
    "sequential-pre-call": Variant("charge, download and model choice one after another (before the "
                                   "generation-2026-12 bundle)", patches=("sequential-pre-call",)),
    "no-bytecode": Variant("no .pyc: the sandbox compiles the workflow module each time", bytecode_cache=False),
    "no-fsync": Variant("blob store without fsync", (("blob_fsync", False),)),
    "local-activities": Variant("charge, select_model, save_work as local activities", patches=("local-activities",)),
    "proposed": Variant("the proposed changes (docs/benchmarks.md)", patches=("local-activities",)),
}


def apply_variant(settings: Settings, variant: str) -> tuple[Settings, Variant]:
    v = VARIANTS[variant]
    update = {k: (settings.task_queue if value == "=" else value) for k, value in v.settings}
    return (settings.model_copy(update=update) if update else settings), v


def provider_settings(s: Stack, provider: str, delay_s: float, **overrides: Any) -> tuple[Settings, ManagedProcess | None]:
    """Settings for one provider mode: `local` (the Pillow compositor in the worker, waiting
    `delay_s`) or `fake-gemini` (the real Gemini client against a loopback fake that answers
    after `delay_s`, like a remote AI: the worker itself does no image compositing)."""
    if provider == "local":
        return s.settings(delay_s=delay_s, **overrides), None
    if provider == "fake-gemini":
        proc, url = start_fake_gemini(s, delay_s)
        return s.settings(ai_provider="gemini", gemini_api_key="bench-key", gemini_base_url=url, **overrides), proc
    raise ValueError(f"unknown provider {provider!r}: expected one of {PROVIDERS}")


# ---- where the time goes, from histories --------------------------------------------------


def activity_name(by_id: dict, scheduled_event_id: int) -> str:
    """The activity type of the event scheduled as `scheduled_event_id` ("" if not in `by_id`)."""
    sched = by_id.get(scheduled_event_id)
    return sched.activity_task_scheduled_event_attributes.activity_type.name if sched is not None else ""


def history_profile(histories: list) -> dict[str, dict[str, float]]:
    """Mean milliseconds per step over some histories: for each activity type, waiting for a
    worker (scheduled -> started) and running (started -> completed); for workflow tasks the
    same two. Tells the server's queues apart from the worker's code."""
    from temporalio.api.enums.v1 import EventType as E

    sums: dict[str, dict[str, float]] = {}

    def add(name: str, key: str, seconds: float) -> None:
        row = sums.setdefault(name, {"count": 0, "queued_ms": 0.0, "running_ms": 0.0})
        row[key] += seconds * 1000
        if key == "running_ms":
            row["count"] += 1

    for history in histories:
        by_id = {ev.event_id: ev for ev in history.events}
        for ev in history.events:
            t = ev.event_time.ToDatetime()
            if ev.event_type == E.EVENT_TYPE_ACTIVITY_TASK_STARTED:
                scheduled_id = ev.activity_task_started_event_attributes.scheduled_event_id
                add(activity_name(by_id, scheduled_id), "queued_ms",
                    (t - by_id[scheduled_id].event_time.ToDatetime()).total_seconds())
            elif ev.event_type == E.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
                attrs = ev.activity_task_completed_event_attributes
                add(activity_name(by_id, attrs.scheduled_event_id), "running_ms",
                    (t - by_id[attrs.started_event_id].event_time.ToDatetime()).total_seconds())
            elif ev.event_type == E.EVENT_TYPE_WORKFLOW_TASK_STARTED:
                sched = by_id[ev.workflow_task_started_event_attributes.scheduled_event_id]
                add("(workflow task)", "queued_ms", (t - sched.event_time.ToDatetime()).total_seconds())
            elif ev.event_type == E.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
                attrs = ev.workflow_task_completed_event_attributes
                add("(workflow task)", "running_ms",
                    (t - by_id[attrs.started_event_id].event_time.ToDatetime()).total_seconds())
    n = max(1, len(histories))
    return {name: {"per_workflow": round(row["count"] / n, 2),
                   "queued_ms": round(row["queued_ms"] / max(1, row["count"]), 1),
                   "running_ms": round(row["running_ms"] / max(1, row["count"]), 1)}
            for name, row in sums.items()}


def activity_timeouts(histories: list) -> dict[str, int]:
    """Activity attempts that timed out in these histories, by activity type and kind of timeout
    (e.g. {"call_ai/HEARTBEAT": 3}); empty when none did."""
    from temporalio.api.enums.v1 import EventType as E
    from temporalio.api.enums.v1 import TimeoutType

    found: dict[str, int] = {}
    for history in histories:
        by_id = {ev.event_id: ev for ev in history.events}
        for ev in history.events:
            if ev.event_type != E.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT:
                continue
            attrs = ev.activity_task_timed_out_event_attributes
            name = activity_name(by_id, attrs.scheduled_event_id)
            kind = TimeoutType.Name(attrs.failure.timeout_failure_info.timeout_type).removeprefix("TIMEOUT_TYPE_")
            found[f"{name}/{kind}"] = found.get(f"{name}/{kind}", 0) + 1
    return found


async def sample_histories(client: Client, workflow_ids: list[str], k: int = 20) -> list:
    import random

    picked = random.Random(0).sample(workflow_ids, min(k, len(workflow_ids)))
    return [await client.get_workflow_handle(wid).fetch_history() for wid in picked]


def print_profile(title: str, profile: dict[str, dict[str, float]]) -> None:
    print_table(title, ["step", "per workflow", "queued ms (mean)", "running ms (mean)"],
                [[name, row["per_workflow"], row["queued_ms"], row["running_ms"]] for name, row in profile.items()])
