"""Bad input is refused before anything starts: the right status, a JSON error, no workflow,
no ledger row, and never a secret in the answer."""

from __future__ import annotations

import io
import os

import httpx
from PIL import Image

from starter.api import library
from tests.api_fixtures import Api, api, api_factory, ledger_entries, settled_workflows_of, started  # noqa: F401
from tests.fakes.images import jpeg

URL = "http://127.0.0.1:9/p.jpg"


def noisy_jpeg(side: int) -> bytes:
    """A JPEG that does not compress: random pixels."""
    image = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=95)
    return out.getvalue()


def _refused_bodies(file_id: str) -> dict[str, dict]:
    one = [{"file_id": file_id}]
    return {
        "unknown kind": {"kind": "sculpture", "images": one},
        "photography without images": {"kind": "photography", "images": []},
        "fitting with one image": {"kind": "fitting", "images": one},
        "fitting with six images": {"kind": "fitting", "images": one * 6},
        "reserved parameter images": {"kind": "photography", "images": one, "parameters": {"images": "[]"}},
        "reserved parameter prompt": {"kind": "photography", "images": one, "parameters": {"Prompt": "x"}},
        "reserved parameter model": {"kind": "photography", "images": one, "parameters": {"model": "cheap"}},
        "non-string parameter": {"kind": "photography", "images": one, "parameters": {"seed": 7}},
        "ftp url": {"kind": "photography", "images": [{"url": "ftp://example.com/a.jpg"}]},
        "javascript url": {"kind": "photography", "images": [{"url": "javascript:alert(1)"}]},
        "url with a password": {"kind": "photography", "images": [{"url": "http://u:p@example.com/a.jpg"}]},
        "both url and file": {"kind": "photography", "images": [{"url": URL, "file_id": file_id}]},
        "neither url nor file": {"kind": "photography", "images": [{}]},
        "unknown file": {"kind": "photography", "images": [{"file_id": "fil_forged"}]},
        "unknown field": {"kind": "photography", "images": one, "model": "x"},
        "webhook ftp": {"kind": "photography", "images": one, "webhook_url": "ftp://example.com/hook"},
        "prompt too long": {"kind": "photography", "images": one, "prompt": "x" * 4001},
        "NUL in prompt": {"kind": "photography", "images": one, "prompt": "a\x00b"},
        "images not a list": {"kind": "photography", "images": "a.jpg"},
    }


async def test_invalid_generations_are_422_and_start_nothing(api: Api):
    user_id, auth = await api.new_user(credits_=100)
    file_id = await api.upload(auth, jpeg())

    for name, body in _refused_bodies(file_id).items():
        response = await api.http.post("/v1/generations", headers=auth, json=body)
        assert response.status_code == 422, (name, response.status_code, response.text)
        error = response.json()["error"]
        assert error["code"] and error["message"], name

    assert started(api) == 0
    assert await settled_workflows_of(api.harness.client, user_id, expect_at_least=0) == []
    assert [e["entry"] for e in await ledger_entries(api, auth)] == ["grant"]


async def test_messages_say_what_is_wrong(api: Api):
    _, auth = await api.new_user()
    file_id = await api.upload(auth, jpeg())
    one = [{"file_id": file_id}]

    async def message(body) -> str:
        response = await api.http.post("/v1/generations", headers=auth, json=body)
        assert response.status_code == 422
        return response.json()["error"]["message"]

    assert "reserved" in await message({"kind": "photography", "images": one, "parameters": {"images": "x"}})
    assert "fitting needs one person image" in await message({"kind": "fitting", "images": one})
    assert "http or https" in await message({"kind": "photography", "images": [{"url": "ftp://x/y.jpg"}]})
    assert "kind" in await message({"kind": "sculpture", "images": one})
    assert "unknown file" in await message({"kind": "photography", "images": [{"file_id": "fil_nope"}]})


async def test_private_urls_are_refused_when_not_allowed(api_factory):
    api = await api_factory(allow_private_urls=False)
    _, auth = await api.new_user()
    for url in ("http://127.0.0.1/a.jpg", "http://10.1.2.3/a.jpg", "http://localhost:8000/a.jpg",
                "http://[::1]/a.jpg", "http://0x7f.1/a.jpg", "http://169.254.169.254/latest/meta-data"):
        response = await api.http.post("/v1/generations", headers=auth,
                                       json={"kind": "photography", "images": [{"url": url}]})
        assert response.status_code == 422, (url, response.text)
    assert started(api) == 0


async def test_low_balance_is_402_at_once(api: Api):
    user_id, auth = await api.new_user(credits_=5)
    file_id = await api.upload(auth, jpeg())
    response = await api.http.post("/v1/generations", headers=auth,
                                   json={"kind": "photography", "images": [{"file_id": file_id}]})
    assert response.status_code == 402
    assert response.json()["error"]["code"] == "InsufficientCredits"
    assert "costs 10" in response.json()["error"]["message"]
    assert started(api) == 0
    assert [e["entry"] for e in await ledger_entries(api, auth)] == ["grant"]


