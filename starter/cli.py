"""`atelier`: the command line for users, operators and developers.

User commands talk to the HTTP API (ATELIER_API_URL, ATELIER_API_KEY); admin commands use
ATELIER_ADMIN_TOKEN. `--direct` starts and reads generations through Temporal and the
database without the API (operators, and tests of the core). History export and replay
talk to Temporal and the workflow code directly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mimetypes
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

TERMINAL = {"completed", "failed", "canceled", "rejected"}
STAGES = ["queued", "charging", "selecting_model", "downloading", "generating", "saving", "notifying", "done"]


class CliError(Exception):
    pass


# ---- the HTTP side -----------------------------------------------------------------------


def _api(args) -> httpx.Client:
    base = args.api_url or os.environ.get("ATELIER_API_URL", "http://127.0.0.1:8000")
    return httpx.Client(base_url=base, timeout=httpx.Timeout(30.0, connect=5.0), trust_env=False)


def _user_headers() -> dict[str, str]:
    key = os.environ.get("ATELIER_API_KEY")
    if not key:
        raise CliError("set ATELIER_API_KEY to your API key (create one with `atelier users create`)")
    return {"Authorization": f"Bearer {key}"}


def _admin_headers() -> dict[str, str]:
    token = os.environ.get("ATELIER_ADMIN_TOKEN")
    if not token:
        raise CliError("set ATELIER_ADMIN_TOKEN to the API's admin token")
    return {"Authorization": f"Bearer {token}"}


def _check(response: httpx.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code >= 400:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        raise CliError(f"{response.status_code} {error.get('code', '')}: {error.get('message', response.text[:200])}")
    return body


def _image_refs(api: httpx.Client, images: list[str]) -> list[dict]:
    refs = []
    for image in images:
        if image.startswith(("http://", "https://")):
            refs.append({"url": image})
            continue
        path = Path(image)
        if not path.is_file():
            raise CliError(f"{image}: no such file (give a local image path or an http(s) URL)")
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        with path.open("rb") as f:
            body = _check(api.post("/v1/uploads", headers=_user_headers(), files={"file": (path.name, f, ctype)}))
        refs.append({"file_id": body["file_id"]})
    return refs


def _params(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise CliError(f"--param {pair!r}: expected KEY=VALUE")
        k, v = pair.split("=", 1)
        out[k] = v
    return out


def waiting_line(g: dict) -> str:
    """What a generation waiting for its model's quota shows: "waiting for <model>: #12 in line,
    about 40 s" (the parts not known are left out); empty when it is not waiting."""
    if g.get("stage") != "waiting_for_model":
        return ""
    text = f"waiting for {g.get('model') or 'the model'}"
    position, eta = g.get("queue_position"), g.get("eta_s")
    if isinstance(position, int):
        text += f": #{position} in line"
        if isinstance(eta, (int, float)):
            text += f", about {eta:.0f} s"
    return text


@dataclass
class StreamEvent:
    id: str | None
    event: str
    data: str


def parse_events(lines) -> Iterator[StreamEvent]:
    """Server-Sent Events from an iterator of text lines (comments, the keep-alives, are skipped)."""
    event_id, name, data = None, "message", []
    for line in lines:
        if line == "":
            if data:
                yield StreamEvent(event_id, name, "\n".join(data))
            name, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "id":
            event_id = value
        elif field == "event":
            name = value
        elif field == "data":
            data.append(value)


def follow(api: httpx.Client, task_id: str, timeout_s: float, on_progress=lambda g: None) -> dict:
    """Follow a generation's progress stream to its end and return the final generation object.
    A dropped connection is resumed with Last-Event-ID (nothing lost, nothing repeated)."""
    deadline = time.monotonic() + timeout_s
    last_id: str | None = None
    failures = 0
    while time.monotonic() < deadline:
        headers = _user_headers()
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        try:
            # Keep-alives come every 15 s: a read that waits much longer means a dead connection.
            with api.stream("GET", f"/v1/generations/{task_id}/events", headers=headers,
                            timeout=httpx.Timeout(10.0, read=45.0)) as response:
                if response.status_code == 204:  # resumed after the end: read the outcome
                    return _check(api.get(f"/v1/generations/{task_id}", headers=_user_headers()))
                if response.status_code != 200:
                    response.read()
                    _check(response)
                for event in parse_events(response.iter_lines()):
                    last_id = event.id or last_id
                    body = json.loads(event.data)
                    if event.event == "progress":
                        on_progress(body)
                    elif event.event in TERMINAL or event.event == "done":
                        return body
                    if time.monotonic() > deadline:
                        break
        except httpx.TransportError as err:
            failures += 1
            if failures > 20:
                raise CliError(f"lost the progress stream of {task_id}: {err}") from None
            time.sleep(min(5.0, 0.5 * failures))
    raise CliError(f"still running after {timeout_s:.0f} s; check later: atelier status {task_id}")


