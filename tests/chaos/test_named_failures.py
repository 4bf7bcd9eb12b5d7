"""Every failure the chaos run can cause ends with a reason a user can act on, not "Internal".

The long chaos run (400 generations, seed 7) ended one generation "failed: Internal": a provider
that never answers is cut by the activity's timeout, and when the last model's last attempt ends
that way the workflow names it by its Python type, not by what happened.
"""

from __future__ import annotations

import pytest
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError

from atelier.messages import ImageInput
from tests.fakes import images as fake_images
from tests.fakes.gemini_server import FakeGemini, Reply


@pytest.mark.timeout(120)
async def test_a_provider_that_never_answers_fails_as_unavailable_not_internal(harness_factory):
    async with FakeGemini(api_key="test-key") as fake:
        fake.default = Reply.hang()
        h = await harness_factory(ai_provider="gemini", gemini_api_key="test-key", gemini_base_url=fake.url)
        h.timeouts.ai_start_to_close_s, h.timeouts.ai_heartbeat_s, h.timeouts.ai_max_attempts = 3, 2, 1
        user = await h.user(100)
        photo = [ImageInput(file_id=await h.upload(user, fake_images.jpeg(160, 120)))]
        async with h.worker():
            handle = await h.start(user, "photography", photo)
            with pytest.raises(WorkflowFailureError) as failure:
                await handle.result()
        assert len(fake.requests) == 2  # each model tried once, each cut by its timeout
    cause = failure.value.cause
    assert isinstance(cause, ApplicationError)
    assert cause.type == "ProviderUnavailable", f"failed as {cause.type}: {cause.message}"
    assert await h.ledger(handle.id) == (10, 10)
