"""The command line: replay, history export, and a generation started without the API."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from temporalio.client import WorkflowHistory

from tests.fakes import images as fake_images

ROOT = Path(__file__).resolve().parent.parent
HISTORIES = Path(__file__).parent / "histories"


async def atelier(*args: str, env: dict | None = None, timeout: float = 120) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "starter", *args, cwd=ROOT, env=env or dict(os.environ),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=timeout)
    return proc.returncode, out.decode(), err.decode()


async def test_replay_command_reports_each_history():
    paths = sorted(str(p) for p in HISTORIES.rglob("*.json"))
    code, out, _ = await atelier("replay", *paths)
    assert code == 0, out
    assert out.count("ok ") == len(paths) and f"{len(paths)} replayed, 0 failed" in out


async def test_replay_command_fails_on_a_broken_history(tmp_path):
    good = HISTORIES / "success.json"
    broken = tmp_path / "broken.json"
    events = json.loads(good.read_text())
    events["events"] = events["events"][:5] + events["events"][7:]  # two events lost
    broken.write_text(json.dumps(events))
    code, out, _ = await atelier("replay", str(good), str(broken))
    assert code == 1
    assert "FAILED" in out and "broken.json" in out and "1 replayed, 1 failed" in out


async def test_direct_submit_then_export_history(harness, temporal_address, tmp_path):
    h = harness
    user = await h.user(50)
    photo = tmp_path / "me.png"
    photo.write_bytes(fake_images.png(200, 260))
    env = h.process_env(temporal_address)
    async with h.worker():
        code, out, err = await atelier("submit", "--direct", "--user", user, "--kind", "photography",
                                       "--image", str(photo), "--wait", "--timeout", "60", env=env)
    assert code == 0, out + err
    task_id = out.split()[1]
    assert "completed" in out
    assert await h.ledger(task_id) == (10, 0)

    code, out, err = await atelier("history", "export", task_id, env=env)
    assert code == 0, err
    history = WorkflowHistory.from_json(task_id, out)
    assert history.workflow_id == task_id and len(history.events) > 10


async def test_cli_errors_are_clear_not_tracebacks(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATELIER_")}
    code, _, err = await atelier("status", "gen_x", env=env)
    assert code == 2 and "ATELIER_API_KEY" in err and "Traceback" not in err
    env["ATELIER_API_KEY"] = "atl_x"
    env["ATELIER_API_URL"] = "http://127.0.0.1:9"  # nothing listens on the discard port
    code, _, err = await atelier("status", "gen_x", env=env)
    assert code == 2 and "cannot reach the API" in err and "Traceback" not in err


def test_the_waiting_line_says_model_place_and_estimate():
    from starter.cli import waiting_line

    assert waiting_line({"stage": "waiting_for_model", "model": "m1", "queue_position": 12, "eta_s": 40.2}) == \
        "waiting for m1: #12 in line, about 40 s"
    assert waiting_line({"stage": "waiting_for_model", "model": "m1", "queue_position": 3, "eta_s": None}) == \
        "waiting for m1: #3 in line"
    assert waiting_line({"stage": "waiting_for_model", "model": "m1"}) == "waiting for m1"
    assert waiting_line({"stage": "generating", "model": "m1", "queue_position": 1}) == ""
