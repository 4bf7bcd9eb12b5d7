"""Security checks across the whole system: the real API (in-process app), a real worker, the
session's dev server, a fake Gemini and a webhook receiver on loopback.

- A second user's key on every route of the OpenAPI schema gets 404 (401 for admin routes),
  never the first user's data.
- Secrets (users' API keys, the admin token, the Gemini key, the webhook secret) never show in
  a log record, an API answer, a workflow history, a memo or a search attribute.
- Input URLs are fetched only by the download activity, through the guarded downloader; webhook
  URLs go through the same guard, which refuses a private address without connecting, and the
  delivery goes to the address the guard approved.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import re
import secrets
import time
import uuid

import httpx
import pytest
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError

from activities.images import ImageActivities
from activities.notify import NotifyActivities
from atelier.blobstore import BlobStore
from atelier.db import create_schema_for_tests
from atelier.downloader import Downloader, UrlGuard
from starter.api import create_app
from tests.conftest import Harness, make_settings
from tests.fakes import images as img
from tests.fakes.gemini_server import FakeGemini, Reply
from tests.fakes.http_server import FakeHttpServer
from tests.fakes.webhook_receiver import WebhookReceiver
from tests.hostile.network_jail import InProcessPublicHost, loopback_only, table_resolver
from tests.hostile.world import User, World
from worker import build_dependencies, build_workers

pytestmark = pytest.mark.timeout(240)

PRIMARY, SECONDARY = "gemini-2.5-flash-image", "gemini-3-pro-image-preview"
TERMINAL = {"completed", "failed", "canceled", "rejected"}
FAST = dict(short_timeout_s=10.0, download_timeout_s=30.0, download_heartbeat_s=10.0, ai_timeout_s=30.0,
            ai_heartbeat_s=3.0, ai_max_attempts=2, generation_deadline_s=300.0, webhook_retry_hours=0.05,
            download_total_timeout_s=5.0, model_failure_threshold=1000)


def _new_secrets() -> dict[str, str]:
    raw = secrets.token_bytes(24)
    return {
        "admin token": "adm-" + secrets.token_urlsafe(24),
        "gemini key": "AIza" + secrets.token_urlsafe(30),
        "webhook secret": "whsec_" + base64.b64encode(raw).decode(),
        "webhook secret body": base64.b64encode(raw).decode(),
        "url signing secret": "url-" + secrets.token_urlsafe(32),
    }


class Records(logging.Handler):
    """Every log record of the process while installed, formatted with its traceback."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # noqa: BLE001 - a record that cannot format is still kept, raw
            self.lines.append(f"{record.name}: {record.msg!r} {record.args!r}")


@contextlib.contextmanager
def capture_logs():
    handler, root = Records(), logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


@dataclasses.dataclass
class Sec:
    world: World
    harness: Harness
    fake: FakeGemini
    receiver: WebhookReceiver
    images: FakeHttpServer
    logs: Records
    secrets: dict[str, str]
    answers: list[tuple[str, str, int, str, str]]  # method, path, status, headers, body
    app: object = None


@pytest.fixture(scope="module")
async def sec(temporal_env, tmp_path_factory):
    found = _new_secrets()
    root = tmp_path_factory.mktemp("security")
    answers: list = []

    async def keep(response: httpx.Response) -> None:
        await response.aread()
        answers.append((response.request.method, response.request.url.path, response.status_code,
                        str(dict(response.headers)), response.text))

    async with contextlib.AsyncExitStack() as stack:
        fake = stack.enter_context(FakeGemini(api_key=found["gemini key"]))
        settings = make_settings(root, ai_provider="gemini", gemini_api_key=found["gemini key"],
                                 gemini_base_url=fake.url, admin_token=found["admin token"],
                                 webhook_secret=found["webhook secret"],
                                 url_signing_secret=found["url signing secret"], **FAST)
        logs = stack.enter_context(capture_logs())
        deps = build_dependencies(settings)
        stack.push_async_callback(deps.aclose)
        await create_schema_for_tests(deps.engine)
        receiver = stack.enter_context(WebhookReceiver(found["webhook secret"]))
        images = stack.enter_context(FakeHttpServer())
        app = create_app(settings, client=temporal_env.client, engine=deps.engine, blobs=deps.blobs)
        http = await stack.enter_async_context(httpx.AsyncClient(
            transport=httpx.ASGITransport(app, raise_app_exceptions=False), base_url="http://testserver",
            timeout=30.0, event_hooks={"response": [keep]}))
        world = World(settings=settings, client=temporal_env.client, engine=deps.engine, blobs=deps.blobs,
                      http=http, api=None, logs=root)
        yield Sec(world, Harness(temporal_env.client, settings, deps), fake, receiver, images, logs, found, answers,
                  app)


