"""Checks of a generation request that need no I/O. Used by the API (to answer 400/422
before anything starts) and by the workflow (so a request that skipped the API is
rejected before any charge). Pure and deterministic: safe inside the workflow sandbox."""

from __future__ import annotations

from atelier.errors import InvalidRequest
from atelier.messages import RESERVED_PARAMETER_KEYS, GenerationRequest, Kind

MAX_PROMPT_CHARS = 4000
MAX_STYLE_CHARS = 200
MAX_PARAMETERS = 20
MAX_PARAMETER_KEY_CHARS = 64
MAX_PARAMETER_VALUE_CHARS = 500
MAX_URL_CHARS = 2048

# kind -> (min images, max images); fitting: one person then 1 to 4 garments.
IMAGE_COUNTS = {Kind.PHOTOGRAPHY.value: (1, 4), Kind.FITTING.value: (2, 5)}


def validate_request(req: GenerationRequest) -> None:
    if req.kind not in IMAGE_COUNTS:
        raise InvalidRequest(f"unknown kind {req.kind!r}: expected one of {sorted(IMAGE_COUNTS)}")
    low, high = IMAGE_COUNTS[req.kind]
    n = len(req.images)
    if not low <= n <= high:
        if req.kind == Kind.FITTING.value:
            raise InvalidRequest(
                f"fitting needs one person image followed by 1 to 4 garment images ({n} image(s) given)"
            )
        raise InvalidRequest(f"photography needs 1 to 4 photos ({n} given)")
    for i, image in enumerate(req.images):
        has_url, has_file = bool(image.url), bool(image.file_id)
        if has_url == has_file:
            raise InvalidRequest(f"images[{i}] must have exactly one of 'url' or 'file_id'")
        if has_url:
            if len(image.url) > MAX_URL_CHARS:
                raise InvalidRequest(f"images[{i}].url is longer than {MAX_URL_CHARS} characters")
            scheme = image.url.split(":", 1)[0].lower() if ":" in image.url else ""
            if scheme not in ("http", "https"):
                raise InvalidRequest(f"images[{i}].url must be an http or https URL")
    reserved = sorted(RESERVED_PARAMETER_KEYS.intersection(k.lower() for k in req.parameters))
    if reserved:
        raise InvalidRequest(
            f"parameters may not carry reserved key(s) {reserved}: use the request's own fields"
        )
    if len(req.parameters) > MAX_PARAMETERS:
        raise InvalidRequest(f"at most {MAX_PARAMETERS} parameters")
    for key, value in req.parameters.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidRequest("parameters must map strings to strings")
        if not key or len(key) > MAX_PARAMETER_KEY_CHARS or len(value) > MAX_PARAMETER_VALUE_CHARS:
            raise InvalidRequest(
                f"parameter keys must be 1-{MAX_PARAMETER_KEY_CHARS} characters and values at most "
                f"{MAX_PARAMETER_VALUE_CHARS}"
            )
    if len(req.prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"prompt is longer than {MAX_PROMPT_CHARS} characters")
    if len(req.style) > MAX_STYLE_CHARS:
        raise InvalidRequest(f"style is longer than {MAX_STYLE_CHARS} characters")
    if req.webhook_url is not None:
        scheme = req.webhook_url.split(":", 1)[0].lower() if ":" in req.webhook_url else ""
        if scheme not in ("http", "https") or len(req.webhook_url) > MAX_URL_CHARS:
            raise InvalidRequest("webhook_url must be an http or https URL")
    if req.cost < 0:
        raise InvalidRequest("cost cannot be negative")
