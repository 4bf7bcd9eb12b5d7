"""The progress stream (Server-Sent Events) through real API processes, a real worker and the dev
server: every change once, in order, then the whole generation; resumed on another API process
with Last-Event-ID without loss or repeat; keep-alives while no worker is up."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import httpx
import pytest
from temporalio.api.enums.v1 import EventType

from tests.api_fixtures import uvicorn_process
from tests.fakes.images import jpeg

TERMINAL = {"completed", "failed", "canceled", "rejected"}


@dataclass
class Read:
    events: list[tuple[int, str, dict]] = field(default_factory=list)  # (id, event, data)
    comments: list[str] = field(default_factory=list)
    closed: bool = False  # the server ended the stream
    status: int = 0


async def read_stream(http: httpx.AsyncClient, task_id: str, auth: dict, *, last_event_id: int | None = None,
                      stop_after: int | None = None, for_s: float | None = None, timeout_s: float = 60.0) -> Read:
    """Read the stream until it closes, or `stop_after` progress events, or `for_s` seconds."""
    import json

    read = Read()
    headers = dict(auth)
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)

    async def consume() -> None:
        async with http.stream("GET", f"/v1/generations/{task_id}/events", headers=headers) as response:
            read.status = response.status_code
            if response.status_code != 200:
                await response.aread()
                read.closed = True
                return
            assert response.headers["content-type"].startswith("text/event-stream")
            event_id, name, data = None, "message", []
            async for line in response.aiter_lines():
                if line.startswith(":"):
                    read.comments.append(line)
                elif line == "":
                    if data:
                        read.events.append((int(event_id), name, json.loads("\n".join(data))))
                        if stop_after is not None and sum(e[1] == "progress" for e in read.events) >= stop_after:
                            return
                    name, data = "message", []
                else:
                    key, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if key == "id":
                        event_id = value
                    elif key == "event":
                        name = value
                    elif key == "data":
                        data.append(value)
            read.closed = True

    try:
        await asyncio.wait_for(consume(), timeout=for_s if for_s is not None else timeout_s)
    except asyncio.TimeoutError:
        if for_s is None:
            raise
    return read


async def _setup(http: httpx.AsyncClient, admin: dict) -> tuple[str, dict]:
    created = (await http.post("/v1/admin/users", headers=admin)).json()
    await http.post(f"/v1/admin/users/{created['user_id']}/credits", headers=admin, json={"amount": 100})
    return created["user_id"], {"Authorization": f"Bearer {created['api_key']}"}


async def _start(http: httpx.AsyncClient, auth: dict) -> str:
    upload = await http.post("/v1/uploads", headers=auth, files={"file": ("me.jpg", jpeg(160, 120), "image/jpeg")})
    started = await http.post("/v1/generations", headers=auth,
                              json={"kind": "photography", "images": [{"file_id": upload.json()["file_id"]}]})
    assert started.status_code == 202, started.text
    return started.json()["id"]


def _without_links(g: dict) -> dict:
    g = dict(g)
    if g.get("result"):
        g["result"] = {**g["result"], "images": [{**i, "url": i["url"].split("?")[0]} for i in g["result"]["images"]]}
    return g


@pytest.fixture
async def servers(harness_factory, temporal_address, tmp_path):
    harness = await harness_factory(events_poll_s=0.2, events_keepalive_s=1.0, local_ai_delay_s=2.0)
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(uvicorn_process(harness.settings, temporal_address, log_path=tmp_path / "a.log"))
        b = stack.enter_context(uvicorn_process(harness.settings, temporal_address, log_path=tmp_path / "b.log"))
        async with httpx.AsyncClient(base_url=a.base, timeout=30) as http_a, \
                httpx.AsyncClient(base_url=b.base, timeout=30) as http_b:
            yield harness, http_a, http_b
        for served in (a, b):
            assert "Traceback" not in served.log(), served.log()[-3000:]


async def test_a_stream_waits_without_a_worker_then_sees_every_change_once_and_the_whole_generation(servers):
    harness, http, _ = servers
    admin = {"Authorization": f"Bearer {harness.settings.admin_token.get_secret_value()}"}
    _, auth = await _setup(http, admin)
    task_id = await _start(http, auth)

    # No worker: nothing happens, but the stream stays open and keeps the connection alive.
    idle = await read_stream(http, task_id, auth, for_s=3.0)
    assert idle.status == 200 and idle.events == [] and not idle.closed
    assert len(idle.comments) >= 2 and all(c.startswith(": ping") for c in idle.comments)

    async with harness.worker():
        read = await read_stream(http, task_id, auth)
        # Resumed after the final event: 204, nothing more.
        after_end = await read_stream(http, task_id, auth, last_event_id=read.events[-1][0])
        assert after_end.status == 204 and after_end.events == []
    assert read.closed
    ids = [e[0] for e in read.events]
    assert ids == sorted(set(ids)), ids  # increasing, no repeat
    *progress, (final_id, final_name, final) = read.events
    assert all(name == "progress" for _, name, _ in progress) and final_name == "completed"
    assert final_id > progress[-1][0]
    stages = [data["stage"] for _, _, data in progress]
    runs = [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]
    assert len(runs) == len(set(runs)), runs  # each stage once, in one stretch
    assert {"charging", "downloading", "generating", "saving"} <= set(runs), runs
    assert all(data["id"] == task_id and data["status"] in ("queued", "running") for _, _, data in progress)
    # Watching wrote nothing into the generation's history (a query, not an update).
    history = await harness.client.get_workflow_handle(task_id).fetch_history()
    kinds = {EventType.Name(e.event_type) for e in history.events}
    assert not any("UPDATE" in k for k in kinds), kinds
    # The final event is the generation object GET answers.
    got = (await http.get(f"/v1/generations/{task_id}", headers=auth)).json()
    assert _without_links(final) == _without_links(got)
    assert final["result"]["images"] and "sig=" in final["result"]["images"][0]["url"]

    # No worker now: a new stream still ends with the generation (from its result); a resume gets 204.
    again = await read_stream(http, task_id, auth)
    assert again.closed and again.events[-1][1] == "completed"
    assert _without_links(again.events[-1][2]) == _without_links(got)
    assert (await read_stream(http, task_id, auth, last_event_id=final_id)).status == 204


async def test_a_stream_resumed_on_another_api_process_loses_and_repeats_nothing(servers):
    harness, http_a, http_b = servers
    admin = {"Authorization": f"Bearer {harness.settings.admin_token.get_secret_value()}"}
    _, auth = await _setup(http_a, admin)
    task_id = await _start(http_a, auth)
    async with harness.worker():
        first = await read_stream(http_a, task_id, auth, stop_after=2)  # then the client drops
        assert len(first.events) == 2 and not first.closed
        rest = await read_stream(http_b, task_id, auth, last_event_id=first.events[-1][0])
        assert rest.closed and rest.events[-1][1] == "completed"
        # A reader from the start (a worker up to replay the log) sees exactly what the two halves saw.
        whole = await read_stream(http_b, task_id, auth)
    assert [e[0] for e in first.events + rest.events] == [e[0] for e in whole.events]
    assert [e[2] for e in first.events + rest.events][:-1] == [e[2] for e in whole.events][:-1]


async def test_the_stream_is_only_for_the_owner_and_checks_its_resume_point(servers):
    harness, http, _ = servers
    admin = {"Authorization": f"Bearer {harness.settings.admin_token.get_secret_value()}"}
    _, alice = await _setup(http, admin)
    _, bob = await _setup(http, admin)
    task_id = await _start(http, alice)
    for who, path in ((bob, f"/v1/generations/{task_id}/events"), (alice, "/v1/generations/gen_nope/events")):
        answer = await http.get(path, headers=who)
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "NotFound"
    bad = await http.get(f"/v1/generations/{task_id}/events", headers={**alice, "Last-Event-ID": "ten"})
    assert bad.status_code == 422 and "Last-Event-ID" in bad.json()["error"]["message"]
    assert (await http.get(f"/v1/generations/{task_id}/events")).status_code == 401
    await harness.client.get_workflow_handle(task_id).terminate("test over")
    began = time.monotonic()
    # Closed with no worker to replay it: the stream still ends with the generation (from its result).
    closed = await read_stream(http, task_id, alice, timeout_s=30)
    assert closed.closed and closed.events[-1][1] == "failed" and time.monotonic() - began < 30


def test_the_cli_parses_events_and_skips_keepalives():
    from starter.cli import parse_events

    lines = [": ping - now", "id: 3", "event: progress", 'data: {"stage": "charging"}', "",
             ": ping", "id: 4", "event: completed", "data: {", 'data: "status": "completed"}', ""]
    events = list(parse_events(iter(lines)))
    assert [(e.id, e.event) for e in events] == [("3", "progress"), ("4", "completed")]
    assert events[1].data == '{\n"status": "completed"}'


async def test_atelier_watch_and_submit_wait_follow_the_stream(servers, tmp_path):
    import os
    import sys

    from tests.api_fixtures import ROOT

    harness, http, _ = servers
    admin = {"Authorization": f"Bearer {harness.settings.admin_token.get_secret_value()}"}
    _, auth = await _setup(http, admin)
    task_id = await _start(http, auth)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATELIER_")}
    env.update(ATELIER_API_URL=str(http.base_url).rstrip("/"), ATELIER_API_KEY=auth["Authorization"].split()[1])
    photo = tmp_path / "me.jpg"
    photo.write_bytes(jpeg(150, 110))

    async def atelier(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "starter", *args, cwd=ROOT, env=env,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
        return proc.returncode, out.decode()

    async with harness.worker():
        watched, submitted = await asyncio.gather(
            atelier("watch", task_id, "--timeout", "90"),
            atelier("submit", "--kind", "photography", "--image", str(photo), "--wait", "--timeout", "90"))
    for code, out in (watched, submitted):
        assert code == 0, out
        assert "completed" in out and "/v1/images/" in out
    assert f"{task_id}  photography  completed" in watched[1]
