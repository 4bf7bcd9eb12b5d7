"""`make run` end to end: the supervisor brings up Temporal, migrations, the worker and the
API; a generation completes through the command line; a SIGKILLed worker is restarted while
the rest keeps serving; Ctrl-C (SIGINT) stops everything."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.fakes import images as fake_images

ROOT = Path(__file__).resolve().parent.parent
# What a process that lost its Temporal server (or was cut off) logs on the way out.
NOISE = re.compile(r"Traceback|ConnectionRefused|[Cc]onnection (refused|reset|error)|transport error|"
                   r"Failed to|Unavailable|tcp connect error|Error polling|RPCError", re.IGNORECASE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Output:
    """Collects a child's stdout in a thread, so waits are bounded and nothing blocks."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc) -> None:
        for line in proc.stdout:
            self.lines.append(line.rstrip())

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[start:]:
                m = re.search(pattern, line)
                if m:
                    return m
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} not seen in {timeout} s; output:\n" + "\n".join(self.lines[-40:]))


def cli(env, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "starter", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.timeout(240)
def test_make_run_serves_restarts_a_dead_worker_and_stops_on_ctrl_c(tmp_path):
    api_port, temporal_port, ui_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATELIER_", "GEMINI_"))}
    env.update({
        "ATELIER_TEMPORAL_ADDRESS": f"127.0.0.1:{temporal_port}",
        "ATELIER_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/atelier.db",
        "ATELIER_BLOB_DIR": str(tmp_path / "blobs"),
        "ATELIER_API_PORT": str(api_port),
        "ATELIER_LOCAL_AI_DELAY_S": "0.2",
        "PYTHONUNBUFFERED": "1",
    })
    proc = subprocess.Popen([sys.executable, "-m", "starter.devstack", "--var-dir", str(tmp_path / "var"),
                             "--ui-port", str(ui_port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = Output(proc)
    stopped_cleanly = False
    try:
        first_worker = int(out.wait_for(r"started worker \(pid (\d+)\)", 60).group(1))
        api_url = f"http://127.0.0.1:{api_port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{api_url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise AssertionError("API not ready:\n" + "\n".join(out.lines[-40:]))
        # Temporal's Web UI is up on its port.
        assert httpx.get(f"http://127.0.0.1:{ui_port}/", timeout=10).status_code == 200

        secrets = dict(line.split("=", 1) for line in (tmp_path / "var" / "dev-secrets.env").read_text().splitlines())
        env.update({"ATELIER_API_URL": api_url, "ATELIER_ADMIN_TOKEN": secrets["ATELIER_ADMIN_TOKEN"]})
        created = cli(env, "users", "create")
        assert created.returncode == 0, created.stderr
        user_id = re.search(r"user_id: (\S+)", created.stdout).group(1)
        api_key = re.search(r"api_key: (\S+)", created.stdout).group(1)
        assert cli(env, "credits", "add", user_id, "100").returncode == 0
        env["ATELIER_API_KEY"] = api_key
        photo = tmp_path / "me.jpg"
        photo.write_bytes(fake_images.jpeg(320, 240))

        done = cli(env, "submit", "--kind", "photography", "--image", str(photo), "--wait", "--timeout", "60")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "completed" in done.stdout and "/v1/images/" in done.stdout

        # Kill the worker: the supervisor restarts it and the API keeps serving meanwhile.
        mark = len(out.lines)
        os.kill(first_worker, signal.SIGKILL)
        second_worker = int(out.wait_for(r"started worker \(pid (\d+)\)", 30, start=mark).group(1))
        assert second_worker != first_worker
        assert httpx.get(f"{api_url}/healthz", timeout=5).status_code == 200
        again = cli(env, "submit", "--kind", "photography", "--image", str(photo), "--wait", "--timeout", "60")
        assert again.returncode == 0, again.stdout + again.stderr

        # Ctrl-C as a terminal sends it: to the supervisor's whole process group.
        mark = len(out.lines)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        out.wait_for(r"\[run\] stopped", 5)
        # Stopped in the reverse order of start (API, worker, then Temporal), quietly: no process
        # logged a traceback or a connection error on the way out.
        shutdown = out.lines[mark:]
        noisy = [line for line in shutdown if NOISE.search(line)]
        assert noisy == [], "\n".join(shutdown[-60:])
        order = [i for i, line in enumerate(shutdown) for pattern in (
            r"\[run\] stopping api", r"uvicorn.*Finished server process", r"\[run\] stopping worker",
            r"atelier.worker: draining", r"\[run\] stopping temporal") if re.search(pattern, line)]
        assert len(order) == 5 and order == sorted(order), "\n".join(shutdown[-60:])
        assert (tmp_path / "var" / "temporal.log").stat().st_size > 0  # the server's log is kept, off the console
        for pid in (second_worker,):
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", api_port)) != 0, "the API still answers after Ctrl-C"
        stopped_cleanly = True
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        # The supervisor's children run in sessions of their own: if the test stopped it
        # abruptly, stop them by the pids it printed, so nothing outlives the test.
        for line in ([] if stopped_cleanly else out.lines):
            m = re.search(r"started \w+ \(pid (\d+)\)", line)
            if m:
                try:
                    os.kill(int(m.group(1)), signal.SIGKILL)
                except ProcessLookupError:
                    pass