async def _start(world: World, user: User, body: dict) -> str:
    r = await world.request("POST", "/v1/generations", headers=user.auth, json=body)
    assert r.status_code == 202, r.text
    return r.json()["id"]


async def _status(world: World, user: User, task_id: str) -> str:
    r = await world.request("GET", f"/v1/generations/{task_id}", headers=user.auth)
    return r.json()["status"]


# ---- a second user on every route ------------------------------------------------------------


def _schema_routes(app) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in app.openapi()["paths"].items() for method in ops}


async def test_a_second_users_key_never_reaches_the_first_users_things(sec: Sec):
    world, fake = sec.world, sec.fake
    alice, bob = await world.new_user(credits_=100), await world.new_user(credits_=100)
    marker = f"alice-private-prompt-{uuid.uuid4().hex[:8]}"
    upload = await world.upload(alice, img.jpeg(200, 150))
    file_id = upload.json()["file_id"]
    upload_key = (await _upload_key(world, alice.user_id))
    async with sec.harness.worker():
        done_id = await _start(world, alice, {"kind": "photography", "images": [{"file_id": file_id}],
                                              "prompt": marker})
        done = await world.wait_terminal(alice, done_id, timeout=60)
        assert done["status"] == "completed", done
        work_id = done["result"]["work_id"]
        output_key = done["result"]["images"][0]["url"].split("?", 1)[0].rsplit("/", 1)[1]
        # One of Alice's generations stays running while Bob tries to cancel it.
        fake.plan(PRIMARY, [Reply.hang()])
        running_id = await _start(world, alice, {"kind": "photography", "images": [{"file_id": file_id}],
                                                 "prompt": marker})
        await fake.wait_for_requests(len(fake.requests) + 1, timeout_s=30)

        params = {"task_id": [done_id, running_id], "work_id": [work_id], "key": [output_key, upload_key],
                  "user_id": [alice.user_id], "file_id": [file_id]}
        bodies = {("POST", "/v1/generations"): {"kind": "photography", "images": [{"file_id": file_id}]},
                  ("POST", "/v1/admin/users/{user_id}/credits"): {"amount": 5}}
        alices = [alice.user_id, done_id, running_id, work_id, output_key, upload_key, file_id, marker]
        walked = set()
        app = sec.app
        for method, template in sorted(_schema_routes(app)):
            names = re.findall(r"{(\w+)}", template)
            assert all(n in params for n in names), f"no value of Alice's for {names} in {template}: add one"
            combos = [{}] if not names else [{names[0]: v} for v in params[names[0]]]
            for combo in combos:
                path = template.format(**combo)
                kw = {"json": bodies[(method, template)]} if (method, template) in bodies else {}
                if template == "/v1/uploads":
                    kw = {"files": {"file": ("b.jpg", img.jpeg(64, 48), "image/jpeg")}}
                r = await world.request(method, path, headers=bob.auth, **kw)
                walked.add((method, template))
                assert r.status_code < 500, (method, path, r.text)
                if template.startswith("/v1/admin"):
                    assert r.status_code in (401, 403), (method, path, r.status_code)
                elif template == "/v1/images/{key}":
                    # The signed-link route takes no key: without Alice's signature it is a bad link.
                    assert r.status_code == 403 and r.json()["error"]["code"] == "BadSignature", (path, r.text)
                elif names:
                    # The README's promise: anything of another user's is 404, as if it did not exist.
                    assert r.status_code == 404, (method, path, r.status_code, r.text)
                    assert r.json()["error"]["code"] == "NotFound", (method, path, r.text)
                elif (method, template) == ("POST", "/v1/generations"):
                    assert r.status_code == 422, r.text  # Alice's file is as good as unknown to Bob
                # Nothing of Alice's in the answer, beyond what Bob put in the request himself.
                sent = path + str(kw.get("json", ""))
                leaked = [v for v in alices if v in r.text and v not in sent]
                assert leaked == [], (method, path, leaked)
        assert walked == _schema_routes(app)
        # Bob's cancel did nothing: Alice's generation is still running; she can cancel it herself.
        assert await _status(world, alice, running_id) == "running"
        assert (await world.request("POST", f"/v1/generations/{running_id}/cancel", headers=alice.auth)).status_code == 202
        assert (await world.wait_terminal(alice, running_id, timeout=60))["status"] == "canceled"
    # Bob's own account is untouched and holds nothing of Alice's.
    assert (await world.request("GET", "/v1/credits", headers=bob.auth)).json()["balance"] == 100


