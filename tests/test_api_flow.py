"""The whole flow through HTTP, on a real dev server and a real worker."""

from __future__ import annotations

import io

from PIL import Image

from tests.api_fixtures import Api, api  # noqa: F401 - fixture
from tests.fakes.images import jpeg


async def test_whole_flow_create_user_pay_upload_generate_download(api: Api):
    user_id, auth = await api.new_user(credits_=40)
    person = await api.upload(auth, jpeg(320, 240))
    shirt = await api.upload(auth, jpeg(200, 200, quality=70))

    async with api.harness.worker():
        started = await api.http.post("/v1/generations", headers=auth, json={
            "kind": "fitting", "images": [{"file_id": person}, {"file_id": shirt}], "prompt": "studio light",
        })
        assert started.status_code == 202, started.text
        body = started.json()
        task_id = body["id"]
        assert body["status"] == "queued"
        assert body["urls"]["get"].endswith(f"/v1/generations/{task_id}")
        assert body["urls"]["cancel"].endswith(f"/v1/generations/{task_id}/cancel")
        assert started.headers["location"] == body["urls"]["get"]

        done = await api.poll(auth, task_id, timeout=60)

    assert done["status"] == "completed", done
    assert done["kind"] == "fitting"
    assert done["progress"] == 100
    assert done["credits"] == {"charged": 15, "refunded": 0}
    images = done["result"]["images"]
    assert images and done["result"]["work_id"]

    # The output image, fetched through the API and decoded.
    url = images[0]["url"]
    assert "/v1/images/" in url and "sig=" in url  # a signed link
    path = "/v1/files/" + url.split("?", 1)[0].rsplit("/", 1)[1]
    fetched = await api.http.get(path, headers=auth)
    assert fetched.status_code == 200
    assert fetched.headers["content-type"] == images[0]["content_type"]
    assert fetched.headers["cache-control"].startswith("private")
    decoded = Image.open(io.BytesIO(fetched.content))
    decoded.load()
    assert decoded.size == (images[0]["width"], images[0]["height"])
    # Content-addressed: the ETag is the key's hash, and a revalidation is a 304.
    etag = fetched.headers["etag"]
    assert etag.strip('"') in path
    again = await api.http.get(path, headers={**auth, "If-None-Match": etag})
    assert again.status_code == 304 and not again.content

    # The work is listed and readable.
    listed = (await api.http.get("/v1/works", headers=auth)).json()
    assert [w["id"] for w in listed["items"]] == [done["result"]["work_id"]]
    work = (await api.http.get(f"/v1/works/{done['result']['work_id']}", headers=auth)).json()
    assert work["generation_id"] == task_id and work["kind"] == "fitting"

    # The ledger: the grant and the charge, balance 40 - 15.
    account = (await api.http.get("/v1/credits", headers=auth)).json()
    assert account["balance"] == 25
    entries = {(e["entry"], e["amount"], e["generation_id"]) for e in account["entries"]}
    assert ("charge", -15, task_id) in entries
    assert any(e["entry"] == "grant" and e["amount"] == 40 for e in account["entries"])
