"""Checks of a generation request that need no I/O. Used by the API (to answer 400/422
before anything starts) and by the workflow (so a request that skipped the API is
rejected before any charge). Pure and deterministic: safe inside the workflow sandbox.

The limits are workflow code: whether a generation is rejected or charged depends on them.
So they travel in the request (`GenerationRequest.limits`, filled by the starter from
CURRENT_LIMITS): a running workflow keeps the limits it started with across a deploy that
changes them. A request without limits (an old history) is checked against LEGACY_LIMITS,
which must never change."""

from __future__ import annotations

import dataclasses

from atelier.errors import InvalidRequest
from atelier.messages import (
    RESERVED_PARAMETER_KEYS,
    WEBHOOK_EVENTS,
    GenerationRequest,
    Kind,
    Priority,
    ValidationLimits,
)

# The limits of every generation started before limits travelled in the request. Frozen.
LEGACY_LIMITS = ValidationLimits()

# The limits new generations are checked against. Change these freely: running workflows
# carry their own copy.
CURRENT_LIMITS = ValidationLimits(reserved_keys_normalized=True)

# The API's request schema bounds its fields with these (the same numbers as CURRENT_LIMITS).
MAX_PROMPT_CHARS = CURRENT_LIMITS.max_prompt_chars
MAX_STYLE_CHARS = CURRENT_LIMITS.max_style_chars
MAX_URL_CHARS = CURRENT_LIMITS.max_url_chars
MAX_PARAMETERS = CURRENT_LIMITS.max_parameters


def current_limits() -> ValidationLimits:
    """A copy of CURRENT_LIMITS for one request (a request owns its limits)."""
    return dataclasses.replace(CURRENT_LIMITS)


def image_counts(limits: ValidationLimits) -> dict[str, tuple[int, int]]:
    """kind -> (min images, max images); fitting: one person then garments."""
    return {Kind.PHOTOGRAPHY.value: tuple(limits.photography_images),
            Kind.FITTING.value: tuple(limits.fitting_images)}


def _reserved(keys, limits: ValidationLimits) -> list[str]:
    if limits.reserved_keys_normalized:
        bad = {k for k in keys if isinstance(k, str) and k.strip().lower() in RESERVED_PARAMETER_KEYS}
        return sorted(repr(k) if k.strip() != k else k for k in bad)
    return sorted(RESERVED_PARAMETER_KEYS.intersection(k.lower() for k in keys))


def validate_request(req: GenerationRequest) -> None:
    limits = req.limits or LEGACY_LIMITS
    counts = image_counts(limits)
    if req.kind not in counts:
        raise InvalidRequest(f"unknown kind {req.kind!r}: expected one of {sorted(counts)}")
    low, high = counts[req.kind]
    n = len(req.images)
    if not low <= n <= high:
        if req.kind == Kind.FITTING.value:
            raise InvalidRequest(
                f"fitting needs one person image followed by {low - 1} to {high - 1} garment images ({n} image(s) given)"
            )
        raise InvalidRequest(f"photography needs {low} to {high} photos ({n} given)")
    for i, image in enumerate(req.images):
        has_url, has_file = bool(image.url), bool(image.file_id)
        if has_url == has_file:
            raise InvalidRequest(f"images[{i}] must have exactly one of 'url' or 'file_id'")
        if has_url:
            if len(image.url) > limits.max_url_chars:
                raise InvalidRequest(f"images[{i}].url is longer than {limits.max_url_chars} characters")
            scheme = image.url.split(":", 1)[0].lower() if ":" in image.url else ""
            if scheme not in ("http", "https"):
                raise InvalidRequest(f"images[{i}].url must be an http or https URL")
    reserved = _reserved(req.parameters, limits)
    if reserved:
        raise InvalidRequest(
            f"parameters may not carry reserved key(s) {reserved} (in any case or spacing): use the request's own fields"
        )
    if len(req.parameters) > limits.max_parameters:
        raise InvalidRequest(f"at most {limits.max_parameters} parameters")
    for key, value in req.parameters.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidRequest("parameters must map strings to strings")
        if not key or len(key) > limits.max_parameter_key_chars or len(value) > limits.max_parameter_value_chars:
            raise InvalidRequest(
                f"parameter keys must be 1-{limits.max_parameter_key_chars} characters and values at most "
                f"{limits.max_parameter_value_chars}"
            )
    if len(req.prompt) > limits.max_prompt_chars:
        raise InvalidRequest(f"prompt is longer than {limits.max_prompt_chars} characters")
    if len(req.style) > limits.max_style_chars:
        raise InvalidRequest(f"style is longer than {limits.max_style_chars} characters")
    if req.webhook_url is not None:
        scheme = req.webhook_url.split(":", 1)[0].lower() if ":" in req.webhook_url else ""
        if scheme not in ("http", "https") or len(req.webhook_url) > limits.max_url_chars:
            raise InvalidRequest("webhook_url must be an http or https URL")
    unknown = [e for e in req.webhook_events if e not in WEBHOOK_EVENTS]
    if unknown or len(set(req.webhook_events)) != len(req.webhook_events):
        raise InvalidRequest(f"webhook_events must be distinct values of {list(WEBHOOK_EVENTS)}")
    if req.priority not in {p.value for p in Priority}:
        raise InvalidRequest(f"priority must be one of {[p.value for p in Priority]}")
    if req.cost < 0:
        raise InvalidRequest("cost cannot be negative")
