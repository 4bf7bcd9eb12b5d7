"""URLs that must never be fetched: other schemes, loopback, private, link-local, IPv6-mapped and
NAT64 addresses, names that resolve to them, and a public host redirecting inward.

This world runs with the guard on (allow_private_urls=False), like production. Nothing here can
send a packet off the machine: the worker's URL guard gets an injected resolver (a table), its
HTTP client an in-process transport that answers only for one make-believe public address and
records any other destination, and Python's sockets are jailed to loopback for the whole module.
A case passes only if it ends in a clear error AND nothing tried to connect anywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import httpx
import pytest

from atelier.blobstore import BlobStore
from atelier.db import create_schema_for_tests
from atelier.downloader import Downloader, UrlGuard
from starter.api import create_app
from tests.conftest import Harness, make_settings
from tests.hostile.checks import Outcome, assert_clear_error
from tests.hostile.conftest import LOOPBACK_SETTINGS
from tests.hostile.corpus import GUARD_CASES, PUBLIC_ADDRESS, PUBLIC_ROUTES, RESOLVER, GuardCase
from tests.hostile.network_jail import InProcessPublicHost, loopback_only, table_resolver
from tests.hostile.world import World
from worker import build_dependencies

pytestmark = pytest.mark.timeout(240)


@dataclasses.dataclass
class GuardWorld:
    world: World
    transport: InProcessPublicHost
    jail_attempts: list[str]
    harness: Harness


@pytest.fixture(scope="module")
async def guard_world(temporal_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-guard")
    settings = make_settings(root, **{**LOOPBACK_SETTINGS, "allow_private_urls": False})
    deps = build_dependencies(settings)
    await create_schema_for_tests(deps.engine)
    transport = InProcessPublicHost(PUBLIC_ADDRESS, PUBLIC_ROUTES)
    await deps.http.aclose()
    http = httpx.AsyncClient(transport=transport, follow_redirects=False, trust_env=False)
    guard = UrlGuard(allow_private=False, resolver=table_resolver(RESOLVER))
    downloader = Downloader(http, guard, max_bytes=settings.max_download_bytes, max_redirects=settings.max_redirects,
                            total_timeout_s=settings.download_total_timeout_s)
    deps = dataclasses.replace(deps, http=http, guard=guard, downloader=downloader)
    harness = Harness(client=temporal_env.client, settings=settings, deps=deps)
    app = create_app(settings, client=temporal_env.client, engine=deps.engine, blobs=deps.blobs)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(deps.aclose)
        attempts = stack.enter_context(loopback_only())
        api_http = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://testserver", timeout=30.0))
        await stack.enter_async_context(harness.worker())
        world = World(settings=settings, client=temporal_env.client, engine=deps.engine,
                      blobs=BlobStore(settings.blob_dir, fsync=False), http=api_http, api=None, logs=root)
        yield GuardWorld(world, transport, attempts, harness)


async def _run(gw: GuardWorld, user, case: GuardCase) -> Outcome:
    world = gw.world
    r = await world.request("POST", "/v1/generations", headers=user.auth,
                            json={"kind": "photography", "images": [{"url": case.url}]})
    outcome = Outcome(case.id, r.status_code, r.json() if r.headers.get("content-type", "").startswith(
        "application/json") else None, r.text)
    if r.status_code == 202:
        outcome.task_id = r.json()["id"]
        outcome.view = await world.wait_terminal(user, outcome.task_id, timeout=90)
        outcome.ledger = await world.ledger(outcome.task_id)
    return outcome


@pytest.fixture(scope="module")
async def guard_outcomes(guard_world: GuardWorld) -> dict[str, Outcome]:
    user = await guard_world.world.new_user(credits_=10 * (len(GUARD_CASES) + 2))
    outcomes = await asyncio.gather(*(_run(guard_world, user, c) for c in GUARD_CASES))
    return {o.case_id: o for o in outcomes}


@pytest.mark.parametrize("case", GUARD_CASES, ids=lambda c: c.id)
async def test_forbidden_url_is_refused_before_any_connection(guard_world: GuardWorld, guard_outcomes, case):
    assert_clear_error(guard_outcomes[case.id], case.expect)
    # The proof that it was refused *before connecting*: no destination but the public host was
    # ever asked of the transport, and no Python socket tried to leave loopback.
    assert guard_world.transport.refused == []
    assert guard_world.jail_attempts == []


async def test_the_public_host_is_reachable_through_the_same_guard(guard_world: GuardWorld, guard_outcomes):
    """The control: the guard is on, not shut. A public name is resolved, pinned and fetched."""
    world = guard_world.world
    user = await world.new_user(credits_=10)
    r = await world.request("POST", "/v1/generations", headers=user.auth,
                            json={"kind": "photography", "images": [{"url": "http://public.example/ok.jpg?x=1"}]})
    assert r.status_code == 202, r.text
    view = await world.wait_terminal(user, r.json()["id"], timeout=60)
    assert view["status"] == "completed", view
    assert "public.example/ok.jpg?x=1" in guard_world.transport.served
    # The redirect cases reached the public host, and only it.
    assert {"public.example/to-private.jpg", "public.example/to-metadata.jpg"} <= set(guard_world.transport.served)
    assert guard_world.transport.refused == [] and guard_world.jail_attempts == []
    assert [a for a in world.answers if a[2] >= 500] == []
