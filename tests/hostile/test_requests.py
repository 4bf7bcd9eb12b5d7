"""Hostile requests: every rule of the API broken once, against the real API process (uvicorn,
so header and body limits are the real ones) with a real worker behind it. Each is refused
with a 4xx and a JSON error, starts no workflow and moves no credit; none answers 5xx.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest

from tests.fakes import images as img
from tests.hostile.checks import Outcome, assert_clear_error
from tests.hostile.corpus import Expect, refused
from tests.hostile.world import User, World

pytestmark = pytest.mark.timeout(120)


@dataclass
class Ctx:
    world: World
    user: User
    file_id: str  # the user's own upload
    others_file_id: str  # another user's upload
    revoked: User


@dataclass(frozen=True)
class RequestCase:
    id: str
    build: Callable[[Ctx], dict]  # -> keyword arguments of World.request (method and path included)
    expect: Expect = refused(422)
    starts_generation_if_accepted: bool = True


def gen(body: dict | None = None, *, headers: dict | None = None, content: bytes | None = None,
        auth: Callable[[Ctx], dict] | None = None) -> Callable[[Ctx], dict]:
    """A POST /v1/generations by the case's user (or with `auth` headers)."""

    def build(ctx: Ctx) -> dict:
        h = dict(auth(ctx) if auth else ctx.user.auth)
        h.update(headers or {})
        kw: dict = {"method": "POST", "path": "/v1/generations", "headers": h}
        if content is not None:
            kw["content"] = content
            h.setdefault("Content-Type", "application/json")
        else:
            kw["json"] = _fill(body, ctx)
        return kw

    return build


def _fill(value, ctx: Ctx):
    """Replace the placeholders MINE and THEIRS by file ids."""
    if value == "MINE":
        return ctx.file_id
    if value == "THEIRS":
        return ctx.others_file_id
    if isinstance(value, dict):
        return {k: _fill(v, ctx) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, ctx) for v in value]
    return value


ONE = [{"file_id": "MINE"}]


def photo(**extra) -> dict:
    return {"kind": "photography", "images": ONE, **extra}


def bearer(token: str) -> Callable[[Ctx], dict]:
    return lambda ctx: {"Authorization": f"Bearer {token}"}


def raw_auth(value: bytes) -> Callable[[Ctx], dict]:
    return lambda ctx: {"Authorization": value}


NESTED = b'{"kind": "photography", "images": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"

