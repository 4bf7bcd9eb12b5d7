"""call_ai: read the input references, call the provider, heartbeat while waiting,
store the output images and return their references."""

from __future__ import annotations

import asyncio
import logging
import time

from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import activity
from temporalio.client import Client

from activities.errors import to_application_error
from activities.heartbeat import beat_every, heartbeating
from atelier import model_health
from atelier.blobstore import BlobStore
from atelier.errors import AtelierError, BadImage, ContentBlocked, ProviderBusy, ProviderRejected, ProviderUnavailable
from atelier.images import store_image
from atelier.messages import AiOutput, AiRequest, SlotRelease
from atelier.providers.base import GenerationInput, Provider

# Outputs are bounded too: a provider is outside our control.
MAX_OUTPUT_SIDE = 4096
MAX_OUTPUT_PIXELS = 40_000_000
# Giving a slot back never holds the call up for long: the workflow releases it too when this fails.
RELEASE_TIMEOUT_S = 5.0

log = logging.getLogger(__name__)


class AiActivities:
    def __init__(self, engine: AsyncEngine, blobs: BlobStore, providers: dict[str, Provider],
                 client: Client | None = None) -> None:
        self.engine = engine
        self.blobs = blobs
        self.providers = providers
        # Signals a model's admission workflow when the provider has answered (None: never).
        self.client = client

    @activity.defn
    async def call_ai(self, req: AiRequest) -> AiOutput:
        provider = self.providers.get(req.provider)
        if provider is None:
            raise to_application_error(ProviderRejected(f"provider {req.provider!r} is not configured on this worker"))
        if not req.images:
            raise to_application_error(ProviderRejected("no input images reached the AI call"))
        every = beat_every(activity.info().heartbeat_timeout)
        released = False
        started = time.monotonic()
        try:
            try:
                async with heartbeating(every):
                    generated = await provider.generate(
                        GenerationInput(kind=req.kind, model=req.model, prompt=req.prompt, style=req.style,
                                        images=list(req.images), parameters=dict(req.parameters))
                    )
            except AtelierError as err:
                await self._release_slot(req, "busy" if isinstance(err, ProviderBusy) else "failed", started)
                raise
            released = await self._release_slot(req, "ok", started)
            if not generated:
                raise ProviderRejected("the provider answered without an image")
            stored = [await self._store_output(g.data) for g in generated]
        except AtelierError as err:
            # A 429 is the quota speaking, not the model failing: it never marks the model unhealthy.
            if isinstance(err, (ProviderUnavailable, ProviderRejected)) and not isinstance(err, ContentBlocked):
                await model_health.record_failure(self.engine, req.model, err.code)
            raise to_application_error(err) from None
        return AiOutput(images=stored, model=req.model, provider=req.provider, slot_released=released)

    async def _release_slot(self, req: AiRequest, outcome: str, started: float) -> bool:
        """Hand the admission slot back as soon as the provider has answered: the next call in
        line starts while this one still stores its outputs and reports to its workflow. True
        when the release reached the admission workflow; on any failure the workflow releases
        it as before (a release is idempotent by ticket)."""
        if self.client is None or not req.slot_ticket or not req.admission_workflow_id:
            return False
        release = SlotRelease(ticket=req.slot_ticket, outcome=outcome, duration_s=round(time.monotonic() - started, 3))
        try:
            await asyncio.wait_for(
                self.client.get_workflow_handle(req.admission_workflow_id).signal("release_slot", release),
                RELEASE_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - the workflow's own release and the lease stay behind it
            log.warning("release of %s from the AI call not delivered: %s", req.slot_ticket, err)
            return False
        return True

    async def _store_output(self, data: bytes):
        try:
            return await store_image(self.blobs, data, max_side=MAX_OUTPUT_SIDE, max_pixels=MAX_OUTPUT_PIXELS)
        except BadImage as bad:
            # An unreadable output is the provider's failure, not the user's image: retried, and
            # then the next model, like any other provider fault.
            raise ProviderUnavailable(f"the provider returned an image that cannot be read: {bad.message}") from None
