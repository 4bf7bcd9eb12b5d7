"""Signed image links: they load without an API key, fail when altered or expired, die with a
deleted image, and offer cached thumbnails at a few widths."""

from __future__ import annotations

import asyncio
import io
import time
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from PIL import Image

from atelier.blobstore import BlobStore
from atelier.links import LinkRefused, LinkSigner
from starter.api import create_app
from tests.api_fixtures import Api, api  # noqa: F401 - fixture
from tests.fakes.images import jpeg
from tests.fakes.webhook_receiver import WebhookReceiver

SIGNER = LinkSigner(b"k" * 32, 3600)
KEY = "a" * 64 + ".jpg"


def _parts(url: str) -> tuple[str, dict[str, str]]:
    split = urlsplit(url)
    return split.path, {k: v[0] for k, v in parse_qs(split.query).items()}


def test_a_link_verifies_until_it_expires_and_not_after():
    _, q = _parts(SIGNER.sign("http://x", KEY, "usr_1", now=1_000))
    assert q["expires"] == str(4_800)  # 1,000 + 3,600 rounded up to the 300 s step
    SIGNER.verify(KEY, "usr_1", q["expires"], q["sig"], now=4_799)
    with pytest.raises(LinkRefused) as expired:
        SIGNER.verify(KEY, "usr_1", q["expires"], q["sig"], now=4_800)
    assert expired.value.code == "LinkExpired"


