"""Scale-out and what operators see.

- Two worker processes against one dev server and one database share 100 generations with
  no task done twice: one charge and one work per task, read from the database. (CI's second
  pass runs this on PostgreSQL.)
- The Temporal CLI, which the Web UI mirrors, finds a finished generation by its search
  attributes and shows its activities by name.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select
from temporalio.api.enums.v1 import EventType

from atelier.db import ledger, reading, works
from atelier.messages import ImageInput
from tests.conftest import TEMPORAL_BIN
from tests.fakes import images as fake_images

ROOT = Path(__file__).resolve().parent.parent


async def start_worker(env: dict, log: Path) -> asyncio.subprocess.Process:
    out = open(log, "ab")
    try:
        return await asyncio.create_subprocess_exec(sys.executable, "worker.py", cwd=ROOT, env=env,
                                                    stdout=out, stderr=out)
    finally:
        out.close()


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout=30)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


@pytest.mark.timeout(420)
async def test_two_worker_processes_share_100_generations_none_done_twice(harness, temporal_address, tmp_path):
    h = harness
    users = [await h.user(1000) for _ in range(4)]
    photos = {u: ImageInput(file_id=await h.upload(u, fake_images.jpeg(96, 72))) for u in users}
    env = h.process_env(temporal_address, ATELIER_AI_PROVIDER="local", ATELIER_LOCAL_AI_DELAY_S="0.05")
    workers = [await start_worker(env, tmp_path / f"worker{i}.log")
               for i in range(2)]
    try:
        handles = await asyncio.gather(*(h.start(users[i % 4], "photography", [photos[users[i % 4]]])
                                         for i in range(100)))
        results = await asyncio.wait_for(asyncio.gather(*(hd.result() for hd in handles)), timeout=360)
    finally:
        for w in workers:
            await stop(w)
    assert [r.status for r in results] == ["completed"] * 100
    task_ids = {hd.id for hd in handles}

    async with reading(h.engine) as conn:
        charges = Counter(r.task_id for r in (await conn.execute(
            select(ledger.c.task_id).where(ledger.c.entry == "charge"))).all())
        refunds = (await conn.execute(select(ledger.c.task_id).where(ledger.c.entry == "refund"))).all()
        saved = Counter(r.task_id for r in (await conn.execute(select(works.c.task_id))).all())
    assert set(charges) == task_ids and set(charges.values()) == {1}
    assert refunds == []
    assert set(saved) == task_ids and set(saved.values()) == {1}
    for u in users:
        assert await h.balance(u) == 1000 - 25 * h.settings.cost_photography

    # Both processes did work: the activity-started events name the worker that ran them.
    identities: set[str] = set()
    for hd in handles[:40]:
        history = await hd.fetch_history()
        identities |= {e.activity_task_started_event_attributes.identity for e in history.events
                       if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED}
    pids = {i.split("@", 1)[0] for i in identities}
    assert len(pids) == 2, f"activities ran on {identities}"


def temporal_cli(address: str, *args: str) -> dict | list:
    done = subprocess.run([str(TEMPORAL_BIN), *args, "--address", address, "--output", "json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    text = done.stdout.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:  # some commands print one JSON object per line
        return [json.loads(line) for line in text.splitlines() if line.strip()]


async def test_operators_find_a_generation_by_its_search_attributes_with_named_activities(
        harness, temporal_address):
    h = harness
    user = await h.user(100)
    async with h.worker():
        handle = await h.start(user, "fitting", [ImageInput(file_id=await h.upload(user, fake_images.jpeg(120, 160))),
                                                 ImageInput(file_id=await h.upload(user, fake_images.png(80, 80)))])
        assert (await handle.result()).status == "completed"

    query = f'UserId="{user}" AND GenerationKind="fitting" AND GenerationStatus="completed"'
    listed = []
    for _ in range(50):  # visibility is eventually consistent: a few hundred ms at most here
        listed = await asyncio.to_thread(temporal_cli, temporal_address, "workflow", "list", "--query", query)
        if listed:
            break
        await asyncio.sleep(0.2)
    assert [w["execution"]["workflowId"] for w in listed] == [handle.id]
    assert listed[0]["type"]["name"] == "GenerationWorkflow"

    described = await asyncio.to_thread(temporal_cli, temporal_address, "workflow", "describe",
                                        "--workflow-id", handle.id)
    text = json.dumps(described)
    for name, value in (("UserId", user), ("GenerationKind", "fitting"), ("GenerationStatus", "completed")):
        assert name in text and value in text

    shown = await asyncio.to_thread(temporal_cli, temporal_address, "workflow", "show", "--workflow-id", handle.id)
    events = shown["events"] if isinstance(shown, dict) else shown
    scheduled = [e["activityTaskScheduledEventAttributes"]["activityType"]["name"] for e in events
                 if "activityTaskScheduledEventAttributes" in e]
    assert scheduled == ["charge_credits", "download_and_convert", "select_model", "call_ai", "save_work"]
    # Each step carries a readable summary for the UI.
    summaries = [e.get("userMetadata", {}).get("summary") for e in events if "activityTaskScheduledEventAttributes" in e]
    assert all(summaries), summaries
    markers = [e for e in events if "markerRecordedEventAttributes" in e]
    # One patch marker, so one TemporalChangeVersion upsert: each patch recorded costs the server
    # a visibility write, and a generation used to record six to eight.
    patches = [e for e in markers if e["markerRecordedEventAttributes"]["markerName"] == "core_patch"]
    assert len(patches) == 1, patches
    upserts = [e["upsertWorkflowSearchAttributesEventAttributes"] for e in events
               if "upsertWorkflowSearchAttributesEventAttributes" in e]
    assert sum("TemporalChangeVersion" in json.dumps(u) for u in upserts) == 1, upserts
