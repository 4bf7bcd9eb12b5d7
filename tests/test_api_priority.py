"""Priority lanes through the API: an operator sets a user's highest lane (on creation or
later); a generation asking above it is refused 403; within it, the lane reaches the workflow."""

from __future__ import annotations

from temporalio.api.enums.v1 import EventType

from tests.api_fixtures import Api, api, api_factory  # noqa: F401
from tests.fakes.images import jpeg


async def _submit(api: Api, auth, **extra):
    photo = await api.upload(auth, jpeg(64, 48))
    return await api.http.post("/v1/generations", headers=auth,
                               json={"kind": "photography", "images": [{"file_id": photo}], **extra})


async def _priority_of(api: Api, task_id: str) -> str:
    history = await api.harness.client.get_workflow_handle(task_id).fetch_history()
    started = next(e for e in history.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED)
    [payload] = started.workflow_execution_started_event_attributes.input.payloads
    [request] = await api.harness.client.data_converter.decode([payload])
    return request["priority"]


async def test_a_lane_above_the_users_highest_is_403_and_an_operator_can_raise_it(api: Api):
    user_id, auth = await api.new_user()
    refused = await _submit(api, auth, priority="high")
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert error["code"] == "PriorityNotAllowed" and "'high'" in error["message"] and "'normal'" in error["message"]

    low = await _submit(api, auth, priority="low")
    default = await _submit(api, auth)
    assert low.status_code == default.status_code == 202
    assert await _priority_of(api, low.json()["id"]) == "low"
    assert await _priority_of(api, default.json()["id"]) == "normal"

    raised = await api.http.patch(f"/v1/admin/users/{user_id}", headers=api.admin, json={"max_priority": "high"})
    assert raised.status_code == 200 and raised.json() == {"user_id": user_id, "max_priority": "high"}
    high = await _submit(api, auth, priority="high")
    assert high.status_code == 202, high.text
    assert await _priority_of(api, high.json()["id"]) == "high"

    lowered = await api.http.patch(f"/v1/admin/users/{user_id}", headers=api.admin, json={"max_priority": "low"})
    assert lowered.status_code == 200
    assert (await _submit(api, auth)).status_code == 403  # normal is now above this user's lane


async def test_the_lane_is_set_on_creation_and_checked(api: Api):
    created = await api.http.post("/v1/admin/users", headers=api.admin, json={"max_priority": "high"})
    assert created.status_code == 201 and created.json()["max_priority"] == "high"
    plain = await api.http.post("/v1/admin/users", headers=api.admin)
    assert plain.status_code == 201 and plain.json()["max_priority"] == "normal"
    bad = await api.http.post("/v1/admin/users", headers=api.admin, json={"max_priority": "urgent"})
    assert bad.status_code == 422
    user_id = created.json()["user_id"]
    for body in ({"max_priority": "top"}, {}, {"max_priority": "high", "extra": 1}):
        answer = await api.http.patch(f"/v1/admin/users/{user_id}", headers=api.admin, json=body)
        assert answer.status_code == 422, body
    missing = await api.http.patch("/v1/admin/users/usr_nobody", headers=api.admin, json={"max_priority": "low"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "NotFound"
    _, auth = await api.new_user()
    not_admin = await api.http.patch(f"/v1/admin/users/{user_id}", headers=auth, json={"max_priority": "low"})
    assert not_admin.status_code in (401, 403)
    bad_lane = await _submit(api, auth, priority="urgent")
    assert bad_lane.status_code == 422
