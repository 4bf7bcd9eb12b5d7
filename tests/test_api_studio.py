"""The routes the web studio stands on, without a browser: its page and files, the limits it
checks files against, the operators' Temporal UI address, and the 402 it turns into words."""

from __future__ import annotations

import re

from starter.api.web import WEB_DIR
from tests.api_fixtures import Api, api  # noqa: F401 - fixture
from tests.fakes.images import jpeg


async def test_the_page_and_its_files_are_served_with_a_strict_policy(api: Api):
    page = await api.http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert '<script type="module" src="/studio/js/app.js">' in page.text

    script = await api.http.get("/studio/js/app.js")
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    assert script.headers["cache-control"] == "no-cache"
    assert (await api.http.get("/studio/studio.css")).headers["content-type"].startswith("text/css")
    # Nothing outside the studio's folder, and the API's own 404 for the rest.
    assert (await api.http.get("/studio/../api/app.py")).status_code == 404
    missing = await api.http.get("/v1/no-such-route")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "NotFound"
    # The page is not part of the API's schema.
    assert "/" not in (await api.http.get("/openapi.json")).json()["paths"]


def test_the_studio_loads_nothing_from_outside():
    """It must run offline: no absolute URL, CDN or external font in any of its files."""
    files = [p for p in WEB_DIR.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".html", ".css", ".js"}
    for path in files:
        text = path.read_text().replace("http://www.w3.org/2000/svg", "")  # SVG's namespace name, not a load
        assert not re.search(r"https?://|[\"'(]//[a-z0-9.-]+", text, re.I), path
        if path.suffix == ".css":
            assert "@import" not in text and "url(" not in text and "@font-face" not in text, path
        assert "innerHTML" not in text, f"{path}: text from the API must never be parsed as HTML"


async def test_limits_are_the_servers_own(api: Api):
    answer = await api.http.get("/v1/limits")  # no key needed
    assert answer.status_code == 200
    limits = answer.json()
    settings = api.settings
    assert limits["kinds"]["photography"]["cost"] == settings.cost_photography
    assert limits["kinds"]["fitting"]["cost"] == settings.cost_fitting
    assert limits["kinds"]["photography"]["images"] == {"min": 1, "max": 4}
    assert limits["kinds"]["fitting"]["images"] == {"min": 2, "max": 5}
    assert limits["kinds"]["fitting"]["garments"] == {"min": 1, "max": 4}
    assert limits["upload"]["max_bytes"] == settings.max_download_bytes
    assert limits["upload"]["max_pixels"] == settings.max_image_pixels
    assert set(limits["upload"]["content_types"]) == {"image/jpeg", "image/png", "image/webp"}


async def test_temporal_ui_address_is_for_operators_only(api: Api):
    assert (await api.http.get("/v1/admin/temporal-ui")).status_code == 401
    _, user = await api.new_user(credits_=0)
    assert (await api.http.get("/v1/admin/temporal-ui", headers=user)).status_code == 401
    answer = await api.http.get("/v1/admin/temporal-ui", headers=api.admin)
    assert answer.status_code == 200
    body = answer.json()
    assert body["url"] == api.settings.temporal_ui_url.rstrip("/")
    assert body["workflow_url"] == f"{body['url']}/namespaces/{api.settings.temporal_namespace}/workflows/{{id}}"


async def test_402_says_what_is_needed_and_what_there_is(api: Api):
    _, auth = await api.new_user(credits_=4)
    file_id = await api.upload(auth, jpeg(64, 64))
    answer = await api.http.post("/v1/generations", headers=auth,
                                 json={"kind": "photography", "images": [{"file_id": file_id}]})
    assert answer.status_code == 402
    error = answer.json()["error"]
    assert error["code"] == "InsufficientCredits"
    assert (error["needed"], error["balance"]) == (api.settings.cost_photography, 4)