async def test_oversized_bodies_are_refused_not_crashed(api_factory):
    api = await api_factory(max_download_bytes=50_000)
    _, auth = await api.new_user()
    file_id = await api.upload(auth, jpeg())
    huge = {"kind": "photography", "images": [{"file_id": file_id}], "prompt": "x" * 1_000_000}
    response = await api.http.post("/v1/generations", headers=auth, json=huge)
    assert response.status_code == 413 and response.json()["error"]["code"] == "ContentTooLarge"

    async def chunks():  # no Content-Length: the limit is enforced while the body streams
        for _ in range(100):
            yield b"x" * 10_000

    streamed = await api.http.post("/v1/generations", headers={**auth, "Content-Type": "application/json"},
                                   content=chunks())
    assert streamed.status_code == 413

    # Over the image cap (the handler's check) and over the body cap (the middleware's).
    for side in (250, 400):  # about 77 KB and 190 KB
        big_image = noisy_jpeg(side)
        assert len(big_image) > 50_000
        upload = await api.http.post("/v1/uploads", headers=auth, files={"file": ("big.jpg", big_image, "image/jpeg")})
        assert upload.status_code == 413, (len(big_image), upload.text)
    assert started(api) == 0


async def test_uploads_must_be_images(api: Api):
    _, auth = await api.new_user()
    for name, data in (("page.html", b"<!doctype html><html></html>"), ("empty.jpg", b""),
                       ("cut.jpg", jpeg(200, 200)[:300])):
        response = await api.http.post("/v1/uploads", headers=auth, files={"file": (name, data, "image/jpeg")})
        assert response.status_code == 422, (name, response.text)
        assert response.json()["error"]["code"] == "BadImage"
    two = await api.http.post("/v1/uploads", headers=auth, files=[("file", ("a.jpg", jpeg(), "image/jpeg")),
                                                                   ("file", ("b.jpg", jpeg(), "image/jpeg"))])
    assert two.status_code in (400, 422)
    missing = await api.http.post("/v1/uploads", headers=auth, files={"other": ("a.jpg", jpeg(), "image/jpeg")})
    assert missing.status_code == 422


async def test_framework_errors_are_json(api: Api):
    _, auth = await api.new_user()
    for method, path, status in (("GET", "/nope", 404), ("DELETE", "/v1/credits", 405),
                                 ("GET", "/v1/generations?limit=0", 422), ("GET", "/v1/generations?status=lost", 422),
                                 ("GET", "/v1/generations?cursor=not-a-cursor", 400),
                                 ("GET", "/v1/works?cursor=%%%", 400)):
        response = await api.http.request(method, path, headers=auth)
        assert response.status_code == status, (path, response.text)
        assert response.headers["content-type"] == "application/json"
        assert set(response.json()["error"]) >= {"code", "message"}
    bad_json = await api.http.post("/v1/generations", headers={**auth, "Content-Type": "application/json"},
                                   content=b"{not json")
    assert bad_json.status_code == 422 and bad_json.json()["error"]["code"] == "InvalidRequest"


async def test_unexpected_errors_are_a_generic_500(api: Api, monkeypatch, caplog):
    _, auth = await api.new_user()
    secret = api.settings.webhook_secret.get_secret_value()

    async def broken(*_args, **_kwargs):
        raise RuntimeError(f"database exploded with {secret}")

    monkeypatch.setattr(library.credits, "account", broken)
    quiet = httpx.AsyncClient(transport=httpx.ASGITransport(api.app, raise_app_exceptions=False),
                              base_url="http://testserver")
    async with quiet:
        response = await quiet.get("/v1/credits", headers=auth)
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "Internal"
    assert "exploded" not in response.text and secret not in response.text and "Traceback" not in response.text
    assert "database exploded" in caplog.text  # logged server-side


async def test_no_answer_carries_a_secret(api: Api):
    user_id, auth = await api.new_user()
    key = auth["Authorization"].split()[1]
    secrets = [key, api.settings.admin_token.get_secret_value(), api.settings.webhook_secret.get_secret_value()]
    answers = [
        await api.http.get("/v1/credits", headers={"Authorization": f"Bearer {key}x"}),
        await api.http.get("/v1/credits", headers={"Authorization": f"Basic {key}"}),
        await api.http.post("/v1/admin/users", headers={"Authorization": f"Bearer {key}"}),
        await api.http.post("/v1/generations", headers=auth, json={"kind": "x", "images": [], "prompt": key}),
        await api.http.post(f"/v1/admin/users/{user_id}/credits", headers=api.admin, json={"amount": -1}),
        await api.http.get("/v1/credits", headers=auth),
        await api.http.get("/openapi.json"),
    ]
    for response in answers:
        text = response.text + " ".join(f"{k}: {v}" for k, v in response.headers.items())
        for secret in secrets:
            assert secret not in text, response.request.url