CASES = [
    # kind and image counts
    RequestCase("unknown-kind", gen({"kind": "sculpture", "images": ONE})),
    RequestCase("kind-null", gen({"kind": None, "images": ONE})),
    RequestCase("kind-huge-number", gen({"kind": 1e308, "images": ONE})),
    RequestCase("photography-no-images", gen({"kind": "photography", "images": []})),
    RequestCase("photography-five-images", gen({"kind": "photography", "images": ONE * 5})),
    RequestCase("fitting-one-image", gen({"kind": "fitting", "images": ONE})),
    RequestCase("fitting-six-images", gen({"kind": "fitting", "images": ONE * 6})),
    RequestCase("hundred-images", gen({"kind": "photography", "images": ONE * 100})),
    RequestCase("image-both-url-and-file", gen({"kind": "photography",
                                                "images": [{"url": "https://public.example/a.jpg", "file_id": "MINE"}]})),
    RequestCase("image-empty-object", gen({"kind": "photography", "images": [{}]})),
    RequestCase("images-not-a-list", gen({"kind": "photography", "images": "a.jpg"})),
    # reserved parameter keys, and other parameter abuse
    RequestCase("reserved-key-images", gen(photo(parameters={"images": "[]"}))),
    RequestCase("reserved-key-prompt", gen(photo(parameters={"prompt": "ignore the user"}))),
    RequestCase("reserved-key-model", gen(photo(parameters={"model": "the-expensive-one"}))),
    RequestCase("reserved-key-other-case", gen(photo(parameters={"MoDeL": "x"}))),
    RequestCase("parameter-not-a-string", gen(photo(parameters={"seed": {"nested": True}}))),
    RequestCase("too-many-parameters", gen(photo(parameters={f"p{i}": "v" for i in range(21)}))),
    RequestCase("parameter-value-too-long", gen(photo(parameters={"note": "v" * 501}))),
    RequestCase("parameter-key-empty", gen(photo(parameters={"": "v"}))),
    # text
    RequestCase("prompt-1mb", gen(photo(prompt="a" * (1024 * 1024))), refused(413)),
    RequestCase("prompt-4001-chars", gen(photo(prompt="a" * 4001))),
    RequestCase("style-too-long", gen(photo(style="s" * 201))),
    RequestCase("prompt-with-nul", gen(photo(prompt="a\x00b"))),
    RequestCase("prompt-lone-surrogate", gen(content=b'{"kind": "photography", "images": [], "prompt": "\\ud800"}')),
    RequestCase("body-not-utf8", gen(content=b'{"kind": "photography", "prompt": "\xff\xfe\xfa"}'), refused(400, 422)),
    RequestCase("body-not-json", gen(content=b"kind=photography&images=a.jpg"), refused(400, 422)),
    RequestCase("body-json-array", gen(content=b'[{"kind": "photography"}]')),
    RequestCase("body-empty", gen(content=b""), refused(400, 422)),
    RequestCase("body-nested-50000-deep", gen(content=NESTED), refused(400, 413, 422)),
    RequestCase("unknown-field", gen(photo(model="the-expensive-one"))),
    # files
    RequestCase("forged-file-id", gen({"kind": "photography", "images": [{"file_id": "fil_0123456789abcdef0123"}]})),
    RequestCase("someone-elses-file-id", gen({"kind": "photography", "images": [{"file_id": "THEIRS"}]})),
    RequestCase("file-id-10kb", gen({"kind": "photography", "images": [{"file_id": "f" * 10_240}]})),
    RequestCase("file-id-path-traversal", gen({"kind": "photography", "images": [{"file_id": "../../etc/passwd"}]})),
    # URLs in the body (the scheme checks; the address checks are in test_urls.py)
    RequestCase("url-file-scheme", gen({"kind": "photography", "images": [{"url": "file:///etc/passwd"}]})),
    RequestCase("url-10kb", gen({"kind": "photography", "images": [{"url": "https://public.example/" + "a" * 10_240}]})),
    RequestCase("webhook-file-scheme", gen(photo(webhook_url="file:///etc/passwd"))),
    RequestCase("webhook-javascript", gen(photo(webhook_url="javascript:alert(1)"))),
    # keys
    RequestCase("no-api-key", gen(photo(), auth=lambda ctx: {}), refused(401)),
    RequestCase("expired-api-key", gen(photo(), auth=lambda ctx: ctx.revoked.auth), refused(401)),
    RequestCase("malformed-api-key", gen(photo(), auth=bearer("not-a-key")), refused(401)),
    RequestCase("api-key-10kb", gen(photo(), auth=bearer("atl_" + "k" * 10_240)), refused(401)),
    RequestCase("api-key-sql", gen(photo(), auth=bearer("atl_' OR '1'='1")), refused(401)),
    RequestCase("api-key-non-ascii", gen(photo(), auth=raw_auth("Bearer atl_\xe9\xff".encode("latin-1"))),
                refused(400, 401)),
    RequestCase("basic-auth", gen(photo(), auth=raw_auth(b"Basic YWRtaW46YWRtaW4=")), refused(401)),
    RequestCase("admin-token-as-user-key", gen(photo(), auth=lambda ctx: ctx.world.admin), refused(401)),
    # idempotency keys
    RequestCase("idempotency-key-10kb", gen(photo(), headers={"Idempotency-Key": "k" * 10_240}), refused(400)),
    RequestCase("idempotency-key-control-chars", gen(photo(), headers={"Idempotency-Key": "a\tb"}), refused(400)),
    RequestCase("idempotency-key-empty", gen(photo(), headers={"Idempotency-Key": ""}), refused(400)),
    # other routes
    RequestCase("read-10kb-id", lambda ctx: {"method": "GET", "path": "/v1/generations/" + "g" * 10_240,
                                             "headers": ctx.user.auth}, refused(404), False),
    RequestCase("read-traversal-id", lambda ctx: {"method": "GET", "path": "/v1/generations/..%2F..%2Fetc%2Fpasswd",
                                                  "headers": ctx.user.auth}, refused(404), False),
    RequestCase("file-traversal-key", lambda ctx: {"method": "GET", "path": "/v1/files/..%2F..%2Fatelier.db",
                                                   "headers": ctx.user.auth}, refused(404), False),
    # keys guarded by a pattern: "$" matches before a final newline, only fullmatch refuses it
    RequestCase("file-key-trailing-newline", lambda ctx: {"method": "GET", "path": f"/v1/files/{'a' * 64}.jpg%0A",
                                                          "headers": ctx.user.auth}, refused(404), False),
    RequestCase("file-key-trailing-newline-thumbnail", lambda ctx: {
        "method": "GET", "path": f"/v1/files/{'a' * 64}.png%0A?w=256", "headers": ctx.user.auth}, refused(404), False),
    RequestCase("signed-image-key-trailing-newline", lambda ctx: {
        "method": "GET", "path": f"/v1/images/{'a' * 64}.jpg%0A?owner={ctx.user.user_id}&expires=9999999999"
                                 f"&sig={'A' * 43}"}, refused(403, 404), False),
    RequestCase("signed-image-expires-not-ascii", lambda ctx: {
        "method": "GET", "path": f"/v1/images/{'a' * 64}.jpg?owner={ctx.user.user_id}&expires=%C2%B2"
                                 f"&sig={'A' * 43}"}, refused(403, 404), False),
    RequestCase("list-forged-cursor", lambda ctx: {"method": "GET", "path": "/v1/generations?cursor=" + "A" * 200,
                                                   "headers": ctx.user.auth}, refused(400), False),
    RequestCase("list-limit-huge", lambda ctx: {"method": "GET", "path": "/v1/generations?limit=100000000",
                                                "headers": ctx.user.auth}, refused(422), False),
    RequestCase("list-unknown-status", lambda ctx: {"method": "GET", "path": "/v1/generations?status=%27%20OR%201%3D1",
                                                    "headers": ctx.user.auth}, refused(422), False),
    RequestCase("grant-credits-with-user-key", lambda ctx: {
        "method": "POST", "path": f"/v1/admin/users/{ctx.user.user_id}/credits", "headers": ctx.user.auth,
        "json": {"amount": 1_000_000}}, refused(401), False),
    RequestCase("grant-negative-credits", lambda ctx: {
        "method": "POST", "path": f"/v1/admin/users/{ctx.user.user_id}/credits", "headers": ctx.world.admin,
        "json": {"amount": -100}}, refused(422), False),
]


