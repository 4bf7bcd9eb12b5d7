"""AI provider clients behind one interface (see base.py). Plain async code: no Temporal here."""

from __future__ import annotations

import httpx

from atelier.blobstore import BlobStore
from atelier.providers.base import (
    PROVIDER_NAMES,
    GeneratedImage,
    GenerationInput,
    Provider,
    build_prompt,
)
from atelier.providers.gemini import GeminiProvider
from atelier.providers.local import LocalProvider
from atelier.settings import Settings

__all__ = [
    "PROVIDER_NAMES",
    "GeminiProvider",
    "GeneratedImage",
    "GenerationInput",
    "LocalProvider",
    "Provider",
    "build_providers",
    "build_prompt",
]


def build_providers(settings: Settings, client: httpx.AsyncClient, blobs: BlobStore) -> dict[str, Provider]:
    """Every provider this worker can call, by name: always "local"; "gemini" when a key is set."""
    providers: dict[str, Provider] = {"local": LocalProvider(blobs, delay_s=settings.local_ai_delay_s)}
    if settings.gemini_api_key is not None and settings.gemini_api_key.get_secret_value():
        providers["gemini"] = GeminiProvider(
            client,
            blobs,
            api_key=settings.gemini_api_key.get_secret_value(),
            base_url=settings.gemini_base_url,
            timeout_s=settings.gemini_timeout_s,
        )
    return providers
