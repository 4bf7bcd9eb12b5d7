"""Webhooks: signed per Standard Webhooks, retried by their own workflow, never changing
the generation's outcome."""

from __future__ import annotations

import asyncio

from tests.api_fixtures import Api, api, free_port  # noqa: F401 - api is a fixture
from tests.fakes.images import jpeg
from tests.fakes.webhook_receiver import WebhookReceiver


async def _start(api: Api, auth, webhook_url: str) -> str:
    photo = await api.upload(auth, jpeg(100, 80))
    response = await api.http.post("/v1/generations", headers=auth, json={
        "kind": "photography", "images": [{"file_id": photo}], "webhook_url": webhook_url})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _secret(api: Api) -> str:
    return api.settings.webhook_secret.get_secret_value()


async def test_the_receiver_verifies_the_signature_and_gets_the_final_object(api: Api):
    _, auth = await api.new_user()
    with WebhookReceiver(_secret(api)) as receiver:
        async with api.harness.worker():
            task_id = await _start(api, auth, receiver.url)
            final = await api.poll(auth, task_id)
            deliveries = await asyncio.to_thread(receiver.wait_for_success, timeout=30)

    assert final["status"] == "completed"
    [delivery] = deliveries
    assert delivery.verified and delivery.succeeded
    assert delivery.headers["webhook-id"] and delivery.headers["webhook-signature"].startswith("v1,")
    assert delivery.payload["type"] == "generation.completed"
    data = delivery.payload["data"]
    assert data["id"] == task_id and data["status"] == "completed" and data["kind"] == "photography"
    assert data["result"]["work_id"] == final["result"]["work_id"]
    assert len(data["result"]["images"]) == len(final["result"]["images"])
    assert data["credits"] == {"charged": 10, "refunded": 0}

    # A receiver with another secret would refuse it.
    from standardwebhooks.webhooks import Webhook, WebhookVerificationError

    try:
        Webhook("whsec_" + "b3RoZXItc2VjcmV0LW90aGVyLXNlY3JldA==").verify(delivery.body, delivery.headers)
        raise AssertionError("a wrong secret verified the signature")
    except WebhookVerificationError:
        pass


async def test_a_receiver_failing_three_times_gets_exactly_one_successful_delivery(api: Api):
    _, auth = await api.new_user()
    with WebhookReceiver(_secret(api), fail_first=3) as receiver:
        async with api.harness.worker():
            task_id = await _start(api, auth, receiver.url)
            final = await api.poll(auth, task_id)
            # 1 s, 2 s, 4 s of backoff between the four attempts.
            await asyncio.to_thread(receiver.wait_for_success, timeout=45)
            await asyncio.sleep(2)  # a duplicate would show up now
        deliveries = list(receiver.deliveries)

    assert final["status"] == "completed"
    assert [d.answered for d in deliveries] == [500, 500, 500, 204]
    assert all(d.verified for d in deliveries)
    assert len({d.headers["webhook-id"] for d in deliveries}) == 1  # the same message, retried
    assert [d.payload["data"]["id"] for d in deliveries if d.succeeded] == [task_id]


async def test_a_dead_receiver_leaves_the_generation_completed(api: Api):
    _, auth = await api.new_user()
    dead = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there: connection refused
    async with api.harness.worker():
        task_id = await _start(api, auth, dead)
        final = await api.poll(auth, task_id)
        await asyncio.sleep(2)  # the webhook keeps failing meanwhile
        again = (await api.http.get(f"/v1/generations/{task_id}", headers=auth)).json()
    assert final["status"] == again["status"] == "completed"
    assert again["credits"] == {"charged": 10, "refunded": 0}
    assert again["error"] is None
    webhook = await api.harness.client.get_workflow_handle(f"{task_id}-webhook").describe()
    assert webhook.status.name == "RUNNING"  # still retrying, on its own
