"""What every route needs, built once per process: settings, the Temporal client, the
database engine, the blob store and the metrics. Routes reach it through `context()`."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from atelier.blobstore import BlobStore
from atelier.catalogue import CatalogueError, load_catalogue
from atelier.links import LinkSigner, signer_from
from atelier.representation import ImageUrl, file_url
from atelier.settings import Settings
from starter.api.errors import ApiError
from starter.api.keycache import KeyCache
from starter.api.metrics import Metrics
from starter.service import KnownGenerations
from starter.watch import GenerationWatchers


@dataclass
class ApiContext:
    settings: Settings
    client: Client
    engine: AsyncEngine
    blobs: BlobStore
    metrics: Metrics
    cursor_key: bytes
    keys: KeyCache = field(default_factory=KeyCache)
    # Owner, kind and start of generations seen running: a running one is then read with one query.
    generations: KnownGenerations = field(default_factory=KnownGenerations)
    links: LinkSigner | None = None
    # Running generations being read, kept fresh by a long poll: reads and streams ask no query each.
    watchers: GenerationWatchers | None = None
    _models: list[str] | None = field(default=None, repr=False)

    def model_names(self) -> list[str]:
        """The catalogue's model names (read once): the models /metrics reports on."""
        if self._models is None:
            try:
                self._models = [m.name for m in load_catalogue(self.settings)]
            except CatalogueError:
                self._models = []
        return self._models

    def __post_init__(self) -> None:
        if self.links is None:
            self.links = signer_from(self.settings)
        if self.watchers is None and self.settings.read_watch_max > 0:
            self.watchers = GenerationWatchers(self.client, max_watched=self.settings.read_watch_max)

    async def close(self) -> None:
        if self.watchers is not None:
            await self.watchers.close()

    def image_url(self, request: Request, owner: str) -> ImageUrl:
        """How `owner`'s images are linked in answers: fresh signed links, or the bearer route."""
        base = self.base_url(request)
        if self.links is None:
            return lambda key: file_url(base, key)
        links = self.links
        return lambda key: links.sign(base, key, owner)

    def base_url(self, request: Request) -> str:
        """Where clients reach this API: the configured public URL, or the one they used."""
        return (self.settings.public_base_url or str(request.base_url)).rstrip("/")


async def context(request: Request) -> ApiContext:
    # async: FastAPI runs a plain `def` dependency on its thread pool, a thread hop per request.
    ctx = getattr(request.app.state, "atelier", None)
    if ctx is None:
        raise ApiError(503, "Unavailable", "the API is starting; retry shortly", headers={"Retry-After": "1"})
    return ctx
