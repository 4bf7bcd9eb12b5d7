"""call_ai: read the input references, call the provider, heartbeat while waiting,
store the output images and return their references."""

from __future__ import annotations

import asyncio
import contextlib

from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import activity

from activities.errors import to_application_error
from activities.heartbeat import heartbeating  # re-exported: bench/floor.py imports it from here
from atelier import model_health
from atelier.blobstore import BlobStore
from atelier.errors import AtelierError, BadImage, ContentBlocked, ProviderRejected, ProviderUnavailable
from atelier.images import store_image
from atelier.messages import AiOutput, AiRequest
from atelier.providers.base import GenerationInput, Provider

# Outputs are bounded too: a provider is outside our control.
MAX_OUTPUT_SIDE = 4096
MAX_OUTPUT_PIXELS = 40_000_000


class AiActivities:
    def __init__(self, engine: AsyncEngine, blobs: BlobStore, providers: dict[str, Provider]) -> None:
        self.engine = engine
        self.blobs = blobs
        self.providers = providers

    @activity.defn
    async def call_ai(self, req: AiRequest) -> AiOutput:
        provider = self.providers.get(req.provider)
        if provider is None:
            raise to_application_error(ProviderRejected(f"provider {req.provider!r} is not configured on this worker"))
        if not req.images:
            raise to_application_error(ProviderRejected("no input images reached the AI call"))
        timeout = activity.info().heartbeat_timeout
        every = max(0.5, min(10.0, timeout.total_seconds() / 3)) if timeout else 10.0
        try:
            async with heartbeating(every):
                generated = await provider.generate(
                    GenerationInput(kind=req.kind, model=req.model, prompt=req.prompt, style=req.style,
                                    images=list(req.images), parameters=dict(req.parameters))
                )
            if not generated:
                raise ProviderRejected("the provider answered without an image")
            stored = [await self._store_output(g.data) for g in generated]
        except AtelierError as err:
            # A 429 is the quota speaking, not the model failing: it never marks the model unhealthy.
            if isinstance(err, (ProviderUnavailable, ProviderRejected)) and not isinstance(err, ContentBlocked):
                await model_health.record_failure(self.engine, req.model, err.code)
            raise to_application_error(err) from None
        return AiOutput(images=stored, model=req.model, provider=req.provider)

    async def _store_output(self, data: bytes):
        try:
            return await store_image(self.blobs, data, max_side=MAX_OUTPUT_SIDE, max_pixels=MAX_OUTPUT_PIXELS)
        except BadImage as bad:
            # An unreadable output is the provider's failure, not the user's image: retried, and
            # then the next model, like any other provider fault.
            raise ProviderUnavailable(f"the provider returned an image that cannot be read: {bad.message}") from None
