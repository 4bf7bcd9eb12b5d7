"""Hostile content: bytes that are not acceptable images and image hosts that misbehave, sent
through the real API and a real worker process. Each case ends in a clear error: 422/413 at
upload, or a failed generation with a named code and its credits refunded; no 5xx, and the
worker is still up and serving afterwards.

The whole corpus is submitted at once (one module-scoped batch), so the slow cases (a server
that sends a byte a second, one that never answers) cost their time once, not one after another.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.fakes import images as img
from tests.hostile.checks import Outcome, assert_clear_error
from tests.hostile.corpus import HOST_CASES, UPLOAD_CASES, HostCase, UploadCase
from tests.hostile.world import World

pytestmark = pytest.mark.timeout(300)

# Signed-URL style tokens in the query string: they must never show in an error.
URL_TOKEN = "sig=HOSTILE-URL-TOKEN-5f1c"
GENERATION_TIMEOUT_S = 150.0


async def _run_url_case(world: World, user, host, case: HostCase) -> Outcome:
    if case.setup is not None:
        case.setup(host)
    else:
        host.route(case.path, **case.route)
    body = {"kind": "photography", "images": [{"url": f"{host.url(case.path)}?{URL_TOKEN}"}]}
    r = await world.request("POST", "/v1/generations", headers=user.auth, json=body)
    outcome = Outcome(case.id, r.status_code, _json(r), r.text)
    if r.status_code == 202:
        outcome.task_id = r.json()["id"]
        outcome.view = await world.wait_terminal(user, outcome.task_id, timeout=GENERATION_TIMEOUT_S)
        outcome.ledger = await world.ledger(outcome.task_id)
    return outcome


def _json(r):
    try:
        return r.json()
    except ValueError:
        return None


@pytest.fixture(scope="module")
async def url_outcomes(loopback_world: World, image_host) -> dict[str, Outcome]:
    world = loopback_world
    user = await world.new_user(credits_=10 * (len(HOST_CASES) + 5))
    outcomes = await asyncio.gather(*(_run_url_case(world, user, image_host, c) for c in HOST_CASES))
    return {o.case_id: o for o in outcomes}


@pytest.mark.parametrize("case", HOST_CASES, ids=lambda c: c.id)
async def test_bad_url_content_fails_with_a_named_error_and_a_refund(url_outcomes, case: HostCase):
    assert_clear_error(url_outcomes[case.id], case.expect, never_echo=[URL_TOKEN.split("=")[1]])


@pytest.mark.parametrize("case", UPLOAD_CASES, ids=lambda c: c.id)
async def test_bad_upload_is_refused_with_a_clear_error(loopback_world: World, case: UploadCase):
    world = loopback_world
    user = await world.new_user(credits_=0)
    r = await world.upload(user, case.data(), case.filename)
    outcome = Outcome(case.id, r.status_code, _json(r), r.text)
    assert_clear_error(outcome, case.expect)
    # Nothing was kept: the user has no file to show for it.
    works = await world.request("GET", "/v1/works", headers=user.auth)
    assert works.status_code == 200 and works.json()["items"] == []


async def test_worker_survived_the_corpus_and_still_serves(loopback_world: World, url_outcomes, image_host):
    """No crashed or stuck worker: the same process (never restarted) completes a good generation."""
    world = loopback_world
    assert world.worker is not None and world.worker.alive and world.worker.starts == 1, (
        f"the worker died (exit {world.worker.returncode}); see {world.worker.log_path}")
    user = await world.new_user(credits_=20)
    image_host.route("/good.jpg", body=img.jpeg(320, 240), headers={"Content-Type": "image/jpeg"})
    upload = await world.upload(user, img.png(200, 150))
    assert upload.status_code == 201, upload.text
    r = await world.request("POST", "/v1/generations", headers=user.auth, json={
        "kind": "fitting", "images": [{"url": image_host.url("/good.jpg")}, {"file_id": upload.json()["file_id"]}]})
    assert r.status_code == 202, r.text
    view = await world.wait_terminal(user, r.json()["id"], timeout=60)
    assert view["status"] == "completed", view
    assert world.worker.alive


async def test_no_answer_of_the_api_was_a_5xx(loopback_world: World, url_outcomes):
    server_errors = [a for a in loopback_world.answers if a[2] >= 500]
    assert server_errors == []