async def _upload_key(world: World, user_id: str) -> str:
    from sqlalchemy import select

    from atelier.db import files

    async with world.engine.connect() as conn:
        return (await conn.execute(select(files.c.blob_key).where(files.c.user_id == user_id,
                                                                  files.c.origin == "upload"))).scalar_one()


# ---- secrets --------------------------------------------------------------------------------------


async def test_secrets_never_appear_in_logs_errors_histories_or_memo(sec: Sec):
    world, fake, found = sec.world, sec.fake, dict(sec.secrets)
    alice, bob = await world.new_user(credits_=200), await world.new_user(credits_=10)
    found["alice's API key"], found["bob's API key"] = alice.api_key, bob.api_key
    file_id = (await world.upload(alice, img.jpeg(160, 120))).json()["file_id"]
    photo = {"kind": "photography", "images": [{"file_id": file_id}]}
    task_ids = []
    # Rejected: Bob can pay for one of these two. Both are accepted before any worker runs (the
    # API's quick balance check passes twice); the workflow's atomic charge refuses one.
    bob_photos = [(await world.upload(bob, img.png(64 + i, 64))).json()["file_id"] for i in range(2)]
    bob_ids = [await _start(world, bob, {"kind": "photography", "images": [{"file_id": f}]}) for f in bob_photos]
    async with sec.harness.worker():
        bob_views = [await world.wait_terminal(bob, t, timeout=60) for t in bob_ids]
        # One at a time, so each meets the provider behaviour planned for it.
        # Success with a signed webhook.
        task_ids.append(await _start(world, alice, {**photo, "webhook_url": sec.receiver.url}))
        views = [await world.wait_terminal(alice, task_ids[-1], timeout=60)]
        # A provider that echoes the key back in its error, on every model: failed, refunded.
        echo = Reply.status(400, message=f"API key {found['gemini key']} not valid for this model")
        fake.plan(PRIMARY, [echo])
        fake.plan(SECONDARY, [echo])
        task_ids.append(await _start(world, alice, photo))
        views.append(await world.wait_terminal(alice, task_ids[-1], timeout=60))
        # A rate limit, then a provider that refuses the key (403): fails over, then completes.
        fake.plan(PRIMARY, [Reply.status(429, retry_after=1), Reply.status(403, message="Permission denied")])
        task_ids.append(await _start(world, alice, photo))
        views.append(await world.wait_terminal(alice, task_ids[-1], timeout=60))
        # A server that never answers, canceled.
        fake.plan(PRIMARY, [Reply.hang()])
        task_ids.append(await _start(world, alice, {**photo, "webhook_url": sec.receiver.url}))
        await fake.wait_for_requests(len(fake.requests) + 1, timeout_s=30)
        await world.request("POST", f"/v1/generations/{task_ids[-1]}/cancel", headers=alice.auth)
        views.append(await world.wait_terminal(alice, task_ids[-1], timeout=60))
        views += bob_views
        task_ids += bob_ids
        await asyncio.to_thread(sec.receiver.wait_for, lambda ds: len([d for d in ds if d.verified]) >= 2, timeout=30)
    assert [v["status"] for v in views[:4]] == ["completed", "failed", "completed", "canceled"], views
    assert sorted(v["status"] for v in views[4:]) == ["completed", "rejected"]
    # Errors a client can cause: wrong keys, a wrong admin token, bad bodies, someone else's ids.
    for headers in ({"Authorization": "Bearer " + found["admin token"]},
                    {"Authorization": "Bearer atl_" + found["gemini key"]},
                    {"Authorization": "Basic " + base64.b64encode(f"x:{found['admin token']}".encode()).decode()}):
        await world.request("GET", "/v1/credits", headers=headers)
    await world.request("POST", "/v1/admin/users", headers=alice.auth)
    await world.request("POST", "/v1/generations", headers=alice.auth, json={"kind": "x", "images": []})
    await world.request("GET", f"/v1/generations/{task_ids[0]}", headers=bob.auth)

    haystacks: dict[str, str] = {"logs": "\n".join(sec.logs.lines)}
    # The one answer that carries a key by design: the admin's create-user answer shows it once.
    haystacks["API answers"] = "\n".join(f"{m} {p} {s} {h} {b}" for m, p, s, h, b in sec.answers
                                         if (m, p) != ("POST", "/v1/admin/users"))
    haystacks["webhook deliveries"] = "\n".join(d.body.decode(errors="replace") + str(d.headers)
                                                for d in sec.receiver.deliveries)
    histories, descriptions = [], []
    for task_id in task_ids + [f"{t}-webhook" for t in (task_ids[0], task_ids[3])]:
        handle = world.client.get_workflow_handle(task_id)
        histories.append((await handle.fetch_history()).to_json())
        desc = await handle.describe()
        descriptions.append(f"{desc.raw_description} {await desc.memo()} {desc.typed_search_attributes}")
    haystacks["workflow histories"] = "\n".join(histories)
    haystacks["memo, search attributes and descriptions"] = "\n".join(descriptions)

    assert len(haystacks["logs"]) > 1000 and len(haystacks["workflow histories"]) > 10_000  # not vacuous
    assert "[redacted]" in haystacks["workflow histories"]  # the echoed key was seen, and redacted
    leaks = [(what, where) for what, value in found.items() for where, text in haystacks.items() if value in text]
    assert leaks == []


