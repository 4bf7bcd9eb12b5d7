"""What every route needs, built once per process: settings, the Temporal client, the
database engine, the blob store and the metrics. Routes reach it through `context()`."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from atelier.blobstore import BlobStore
from atelier.settings import Settings
from starter.api.errors import ApiError
from starter.api.keycache import KeyCache
from starter.api.metrics import Metrics


@dataclass
class ApiContext:
    settings: Settings
    client: Client
    engine: AsyncEngine
    blobs: BlobStore
    metrics: Metrics
    cursor_key: bytes
    keys: KeyCache = field(default_factory=KeyCache)

    def base_url(self, request: Request) -> str:
        """Where clients reach this API: the configured public URL, or the one they used."""
        return (self.settings.public_base_url or str(request.base_url)).rstrip("/")


def context(request: Request) -> ApiContext:
    ctx = getattr(request.app.state, "atelier", None)
    if ctx is None:
        raise ApiError(503, "Unavailable", "the API is starting; retry shortly", headers={"Retry-After": "1"})
    return ctx
