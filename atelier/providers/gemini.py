"""Gemini image generation over its REST API (generateContent with the IMAGE modality).

The API key travels only in the `x-goog-api-key` header; every text this module puts in an
exception or a log line goes through `_redact` first, so the key can never leak there.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import re
import time
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from PIL import Image

from atelier.blobstore import BlobNotFound, BlobStore, InvalidBlobKey, content_type_of
from atelier.errors import ContentBlocked, ProviderBusy, ProviderRejected, ProviderUnavailable
from atelier.providers.base import GeneratedImage, GenerationInput, build_prompt

log = logging.getLogger(__name__)

# Candidate finish reasons that mean "the model refused this content": another try will not help.
BLOCKED_FINISH_REASONS = frozenset({
    "SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "RECITATION",
    "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION",
})
RETRYABLE_STATUS = frozenset({408, 500, 502, 503, 504})
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_OUTPUT_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
_MAX_ERROR_TEXT = 300
# A Retry-After beyond this is a misconfigured server, not advice worth following.
MAX_RETRY_AFTER_S = 3600.0
# Longer header or delay texts are not parsed at all.
_MAX_DELAY_TEXT = 64
_DELAY_SECONDS = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9})?")


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date."""
    if not value or len(value) > _MAX_DELAY_TEXT:
        return None
    value = value.strip()
    if _DELAY_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def _retry_delay_from_body(body: Any) -> float | None:
    # Gemini's 429 carries google.rpc.RetryInfo {"retryDelay": "27s"} when no header is sent.
    try:
        for detail in body["error"].get("details") or []:
            delay = detail.get("retryDelay") if isinstance(detail, dict) else None
            if isinstance(delay, str) and len(delay) <= _MAX_DELAY_TEXT and _DELAY_SECONDS.fullmatch(delay[:-1]) \
                    and delay.endswith("s"):
                return float(delay[:-1])
    except (KeyError, TypeError, AttributeError, ValueError):
        pass
    return None