# ---- who fetches URLs --------------------------------------------------------------------------------


async def test_input_urls_are_fetched_only_by_the_download_activity(sec: Sec):
    world, images = sec.world, sec.images
    images.route("/in/person.jpg", body=img.jpeg(240, 320), headers={"Content-Type": "image/jpeg"})
    images.route("/in/shirt.png", body=img.png(200, 200), headers={"Content-Type": "image/png"})
    user = await world.new_user(credits_=20)
    before = images.hits()
    task_id = await _start(world, user, {"kind": "fitting", "images": [
        {"url": images.url("/in/person.jpg")}, {"url": images.url("/in/shirt.png")}]})
    # No worker yet: the API answered, and nothing fetched the URLs.
    await asyncio.sleep(1.5)
    assert images.hits() == before
    assert await _status(world, user, task_id) == "queued"
    sent_to_ai = len(sec.fake.requests)
    async with sec.harness.worker():
        view = await world.wait_terminal(user, task_id, timeout=60)
    assert view["status"] == "completed", view
    fetched = images.requests[before:]
    assert sorted(r.path for r in fetched) == ["/in/person.jpg", "/in/shirt.png"]
    assert {r.headers.get("User-Agent") for r in fetched} == {"atelier-downloader/0.1"}
    # The AI call got the images inline, from the blob store; it never saw, let alone fetched, a URL.
    ai_requests = sec.fake.requests[sent_to_ai:]
    assert ai_requests and all(len(r.inline_images) == 2 for r in ai_requests)
    assert not [r for r in ai_requests if images.base_url in str(r.json)]


async def test_every_fetch_of_a_user_url_goes_through_the_one_guard(sec: Sec, monkeypatch):
    """The worker builds one UrlGuard; the downloader and the webhook sender both hold it, and
    the API holds no HTTP client that could fetch a URL."""
    import worker as worker_module

    deps = sec.harness.deps
    # What build_workers registers, read from the arguments it gives each Worker.
    monkeypatch.setattr(worker_module, "Worker", lambda client, **options: options)
    workers = build_workers(sec.world.client, deps)
    owners = [fn.__self__ for w in workers for fn in w["activities"] if hasattr(fn, "__self__")]
    downloads = [o for o in owners if isinstance(o, ImageActivities)]
    webhooks = [o for o in owners if isinstance(o, NotifyActivities)]
    assert len(downloads) == 1 and len(webhooks) == 1
    assert downloads[0].downloader.guard is deps.guard
    assert webhooks[0].sender is downloads[0].downloader  # one guarded sender for both
    assert deps.guard.allow_private is sec.world.settings.allow_private_urls
    app_state = vars(sec.app.state.atelier)
    assert not [k for k, v in app_state.items() if isinstance(v, (httpx.AsyncClient, httpx.Client))]


# ---- webhooks through the guard, with the guard on ------------------------------------------------

PUBLIC = "93.184.215.14"  # never contacted: the in-process transport answers for it


class Rebinding:
    """A name whose first answer is public and every later one private (DNS rebinding)."""

    def __init__(self, table: dict[str, list[str]], rebinding: dict[str, list[str]]) -> None:
        self.table, self.rebinding, self.asked = table, rebinding, []
        self._plain = table_resolver(table)

    async def __call__(self, host: str) -> list[str]:
        self.asked.append(host)
        if host in self.rebinding:
            return [PUBLIC] if self.asked.count(host) == 1 else list(self.rebinding[host])
        return await self._plain(host)


@dataclasses.dataclass
class Guarded:
    world: World
    harness: Harness
    transport: InProcessPublicHost
    jail: list[str]