@pytest.mark.parametrize("ttl_s", [60, 3600, 7 * 24 * 3600])
def test_links_made_within_one_step_are_the_same_url_and_live_at_least_their_lifetime(ttl_s):
    """A client polling a generation gets one URL per image (its browser loads the image once),
    not a new one per read; every link is still valid for the whole lifetime it promises."""
    signer = LinkSigner(b"k" * 32, ttl_s)
    step = signer.step_s
    assert step == ttl_s // 12
    start = 1_700_000_000 - 1_700_000_000 % step  # a step boundary
    links = {now: signer.sign("http://x", KEY, "usr_1", now=now) for now in range(start + 1, start + step + 1, max(1, step // 7))}
    assert len(set(links.values())) == 1  # the whole step: one link
    for now, link in links.items():
        expires = int(_parts(link)[1]["expires"])
        assert now + ttl_s <= expires < now + ttl_s + step
    later = signer.sign("http://x", KEY, "usr_1", now=start + step + 1)
    assert later != links[start + 1] and int(_parts(later)[1]["expires"]) == start + ttl_s + 2 * step


@pytest.mark.parametrize("change", ["key", "owner", "expires", "sig", "secret", "garbage"])
def test_any_altered_part_is_refused_as_a_bad_signature(change):
    _, q = _parts(SIGNER.sign("http://x", KEY, "usr_1", now=1_000))
    key, owner, expires, sig, signer = KEY, "usr_1", q["expires"], q["sig"], SIGNER
    if change == "key":
        key = "b" * 64 + ".jpg"
    elif change == "owner":
        owner = "usr_2"
    elif change == "expires":
        expires = str(int(expires) + 86400)  # a longer life is the obvious forgery
    elif change == "sig":
        sig = ("A" if sig[0] != "A" else "B") + sig[1:]
    elif change == "secret":
        signer = LinkSigner(b"j" * 32, 3600)
    else:
        sig = "not a signature"
    with pytest.raises(LinkRefused) as refused:
        signer.verify(key, owner, expires, sig, now=1_000)
    assert refused.value.code == "BadSignature"


async def _completed(api: Api, auth: dict, *, size=(600, 400), webhook_url: str | None = None) -> dict:
    photo = await api.upload(auth, jpeg(*size))
    body = {"kind": "photography", "images": [{"file_id": photo}]}
    if webhook_url:
        body["webhook_url"] = webhook_url
    started = await api.http.post("/v1/generations", headers=auth, json=body)
    assert started.status_code == 202, started.text
    return await api.poll(auth, started.json()["id"], timeout=60)


async def test_an_image_link_loads_without_a_key_and_refuses_tampering_and_expiry(api: Api):
    user_id, auth = await api.new_user()
    async with api.harness.worker():
        done = await _completed(api, auth)
    assert done["status"] == "completed", done
    image = done["result"]["images"][0]
    path, q = _parts(image["url"])
    key = path.rsplit("/", 1)[1]
    assert path == f"/v1/images/{key}" and q["owner"] == user_id
    # Fresh: valid for the configured lifetime from now, and at most one step (ttl / 12) more.
    ttl = api.settings.url_ttl_s
    assert time.time() + ttl - 30 < int(q["expires"]) < time.time() + ttl + ttl // 12

    loaded = await api.http.get(image["url"])  # no Authorization header at all
    assert loaded.status_code == 200, loaded.text
    assert loaded.headers["content-type"] == image["content_type"]
    assert Image.open(io.BytesIO(loaded.content)).size == (image["width"], image["height"])
    assert int(loaded.headers["cache-control"].split("max-age=")[1]) <= ttl + ttl // 12

    async def refused(query: dict, expected_code: str) -> None:
        answer = await api.http.get(f"{path}?{urlencode(query)}")
        assert answer.status_code == 403, answer.text
        error = answer.json()["error"]
        assert error["code"] == expected_code and error["message"]
        assert answer.headers["content-type"].startswith("application/json")

    await refused({**q, "sig": q["sig"][:-1] + ("A" if q["sig"][-1] != "A" else "B")}, "BadSignature")
    await refused({**q, "expires": str(int(q["expires"]) + 1)}, "BadSignature")
    await refused({k: v for k, v in q.items() if k != "sig"}, "BadSignature")
    # Someone else's name on the link: refused, not served as theirs.
    await refused({**q, "owner": "usr_someone_else"}, "BadSignature")
    expired_url = SIGNER.__class__(api.settings.url_signing_secret.get_secret_value().encode(), 60).sign(
        "http://testserver", key, user_id, now=time.time() - 120)
    expired = await api.http.get(expired_url)
    assert expired.status_code == 403 and expired.json()["error"]["code"] == "LinkExpired"

    # A second GET hands out a link valid for the whole lifetime from the time of that GET: the
    # same link while that still holds (within one step), so a browser loads the image once.
    await asyncio.sleep(1.1)
    again = (await api.http.get(f"/v1/generations/{done['id']}", headers=auth)).json()
    _, q2 = _parts(again["result"]["images"][0]["url"])
    assert int(q2["expires"]) >= time.time() + ttl - 1
    assert q2 == q or int(q2["expires"]) == int(q["expires"]) + ttl // 12  # or the step turned meanwhile

    # The works list hands out signed links too.
    work = (await api.http.get(f"/v1/works/{done['result']['work_id']}", headers=auth)).json()
    assert (await api.http.get(work["images"][0]["url"])).status_code == 200


async def test_thumbnails_come_in_a_few_widths_and_are_cached_in_the_blob_store(api: Api):
    _, auth = await api.new_user()
    async with api.harness.worker():
        done = await _completed(api, auth)
    image = done["result"]["images"][0]
    key = urlsplit(image["url"]).path.rsplit("/", 1)[1]
    blobs: BlobStore = api.harness.deps.blobs
    assert image["width"] > 256
    assert not blobs.exists(blobs.thumbnail_key(key, 256))

    small = await api.http.get(image["url"] + "&w=256")
    assert small.status_code == 200, small.text
    decoded = Image.open(io.BytesIO(small.content))
    assert decoded.width == 256
    assert abs(decoded.height - round(image["height"] * 256 / image["width"])) <= 1
    assert blobs.exists(blobs.thumbnail_key(key, 256))  # cached
    assert small.headers["etag"] != (await api.http.get(image["url"])).headers["etag"]
    # Served from the cache the second time: the same bytes.
    assert (await api.http.get(image["url"] + "&w=256")).content == small.content
    # The bearer route offers the same thumbnails.
    bearer = await api.http.get(f"/v1/files/{key}?w=256", headers=auth)
    assert bearer.status_code == 200 and bearer.content == small.content
    # Wider than the image: the image itself.
    if image["width"] <= 1024:
        assert (await api.http.get(image["url"] + "&w=1024")).content == (await api.http.get(image["url"])).content
    # Only the widths offered.
    odd = await api.http.get(image["url"] + "&w=300")
    assert odd.status_code == 422 and odd.json()["error"]["code"] == "InvalidRequest"


async def test_webhook_bodies_carry_signed_links_that_load(api: Api):
    _, auth = await api.new_user()
    with WebhookReceiver(api.settings.webhook_secret.get_secret_value()) as receiver:
        async with api.harness.worker():
            done = await _completed(api, auth, size=(120, 90), webhook_url=receiver.url)
            [delivery] = await asyncio.to_thread(receiver.wait_for_success, timeout=30)
    url = delivery.payload["data"]["result"]["images"][0]["url"]
    assert "/v1/images/" in url and "sig=" in url
    assert urlsplit(url).path == urlsplit(done["result"]["images"][0]["url"]).path
    path_and_query = url[url.index("/v1/images/"):]
    assert (await api.http.get(path_and_query)).status_code == 200


async def test_without_a_signing_secret_links_need_the_key_and_the_signed_route_says_why(harness):
    settings = harness.settings.model_copy(update={"url_signing_secret": None})
    import httpx

    app = create_app(settings, client=harness.client, engine=harness.engine, blobs=harness.deps.blobs)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://testserver") as http:
        answer = await http.get(f"/v1/images/{KEY}?owner=usr_1&expires=9999999999&sig={'A' * 43}")
    assert answer.status_code == 403 and answer.json()["error"]["code"] == "LinksDisabled"