class GeminiProvider:
    name = "gemini"

    def __init__(self, client: httpx.AsyncClient, blobs: BlobStore, *, api_key: str, base_url: str,
                 timeout_s: float) -> None:
        if not api_key:
            raise ValueError("GeminiProvider needs an API key")
        self._client = client
        self._blobs = blobs
        self._api_key = api_key
        self._base_url = base_url.rstrip("/")
        self._timeout = httpx.Timeout(timeout_s, connect=min(10.0, timeout_s))

    async def aclose(self) -> None:
        # The HTTP client belongs to the worker that built it; it closes it.
        return None

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "[redacted]")

    async def _image_parts(self, request: GenerationInput) -> list[dict[str, Any]]:
        """The one conversion: stored image references -> the API's inline_data parts."""
        parts: list[dict[str, Any]] = []
        for index, image in enumerate(request.images, start=1):
            try:
                data = await self._blobs.get(image.key)
                mime_type = image.content_type or content_type_of(image.key)
            except (BlobNotFound, InvalidBlobKey):
                raise ProviderRejected(f"input image {index} ({image.key!r}) is not in the blob store") from None
            if not data:
                raise ProviderRejected(f"input image {index} ({image.key!r}) is empty")
            if not mime_type.startswith("image/"):
                raise ProviderRejected(f"input image {index} has a non-image type {mime_type!r}")
            parts.append({"inline_data": {"mime_type": mime_type, "data": base64.b64encode(data).decode("ascii")}})
        if len(parts) != len(request.images):
            # The old system dropped user images here and carried on: never again.
            raise ProviderRejected(f"{len(request.images)} input images given but {len(parts)} converted")
        return parts

    async def build_body(self, request: GenerationInput) -> dict[str, Any]:
        prompt = build_prompt(request.kind, request.prompt, request.style, request.parameters)
        return {
            "contents": [{"role": "user", "parts": [{"text": prompt}, *await self._image_parts(request)]}],
            "generationConfig": {"responseModalities": ["TEXT", "IMAGE"]},
        }

    async def generate(self, request: GenerationInput) -> list[GeneratedImage]:
        model = request.model.removeprefix("models/")
        if not _MODEL_NAME.fullmatch(model):
            raise ProviderRejected(f"invalid Gemini model name {model!r}")
        body = await self.build_body(request)
        url = f"{self._base_url}/v1beta/models/{model}:generateContent"
        started = time.monotonic()
        try:
            response = await self._client.post(
                url, json=body, headers={"x-goog-api-key": self._api_key}, timeout=self._timeout
            )
        except httpx.TimeoutException as exc:
            raise ProviderUnavailable(
                f"gemini {model}: no answer in time ({type(exc).__name__} after {time.monotonic() - started:.1f}s)"
            ) from None
        except httpx.HTTPError as exc:  # connect errors, resets, protocol errors
            raise ProviderUnavailable(
                f"gemini {model}: transport error {type(exc).__name__}: {self._redact(str(exc))[:_MAX_ERROR_TEXT]}"
            ) from None
        log.info("gemini %s answered %s in %.1fs", model, response.status_code, time.monotonic() - started)
        if response.status_code != 200:
            self._raise_for_status(model, response)
        try:
            answer = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            raise ProviderUnavailable(f"gemini {model}: the answer is not valid JSON") from None
        if not isinstance(answer, dict):
            raise ProviderUnavailable(f"gemini {model}: the answer is not a JSON object")
        return await self._images_of(model, answer)

    def _raise_for_status(self, model: str, response: httpx.Response) -> None:
        status = response.status_code
        try:
            body = response.json()
        except ValueError:
            body = None
        message = ""
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            error = body["error"]
            message = str(error.get("message") or error.get("status") or "")
        elif response.text:
            message = response.text
        message = self._redact(" ".join(message.split()))[:_MAX_ERROR_TEXT] or response.reason_phrase
        text = f"gemini {model}: HTTP {status}: {message}"
        exhausted = isinstance(body, dict) and isinstance(body.get("error"), dict) \
            and body["error"].get("status") == "RESOURCE_EXHAUSTED"
        if status == 429 or exhausted or status in RETRYABLE_STATUS or status >= 500:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            if retry_after is None:
                retry_after = _retry_delay_from_body(body)
            if retry_after is not None:
                retry_after = min(retry_after, MAX_RETRY_AFTER_S)
            if status == 429 or exhausted:
                raise ProviderBusy(text, retry_after_s=retry_after)
            raise ProviderUnavailable(text, retry_after_s=retry_after)
        raise ProviderRejected(text)

    async def _images_of(self, model: str, answer: dict[str, Any]) -> list[GeneratedImage]:
        feedback = answer.get("promptFeedback") or {}
        if isinstance(feedback, dict) and feedback.get("blockReason"):
            raise ContentBlocked(f"gemini {model}: the prompt was blocked ({feedback['blockReason']})")
        candidates = answer.get("candidates") or []
        if not isinstance(candidates, list):
            raise ProviderUnavailable(f"gemini {model}: malformed answer (candidates)")
        images: list[GeneratedImage] = []
        blocked: list[str] = []
        for candidate in candidates:
            if not isinstance(candidate, dict):
                continue
            reason = candidate.get("finishReason")
            if reason in BLOCKED_FINISH_REASONS:
                blocked.append(reason)
                continue  # never deliver what the model stopped for safety
            parts = (candidate.get("content") or {}).get("parts") or []
            for part in parts if isinstance(parts, list) else []:
                inline = (part.get("inlineData") or part.get("inline_data")) if isinstance(part, dict) else None
                if isinstance(inline, dict) and inline.get("data"):
                    images.append(await self._decode(model, inline))
        if images:
            return images
        if blocked:
            raise ContentBlocked(f"gemini {model}: generation stopped ({', '.join(blocked)})")
        raise ProviderRejected(f"gemini {model}: no image in the answer")

    async def _decode(self, model: str, inline: dict[str, Any]) -> GeneratedImage:
        try:
            data = base64.b64decode(inline["data"], validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise ProviderUnavailable(f"gemini {model}: garbled image data") from None
        declared = inline.get("mimeType") or inline.get("mime_type") or ""
        try:
            return await asyncio.to_thread(_normalise, data, declared)
        except (OSError, ValueError, Image.DecompressionBombError):
            raise ProviderUnavailable(f"gemini {model}: the returned image does not decode") from None


def _normalise(data: bytes, declared: str) -> GeneratedImage:
    """Trust the bytes, not the label: report the real format; re-encode formats we do not store."""
    with Image.open(io.BytesIO(data)) as image:
        mime_type = _OUTPUT_FORMATS.get(image.format or "")
        if mime_type is not None:
            return GeneratedImage(data=data, mime_type=mime_type)
        log.info("gemini returned %s (declared %s): re-encoding as PNG", image.format, declared)
        out = io.BytesIO()
        image.save(out, format="PNG")
        return GeneratedImage(data=out.getvalue(), mime_type="image/png")