@pytest.fixture(scope="module")
async def guarded(temporal_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("security-guarded")
    settings = make_settings(root, allow_private_urls=False, **FAST)
    deps = build_dependencies(settings)
    await create_schema_for_tests(deps.engine)
    await deps.http.aclose()
    transport = InProcessPublicHost(PUBLIC, {"/hook": (204, {}, b""), "/ok.jpg": (200, {}, img.jpeg(64, 48))})
    http = httpx.AsyncClient(transport=transport, follow_redirects=False, trust_env=False)
    guard = UrlGuard(allow_private=False, resolver=Rebinding(
        {"hooks.example": [PUBLIC], "inner-hooks.example": ["10.11.12.13"], "meta-hooks.example": ["169.254.169.254"]},
        {"rebind-hooks.example": ["10.0.0.66"]}))
    deps = dataclasses.replace(deps, http=http, guard=guard, downloader=Downloader(
        http, guard, max_bytes=settings.max_download_bytes, max_redirects=settings.max_redirects,
        total_timeout_s=settings.download_total_timeout_s))
    app = create_app(settings, client=temporal_env.client, engine=deps.engine, blobs=deps.blobs)
    harness = Harness(temporal_env.client, settings, deps)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(deps.aclose)
        jail = stack.enter_context(loopback_only())
        api_http = await stack.enter_async_context(httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://testserver", timeout=30.0))
        await stack.enter_async_context(harness.worker())
        yield Guarded(World(settings=settings, client=temporal_env.client, engine=deps.engine,
                            blobs=BlobStore(settings.blob_dir, fsync=False), http=api_http, api=None, logs=root),
                      harness, transport, jail)


async def _photo(g: Guarded, user: User) -> dict:
    r = await g.world.upload(user, img.jpeg(96, 96))
    assert r.status_code == 201, r.text
    return {"kind": "photography", "images": [{"file_id": r.json()["file_id"]}]}


@pytest.mark.parametrize("url", ["http://10.0.0.5/hook", "http://127.0.0.1:8000/hook", "http://[::ffff:10.0.0.5]/hook",
                                 "http://169.254.169.254/latest", "http://localhost/hook", "file:///etc/passwd"])
async def test_webhook_to_a_private_address_is_refused_by_the_api(guarded: Guarded, url: str):
    user = await guarded.world.new_user(credits_=10)
    r = await guarded.world.request("POST", "/v1/generations", headers=user.auth,
                                    json={**await _photo(guarded, user), "webhook_url": url})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "InvalidRequest"


@pytest.mark.parametrize("host", ["inner-hooks.example", "meta-hooks.example"])
async def test_webhook_to_a_name_resolving_private_is_refused_by_the_guard_without_connecting(guarded: Guarded,
                                                                                              host: str):
    world = guarded.world
    user = await world.new_user(credits_=10)
    task_id = await _start(world, user, {**await _photo(guarded, user), "webhook_url": f"http://{host}/hook"})
    view = await world.wait_terminal(user, task_id, timeout=60)
    assert view["status"] == "completed"  # a webhook never changes the outcome
    with pytest.raises(WorkflowFailureError) as failure:
        # UrlRefused fails the delivery at once; the bound leaves room for a task the loaded CI
        # server dispatches and loses (the notify activity's 30 s start-to-close brings it back).
        await asyncio.wait_for(world.client.get_workflow_handle(f"{task_id}-webhook").result(), timeout=150)
    cause = failure.value.cause.cause
    assert isinstance(cause, ApplicationError) and cause.type == "UrlRefused"
    assert guarded.transport.refused == [] and guarded.jail == []
    assert not [s for s in guarded.transport.served if s.startswith(host)]


async def test_webhook_is_delivered_to_the_address_the_guard_approved(guarded: Guarded):
    """DNS rebinding: the name answers a public address to the guard's check, a private one to
    anyone who asks again. The delivery must go to the address the guard approved (as downloads
    do), never to a second lookup of the name."""
    world = guarded.world
    user = await world.new_user(credits_=10)
    task_id = await _start(world, user, {**await _photo(guarded, user), "webhook_url": "http://rebind-hooks.example/hook"})
    assert (await world.wait_terminal(user, task_id, timeout=60))["status"] == "completed"
    deadline = time.monotonic() + 30
    transport = guarded.transport
    while time.monotonic() < deadline and not (transport.refused or "rebind-hooks.example/hook" in transport.served):
        await asyncio.sleep(0.2)
    try:
        assert transport.refused == [], f"the webhook was sent to {transport.refused}, not to the approved {PUBLIC}"
        assert "rebind-hooks.example/hook" in transport.served
        assert guarded.jail == []
    finally:
        with contextlib.suppress(Exception):
            await world.client.get_workflow_handle(f"{task_id}-webhook").terminate("test over")