def _watch(api: httpx.Client, task_id: str, timeout_s: float) -> dict:
    """Follow the progress stream with a live bar of the stages; return the final generation."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.fields[stage]:<16}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TextColumn("{task.fields[model]}"), TimeElapsedColumn()) as bar:
        task = bar.add_task(task_id, total=100, stage="queued", model="")

        def show(g: dict) -> None:
            bar.update(task, completed=g.get("progress") or 0, stage=g.get("stage") or "",
                       model=waiting_line(g) or g.get("model") or "")

        final = follow(api, task_id, timeout_s, show)
        show(final)
        return final


def _print_generation(g: dict) -> None:
    print(f"{g['id']}  {g['kind']}  {g['status']}  stage={g.get('stage')}  progress={g.get('progress')}%")
    credits = g.get("credits") or {}
    print(f"  credits charged {credits.get('charged', 0)}, refunded {credits.get('refunded', 0)}")
    if g.get("error"):
        print(f"  error: {g['error'].get('code')}: {g['error'].get('message')}")
    for image in ((g.get("result") or {}).get("images") or []):
        print(f"  image: {image['url']}  ({image['width']}x{image['height']} {image['content_type']})")


def cmd_submit(args) -> int:
    if args.direct:
        return asyncio.run(_submit_direct(args))
    with _api(args) as api:
        body = {"kind": args.kind, "images": _image_refs(api, args.image), "parameters": _params(args.param)}
        for field in ("prompt", "style", "webhook_url", "priority"):
            if getattr(args, field):
                body[field] = getattr(args, field)
        headers = _user_headers()
        if args.idempotency_key:
            headers["Idempotency-Key"] = args.idempotency_key
        started = _check(api.post("/v1/generations", json=body, headers=headers))
        print(f"submitted {started['id']} ({started['status']})")
        if not args.wait:
            return 0
        final = _watch(api, started["id"], args.timeout)
        _print_generation(final)
        return 0 if final["status"] == "completed" else 1


def cmd_watch(args) -> int:
    with _api(args) as api:
        final = _watch(api, args.id, args.timeout)
    _print_generation(final)
    return 0 if final["status"] == "completed" else 1


def cmd_status(args) -> int:
    if args.direct:
        return asyncio.run(_status_direct(args))
    with _api(args) as api:
        _print_generation(_check(api.get(f"/v1/generations/{args.id}", headers=_user_headers())))
    return 0


def cmd_cancel(args) -> int:
    with _api(args) as api:
        _check(api.post(f"/v1/generations/{args.id}/cancel", headers=_user_headers()))
    print(f"cancel requested for {args.id}")
    return 0


def cmd_list(args) -> int:
    with _api(args) as api:
        params = {k: v for k, v in (("status", args.status), ("kind", args.kind), ("limit", args.limit)) if v}
        body = _check(api.get("/v1/generations", params=params, headers=_user_headers()))
    for g in body.get("items", body.get("data", [])):
        print(f"{g['id']}  {g['kind']:<12} {g['status']:<10} {g.get('created_at') or ''}")
    return 0


def cmd_users_create(args) -> int:
    with _api(args) as api:
        body = _check(api.post("/v1/admin/users", headers=_admin_headers(),
                               json={"max_priority": args.max_priority} if args.max_priority else {}))
    print(f"user_id: {body['user_id']}\napi_key: {body['api_key']}   (shown once: keep it)")
    return 0


def cmd_users_priority(args) -> int:
    with _api(args) as api:
        body = _check(api.patch(f"/v1/admin/users/{args.user_id}", headers=_admin_headers(),
                                json={"max_priority": args.max_priority}))
    print(f"{body['user_id']}: highest priority lane {body['max_priority']}")
    return 0


def cmd_credits_add(args) -> int:
    with _api(args) as api:
        body = _check(api.post(f"/v1/admin/users/{args.user_id}/credits", headers=_admin_headers(),
                               json={"amount": args.amount, "reason": args.reason}))
    print(f"balance: {body['balance']}")
    return 0


# ---- the Temporal side -------------------------------------------------------------------


async def _client():
    from atelier.settings import load_settings
    from temporalio.client import Client

    settings = load_settings()
    return settings, await Client.connect(settings.temporal_address, namespace=settings.temporal_namespace)


async def _submit_direct(args) -> int:
    """Operators: start a generation through Temporal, no API. Local files go to the blob store."""
    from atelier import db, works
    from atelier.blobstore import BlobStore
    from atelier.images import store_image
    from dataclasses import asdict

    from atelier.messages import ImageInput
    from starter.service import build_request, read_generation, start_generation

    if not args.user:
        raise CliError("--direct needs --user USER_ID")
    settings, client = await _client()
    engine = db.create_engine(settings.database_url)
    try:
        blobs = BlobStore(settings.blob_dir)
        images = []
        for image in args.image:
            if image.startswith(("http://", "https://")):
                images.append(ImageInput(url=image))
                continue
            stored = await store_image(blobs, Path(image).read_bytes(), max_side=settings.max_image_side,
                                       max_pixels=settings.max_image_pixels)
            images.append(ImageInput(file_id=await works.record_upload(engine, user_id=args.user, image=stored)))
        req = build_request(settings, user_id=args.user, kind=args.kind, images=images, prompt=args.prompt or "",
                            style=args.style or "", parameters=_params(args.param), webhook_url=args.webhook_url,
                            priority=args.priority or "normal")
        await start_generation(client, req, task_queue=settings.task_queue)
        print(f"submitted {req.task_id}")
        if args.wait:
            deadline = time.monotonic() + args.timeout
            shown = ""
            while time.monotonic() < deadline:
                state = await read_generation(client, req.task_id, engine=engine, admission_queue=settings.task_queue)
                line = waiting_line(asdict(state.view)) if state else ""
                if line and line != shown:
                    print(line, flush=True)
                shown = line
                if state and state.view.status in TERMINAL:
                    print(f"{req.task_id} {state.view.status} work={state.view.work_id} "
                          f"images={[i.key for i in state.view.images]}")
                    return 0 if state.view.status == "completed" else 1
                await asyncio.sleep(1.0)
            raise CliError("timed out waiting")
        return 0
    finally:
        await engine.dispose()


async def _status_direct(args) -> int:
    from dataclasses import asdict

    from starter.service import read_generation

    _, client = await _client()
    state = await read_generation(client, args.id)
    if state is None:
        raise CliError(f"no generation {args.id}")
    print(json.dumps(asdict(state.view), indent=2, default=str))
    return 0


async def _history_export(args) -> int:
    _, client = await _client()
    history = await client.get_workflow_handle(args.id).fetch_history()
    sys.stdout.write(history.to_json())
    sys.stdout.write("\n")
    return 0


async def _replay(args) -> int:
    from temporalio.client import WorkflowHistory
    from temporalio.worker import Replayer

    from workflows.admission import ModelAdmissionWorkflow
    from workflows.generation import GenerationWorkflow, WebhookDeliveryWorkflow

    replayer = Replayer(workflows=[GenerationWorkflow, WebhookDeliveryWorkflow, ModelAdmissionWorkflow])
    failures = 0
    for name in args.paths:
        path = Path(name)
        try:
            history = WorkflowHistory.from_json(path.stem, path.read_text())
            result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
            error = result.replay_failure
        except Exception as exc:  # noqa: BLE001 - a broken file is reported like a failed replay
            error = exc
        if error is None:
            print(f"ok      {path}")
        else:
            failures += 1
            print(f"FAILED  {path}: {error}")
    print(f"{len(args.paths) - failures} replayed, {failures} failed")
    return 1 if failures else 0


def cmd_db_upgrade(args) -> int:
    from atelier.migrate import upgrade
    from atelier.settings import load_settings

    upgrade(load_settings().database_url)
    print("database schema is up to date")
    return 0


# ---- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="atelier", description="Atelier: paid AI image generations on Temporal.")
    p.add_argument("--api-url", help="the API's base URL (default: $ATELIER_API_URL or http://127.0.0.1:8000)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("submit", help="start a generation (uploads local files)")
    s.add_argument("--kind", required=True, choices=["photography", "fitting"])
    s.add_argument("--image", action="append", required=True,
                   help="a local image file or an http(s) URL; repeat (fitting: the person first, then garments)")
    s.add_argument("--prompt")
    s.add_argument("--style")
    s.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--webhook-url", dest="webhook_url")
    s.add_argument("--idempotency-key")
    s.add_argument("--priority", choices=["high", "normal", "low"],
                   help="lane for the model's quota (default normal; up to your account's highest)")
    s.add_argument("--wait", action="store_true", help="show progress until the generation ends")
    s.add_argument("--timeout", type=float, default=900.0, help="seconds to wait with --wait (default 900)")
    s.add_argument("--direct", action="store_true", help="through Temporal and the database, without the API")
    s.add_argument("--user", help="the user to charge (with --direct)")
    s.set_defaults(func=cmd_submit)

    s = sub.add_parser("watch", help="follow a generation's progress stream until it ends")
    s.add_argument("id")
    s.add_argument("--timeout", type=float, default=900.0, help="seconds to follow it (default 900)")
    s.set_defaults(func=cmd_watch)

    s = sub.add_parser("status", help="show one generation")
    s.add_argument("id")
    s.add_argument("--direct", action="store_true", help="read it from Temporal, without the API")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("cancel", help="cancel a running generation (its credits come back)")
    s.add_argument("id")
    s.set_defaults(func=cmd_cancel)

    s = sub.add_parser("list", help="your generations, newest first")
    s.add_argument("--status")
    s.add_argument("--kind")
    s.add_argument("--limit", type=int)
    s.set_defaults(func=cmd_list)

    users = sub.add_parser("users", help="admin: users").add_subparsers(dest="users_command", required=True)
    s = users.add_parser("create", help="create a user and print its API key")
    s.add_argument("--max-priority", dest="max_priority", choices=["high", "normal", "low"],
                   help="the highest priority lane the user may ask for (default normal)")
    s.set_defaults(func=cmd_users_create)
    s = users.add_parser("priority", help="set the highest priority lane a user may ask for")
    s.add_argument("user_id")
    s.add_argument("max_priority", choices=["high", "normal", "low"])
    s.set_defaults(func=cmd_users_priority)

    cred = sub.add_parser("credits", help="admin: credits").add_subparsers(dest="credits_command", required=True)
    s = cred.add_parser("add", help="add credits to a user")
    s.add_argument("user_id")
    s.add_argument("amount", type=int)
    s.add_argument("--reason", default="top-up")
    s.set_defaults(func=cmd_credits_add)

    hist = sub.add_parser("history", help="workflow histories").add_subparsers(dest="history_command", required=True)
    s = hist.add_parser("export", help="print a generation's workflow history as JSON (for replay tests)")
    s.add_argument("id")
    s.set_defaults(func=lambda a: asyncio.run(_history_export(a)))

    s = sub.add_parser("replay", help="replay exported histories against the current workflow code")
    s.add_argument("paths", nargs="+")
    s.set_defaults(func=lambda a: asyncio.run(_replay(a)))

    dbp = sub.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    s = dbp.add_parser("upgrade", help="apply the migrations")
    s.set_defaults(func=cmd_db_upgrade)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as err:
        print(f"atelier: {err}", file=sys.stderr)
        return 2
    except httpx.HTTPError as err:
        print(f"atelier: cannot reach the API: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


def run() -> None:
    """Console-script entry: exit without interpreter teardown, where the Temporal SDK can
    abort (PyGILState_Release) after a command that used a Temporal client."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