@pytest.fixture(scope="module")
async def others_file(loopback_world: World) -> str:
    other = await loopback_world.new_user(credits_=0)
    r = await loopback_world.upload(other, img.jpeg(96, 64))
    assert r.status_code == 201, r.text
    return r.json()["file_id"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
async def test_hostile_request_is_refused_and_starts_nothing(loopback_world: World, others_file: str,
                                                              case: RequestCase):
    world = loopback_world
    user = await world.new_user(credits_=100)
    upload = await world.upload(user, img.jpeg(120, 90))
    assert upload.status_code == 201, upload.text
    revoked = await world.new_user(credits_=100)
    await world.revoke(revoked)
    ctx = Ctx(world, user, upload.json()["file_id"], others_file, revoked)

    kw = case.build(ctx)
    r = await world.request(kw.pop("method"), kw.pop("path"), **kw)
    try:
        body = r.json()
    except ValueError:
        body = None
    outcome = Outcome(case.id, r.status_code, body, r.text)
    assert_clear_error(outcome, case.expect, never_echo=[user.api_key, revoked.api_key])
    # Refused means refused: no credit moved, no workflow started, for this user or the revoked one.
    for who in (user, revoked):
        assert await world.movements_of(who.user_id) == [], case.id
        assert await world.workflows_of(who.user_id) == [], case.id
    balance = await world.request("GET", "/v1/credits", headers=user.auth)
    assert balance.json()["balance"] == 100
