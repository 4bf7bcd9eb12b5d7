"""Idempotency-Key: one key, one generation, one charge, whatever the concurrency."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone

from sqlalchemy import update

from atelier import credits

from atelier.db import idempotency_keys
from starter.api import idempotency
from starter.api.schemas import GenerationCreate
from tests.api_fixtures import Api, api, ledger_entries, settled_workflows_of, started  # noqa: F401
from tests.fakes.images import jpeg


async def _photo_request(api: Api, auth) -> dict:
    file_id = await api.upload(auth, jpeg(160, 120))
    return {"kind": "photography", "images": [{"file_id": file_id}], "prompt": "soft window light"}


async def test_twenty_concurrent_identical_posts_make_one_workflow_and_one_charge(api: Api):
    user_id, auth = await api.new_user(credits_=100)
    body = await _photo_request(api, auth)
    headers = {**auth, "Idempotency-Key": "order-42"}

    responses = await asyncio.gather(*[api.http.post("/v1/generations", headers=headers, json=body)
                                       for _ in range(20)])

    assert [r.status_code for r in responses] == [202] * 20, [r.text for r in responses if r.status_code != 202]
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1
    task_id = ids.pop()
    replayed = [r for r in responses if r.headers.get("idempotent-replayed") == "true"]
    assert len(replayed) == 19
    assert started(api) == 1

    workflows = await settled_workflows_of(api.harness.client, user_id, expect_at_least=1)
    assert [w.id for w in workflows] == [task_id]

    async with api.harness.worker():
        done = await api.poll(auth, task_id, timeout=60)
    assert done["status"] == "completed"
    charges = [e for e in await ledger_entries(api, auth) if e["entry"] == "charge"]
    assert len(charges) == 1 and charges[0]["generation_id"] == task_id and charges[0]["amount"] == -10

    # A later replay answers with the finished generation itself (200), and starts nothing.
    later = await api.http.post("/v1/generations", headers=headers, json=body)
    assert later.status_code == 200 and later.json()["id"] == task_id
    assert later.json()["status"] == "completed" and later.headers["idempotent-replayed"] == "true"
    assert later.json()["result"]["work_id"] == done["result"]["work_id"]
    assert started(api) == 1


async def test_same_key_different_body_is_409_and_starts_nothing(api: Api):
    user_id, auth = await api.new_user()
    body = await _photo_request(api, auth)
    headers = {**auth, "Idempotency-Key": "k-1"}
    first = await api.http.post("/v1/generations", headers=headers, json=body)
    assert first.status_code == 202

    other = await api.http.post("/v1/generations", headers=headers, json={**body, "prompt": "something else"})

    assert other.status_code == 409
    assert other.json()["error"]["code"] == "IdempotencyKeyReused"
    assert started(api) == 1
    # The same body with whitespace and key order changed is the same request.
    reordered = await api.http.post("/v1/generations", headers={**headers, "Content-Type": "application/json"},
                                    content=f'{{ "prompt": "soft window light", "images": [{{"file_id": "{body["images"][0]["file_id"]}"}}], "kind": "photography" }}')
    assert reordered.status_code == 202 and reordered.json()["id"] == first.json()["id"]


async def test_keys_are_per_user(api: Api):
    _, auth_a = await api.new_user()
    _, auth_b = await api.new_user()
    a = await api.http.post("/v1/generations", headers={**auth_a, "Idempotency-Key": "same"},
                            json=await _photo_request(api, auth_a))
    b = await api.http.post("/v1/generations", headers={**auth_b, "Idempotency-Key": "same"},
                            json=await _photo_request(api, auth_b))
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] != b.json()["id"]
    assert "idempotent-replayed" not in b.headers


async def test_bad_keys_are_400(api: Api):
    _, auth = await api.new_user()
    body = await _photo_request(api, auth)
    too_long = await api.http.post("/v1/generations", headers={**auth, "Idempotency-Key": "k" * 256}, json=body)
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "BadIdempotencyKey"
    longest = await api.http.post("/v1/generations", headers={**auth, "Idempotency-Key": "k" * 255}, json=body)
    assert longest.status_code == 202
    assert started(api) == 1


async def test_an_expired_key_is_used_again(api: Api):
    user_id, auth = await api.new_user()
    body = await _photo_request(api, auth)
    headers = {**auth, "Idempotency-Key": "old"}
    first = await api.http.post("/v1/generations", headers=headers, json=body)
    assert first.status_code == 202
    long_ago = datetime.now(timezone.utc) - timedelta(hours=api.settings.idempotency_ttl_hours + 1)
    async with api.harness.engine.begin() as conn:
        await conn.execute(update(idempotency_keys).where(idempotency_keys.c.user_id == user_id)
                           .values(created_at=long_ago))

    second = await api.http.post("/v1/generations", headers=headers, json={**body, "prompt": "new day"})

    assert second.status_code == 202, second.text
    assert second.json()["id"] != first.json()["id"]
    assert "idempotent-replayed" not in second.headers


async def test_a_key_stored_by_a_request_that_died_before_starting_is_finished_by_the_retry(api: Api):
    """The key row is written first; if that request never started its workflow, the retry does."""
    user_id, auth = await api.new_user()
    body = await _photo_request(api, auth)

    orphan = f"gen_orphan_{uuid.uuid4().hex}"
    record = await idempotency.claim(api.harness.engine, user_id=user_id, key="crashed",
                                     body_hash=idempotency.body_hash(GenerationCreate(**body)),
                                     task_id=orphan, ttl_hours=24)
    assert record.won

    retry = await api.http.post("/v1/generations", headers={**auth, "Idempotency-Key": "crashed"}, json=body)

    assert retry.status_code == 202 and retry.json()["id"] == orphan
    assert retry.headers["idempotent-replayed"] == "true"
    desc = await api.harness.client.get_workflow_handle(orphan).describe()
    assert desc.workflow_type == "GenerationWorkflow"
    assert started(api) == 1


# ---- admin credit grants (issue 10 #11): the same semantics as generations


def _grant_path(user_id: str) -> str:
    return f"/v1/admin/users/{user_id}/credits"


async def _grants(api: Api, user_id: str) -> list[int]:
    return sorted(e.amount for e in await credits.entries(api.harness.engine, user_id) if e.entry == "grant")


async def test_a_grant_key_reused_with_another_amount_is_409_and_grants_nothing(api: Api):
    user_id, _ = await api.new_user(credits_=0)
    headers = {**api.admin, "Idempotency-Key": "topup-7"}
    first = await api.http.post(_grant_path(user_id), headers=headers, json={"amount": 5, "reason": "promo"})
    assert first.status_code == 200 and first.json()["balance"] == 5
    assert "idempotent-replayed" not in first.headers

    other = await api.http.post(_grant_path(user_id), headers=headers, json={"amount": 500, "reason": "promo"})
    assert other.status_code == 409, other.text
    assert other.json()["error"]["code"] == "IdempotencyKeyReused"
    same = await api.http.post(_grant_path(user_id), headers=headers, json={"reason": "promo", "amount": 5})
    assert same.status_code == 200 and same.json()["balance"] == 5
    assert same.headers["idempotent-replayed"] == "true"
    assert await _grants(api, user_id) == [5]
    assert await credits.balance(api.harness.engine, user_id) == 5


async def test_concurrent_grants_with_one_key_grant_once(api: Api):
    user_id, _ = await api.new_user(credits_=0)
    headers = {**api.admin, "Idempotency-Key": "topup-burst"}
    answers = await asyncio.gather(*[api.http.post(_grant_path(user_id), headers=headers, json={"amount": 3})
                                     for _ in range(10)])
    assert [a.status_code for a in answers] == [200] * 10
    assert {a.json()["balance"] for a in answers} == {3}
    assert await _grants(api, user_id) == [3]


async def test_grant_keys_expire_like_generation_keys_and_are_per_user(api: Api):
    alice, _ = await api.new_user(credits_=0)
    bob, _ = await api.new_user(credits_=0)
    headers = {**api.admin, "Idempotency-Key": "monthly"}
    assert (await api.http.post(_grant_path(alice), headers=headers, json={"amount": 4})).json()["balance"] == 4
    assert (await api.http.post(_grant_path(bob), headers=headers, json={"amount": 4})).json()["balance"] == 4
    long_ago = datetime.now(timezone.utc) - timedelta(hours=api.settings.idempotency_ttl_hours + 1)
    async with api.harness.engine.begin() as conn:
        await conn.execute(update(idempotency_keys).where(idempotency_keys.c.user_id == alice)
                           .values(created_at=long_ago))
    later = await api.http.post(_grant_path(alice), headers=headers, json={"amount": 6})
    assert later.status_code == 200 and later.json()["balance"] == 10
    assert await _grants(api, alice) == [4, 6] and await _grants(api, bob) == [4]


async def test_a_grant_key_never_collides_with_the_users_own_generation_keys(api: Api):
    user_id, auth = await api.new_user(credits_=0)
    granted = await api.http.post(_grant_path(user_id), headers={**api.admin, "Idempotency-Key": "k1"},
                                  json={"amount": 50})
    assert granted.status_code == 200
    body = await _photo_request(api, auth)
    mine = await api.http.post("/v1/generations", headers={**auth, "Idempotency-Key": "k1"}, json=body)
    assert mine.status_code == 202, mine.text
    assert "idempotent-replayed" not in mine.headers
    unknown = await api.http.post(_grant_path("usr_nobody"), headers={**api.admin, "Idempotency-Key": "k2"},
                                  json={"amount": 5})
    assert unknown.status_code == 404
