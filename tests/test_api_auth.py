"""Authentication, the admin routes, and two users who must never see each other's things."""

from __future__ import annotations

from tests.api_fixtures import Api, api, api_factory, started  # noqa: F401
from tests.fakes.images import jpeg


async def test_missing_malformed_or_unknown_keys_are_401(api: Api):
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Basic dXNlcjpwYXNz"},
                    {"Authorization": "Bearer atl_unknown"}, {"Authorization": "Bearer not-even-a-key"},
                    {"Authorization": "Bearer " + "a" * 5000}):
        response = await api.http.get("/v1/credits", headers=headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "Unauthorized"


async def test_admin_routes_need_the_admin_token(api: Api):
    _, user_auth = await api.new_user()
    for headers in ({}, {"Authorization": "Bearer wrong"}, user_auth):
        response = await api.http.post("/v1/admin/users", headers=headers)
        assert response.status_code == 401, response.text
    created = await api.http.post("/v1/admin/users", headers=api.admin)
    assert created.status_code == 201
    assert created.json()["api_key"].startswith("atl_")
    # A user key for a user made that way works at once.
    me = await api.http.get("/v1/credits", headers={"Authorization": f"Bearer {created.json()['api_key']}"})
    assert me.status_code == 200 and me.json() == {"balance": 0, "entries": []}


async def test_credits_route(api: Api):
    user_id, auth = await api.new_user(credits_=0)
    granted = await api.http.post(f"/v1/admin/users/{user_id}/credits", headers=api.admin,
                                  json={"amount": 30, "reason": "welcome"})
    assert granted.json() == {"user_id": user_id, "balance": 30}
    # With an Idempotency-Key a grant happens once.
    for _ in range(2):
        again = await api.http.post(f"/v1/admin/users/{user_id}/credits", headers={**api.admin, "Idempotency-Key": "g1"},
                                    json={"amount": 5})
        assert again.json()["balance"] == 35
    for bad in ({"amount": 0}, {"amount": -3}, {"amount": "lots"}, {}):
        assert (await api.http.post(f"/v1/admin/users/{user_id}/credits", headers=api.admin, json=bad)).status_code == 422
    unknown = await api.http.post("/v1/admin/users/usr_nobody/credits", headers=api.admin, json={"amount": 5})
    assert unknown.status_code == 404
    account = (await api.http.get("/v1/credits", headers=auth)).json()
    assert account["balance"] == 35 and [e["amount"] for e in account["entries"]] == [5, 30]


async def test_without_an_admin_token_admin_routes_are_disabled(api_factory):
    api = await api_factory(admin_token=None)
    response = await api.http.post("/v1/admin/users", headers={"Authorization": "Bearer anything"})
    assert response.status_code == 403
    assert "ATELIER_ADMIN_TOKEN" in response.json()["error"]["message"]


async def test_two_users_cannot_reach_each_others_things(api: Api):
    alice_id, alice = await api.new_user()
    _, bob = await api.new_user()
    photo = await api.upload(alice, jpeg(120, 90))

    async with api.harness.worker():
        started_ = await api.http.post("/v1/generations", headers=alice,
                                       json={"kind": "photography", "images": [{"file_id": photo}]})
        task_id = started_.json()["id"]
        done = await api.poll(alice, task_id)
    assert done["status"] == "completed"
    work_id = done["result"]["work_id"]
    output = done["result"]["images"][0]["url"]
    output_path = "/v1/files/" + output.split("?", 1)[0].rsplit("/", 1)[1]

    unknown = await api.http.get("/v1/generations/gen_does_not_exist", headers=bob)
    assert unknown.status_code == 404
    for method, path in (("GET", f"/v1/generations/{task_id}"), ("POST", f"/v1/generations/{task_id}/cancel"),
                         ("GET", f"/v1/works/{work_id}"), ("GET", output_path)):
        theirs = await api.http.request(method, path, headers=bob)
        assert theirs.status_code == 404, (path, theirs.text)
        assert theirs.json()["error"]["code"] == "NotFound"
    # Bob's lists are empty; his use of Alice's file is as good as a forged id.
    assert (await api.http.get("/v1/generations", headers=bob)).json()["items"] == []
    assert (await api.http.get("/v1/works", headers=bob)).json()["items"] == []
    stolen = await api.http.post("/v1/generations", headers=bob,
                                 json={"kind": "photography", "images": [{"file_id": photo}]})
    forged = await api.http.post("/v1/generations", headers=bob,
                                 json={"kind": "photography", "images": [{"file_id": "fil_0000000000"}]})
    assert stolen.status_code == forged.status_code == 422
    assert stolen.json()["error"]["code"] == forged.json()["error"]["code"] == "UnknownFile"
    assert started(api) == 1
    # And Alice still reaches all of hers: the 404s above were Bob's, not the routes'.
    assert (await api.http.get(output_path, headers=alice)).status_code == 200
    assert (await api.http.get(f"/v1/works/{work_id}", headers=alice)).status_code == 200
    mine = await api.http.get(f"/v1/generations/{task_id}", headers=alice)
    assert mine.status_code == 200 and mine.json()["id"] == task_id and mine.json()["status"] == "completed"
    # Canceling her own finished generation is refused as closed, not as unknown.
    cancel = await api.http.post(f"/v1/generations/{task_id}/cancel", headers=alice)
    assert cancel.status_code == 409 and cancel.json()["error"]["code"] == "AlreadyClosed", cancel.text
    assert (await api.http.get(f"/v1/generations/{task_id}", headers=alice)).json()["status"] == "completed"


async def test_a_revoked_key_stops_working_once_the_cache_forgets_it(api: Api):
    from datetime import datetime, timezone

    from sqlalchemy import update

    from atelier.db import api_keys
    from starter.api import keycache

    user_id, auth = await api.new_user()
    assert (await api.http.get("/v1/credits", headers=auth)).status_code == 200
    async with api.harness.engine.begin() as conn:
        await conn.execute(update(api_keys).where(api_keys.c.user_id == user_id)
                           .values(revoked_at=datetime.now(timezone.utc)))
    assert (await api.http.get("/v1/credits", headers=auth)).status_code == 200  # still remembered
    keys = api.app.state.atelier.keys
    later = keys.clock() + keycache.KEY_CACHE_TTL_S + 1
    keys.clock = lambda: later
    assert (await api.http.get("/v1/credits", headers=auth)).status_code == 401


def test_the_key_cache_is_bounded():
    from starter.api.keycache import KeyCache

    cache = KeyCache(ttl_s=60, max_entries=2)
    for n in range(3):
        cache.put(f"h{n}", f"u{n}")
    assert cache.get("h0") is None and cache.get("h1") == "u1" and cache.get("h2") == "u2"


async def test_a_key_not_remembered_is_looked_up_once_for_a_burst_of_requests(api: Api, monkeypatch):
    """Thirty requests at once with a key the cache has forgotten: one database lookup, not thirty."""
    import asyncio

    from atelier import users
    from starter.api import auth

    _, auth_headers = await api.new_user()
    api.app.state.atelier.keys._entries.clear()
    lookups = []
    real = users.user_for_key

    async def counted(engine, api_key):
        lookups.append(api_key)
        await asyncio.sleep(0.05)  # the lookup is in flight while the others arrive
        return await real(engine, api_key)

    monkeypatch.setattr(auth.users, "user_for_key", counted)
    answers = await asyncio.wait_for(
        asyncio.gather(*(api.http.get("/v1/credits", headers=auth_headers) for _ in range(30))), 30)
    assert [r.status_code for r in answers] == [200] * 30
    assert len(lookups) == 1
    # Remembered now: the next request looks nothing up.
    assert (await api.http.get("/v1/credits", headers=auth_headers)).status_code == 200
    assert len(lookups) == 1


async def test_a_shared_key_lookup_outlives_the_caller_that_started_it():
    import asyncio

    from starter.api.keycache import KeyCache

    cache = KeyCache(ttl_s=60)
    release = asyncio.Event()
    calls = []

    async def look_up() -> str:
        calls.append(1)
        await release.wait()
        return "usr_a"

    first = asyncio.ensure_future(cache.resolve("h", look_up))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(cache.resolve("h", look_up))
    await asyncio.sleep(0)
    first.cancel()  # the client that asked first went away
    release.set()
    assert await asyncio.wait_for(second, 5) == "usr_a"
    assert first.cancelled() and calls == [1] and cache.get("h") == "usr_a"


async def test_an_unknown_or_failing_key_lookup_is_not_remembered():
    import asyncio

    import pytest

    from starter.api.keycache import KeyCache

    cache = KeyCache(ttl_s=60)
    answers = iter([None, RuntimeError("database down"), "usr_b"])

    async def look_up():
        await asyncio.sleep(0)
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert await cache.resolve("h", look_up) is None
    with pytest.raises(RuntimeError):
        await cache.resolve("h", look_up)
    assert await cache.resolve("h", look_up) == "usr_b"  # each asked again, then remembered
    assert await cache.resolve("h", look_up) == "usr_b"
