"""Screenshots of one generation's history in the Temporal UI, as shipped and with the quick
database steps as local activities (bench/patched.py), for docs/benchmarks.md: what an operator
sees either way. Needs Chromium (`apt-get install chromium`).

    python -m bench.ui_history --out docs/img
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from temporalio.testing import WorkflowEnvironment

from atelier.db import create_engine
from atelier.messages import ImageInput
from bench.common import (
    free_port,
    DEV_SERVER_STARTUP,
    SEARCH_ATTRIBUTE_KEYS,
    SQLITE_PRAGMAS,
    TEMPORAL_BIN,
    ImageServer,
    Stack,
    make_users,
    prepare_database,
    small_jpeg,
    start_project_worker,
    wait_for_pollers,
)
from starter.service import build_request, start_generation


def screenshot(url: str, out: Path, size: str = "1400,1300") -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium is not installed (apt-get install -y chromium)")
    subprocess.run([browser, "--headless=new", "--no-sandbox", "--hide-scrollbars", f"--screenshot={out}",
                    f"--window-size={size}", "--virtual-time-budget=10000", url],
                   check=True, capture_output=True, timeout=120)


async def main(out_dir: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="atelier-ui-history-"))
    ui_port = free_port()
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(TEMPORAL_BIN), search_attributes=SEARCH_ATTRIBUTE_KEYS,
        dev_server_database_filename=str(tmp / "temporal.db"), dev_server_extra_args=SQLITE_PRAGMAS,
        dev_server_log_level="error", ui=True, ui_port=ui_port, dev_server_startup_timeout=DEV_SERVER_STARTUP)
    s = Stack(tmp=tmp, env=env, client=env.client, address=env.client.service_client.config.target_host,
              server=None)
    shots = {}
    try:
        with ImageServer() as images:
            for arm, patches in (("activities", ()), ("local-activities", ("local-activities",))):
                settings = s.settings(delay_s=1.0)
                await prepare_database(settings)
                engine = create_engine(settings.database_url)
                [user] = await make_users(engine, 1, 1000)
                await engine.dispose()
                worker = start_project_worker(s, settings, f"worker-{arm}", patches=patches)
                await wait_for_pollers(s.client, [(settings.task_queue, "workflow")], worker)
                req = build_request(settings, user_id=user, kind="photography", style="studio",
                                    images=[ImageInput(url=images.add(f"/{arm}.jpg", small_jpeg(len(shots))))],
                                    task_id=f"gen_{arm.replace('-', '_')}_{uuid.uuid4().hex[:8]}")
                handle = await start_generation(s.client, req, task_queue=settings.task_queue)
                await asyncio.wait_for(handle.result(), timeout=120)
                worker.stop()
                shots[arm] = req.task_id
        time.sleep(1)
        for arm, task_id in shots.items():
            url = f"http://127.0.0.1:{ui_port}/namespaces/default/workflows/{task_id}"
            out = out_dir / f"ui-history-{arm}.png"
            screenshot(url, out)
            print(f"{arm}: {task_id} -> {out}")
    finally:
        for child in s.children:
            child.stop()
        await env.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m bench.ui_history", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("docs/img"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from bench.common import use_bytecode_cache

    use_bytecode_cache()
    asyncio.run(main(args.out))
