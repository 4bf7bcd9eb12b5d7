"""Request and response bodies of the HTTP API: typed, bounded, documented in the OpenAPI schema."""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from atelier.messages import WEBHOOK_EVENTS, Kind, Priority
from atelier.validation import (
    MAX_PARAMETERS,
    MAX_PROMPT_CHARS,
    MAX_STYLE_CHARS,
    MAX_URL_CHARS,
)

MAX_IMAGES = 8  # a bound on the body; the per-kind counts are checked by validate_request
MAX_FILE_ID_CHARS = 64
MAX_REASON_CHARS = 200
MAX_GRANT = 1_000_000_000
MAX_DEADLINE_S = 7 * 24 * 3600.0  # a bound on the body; the server's own maximum applies below it

WebhookEvent = Enum("WebhookEvent", {e.upper(): e for e in WEBHOOK_EVENTS}, type=str)
WebhookEvent.__doc__ = "a webhook event: started, progress or completed"


def _text(value: Any, what: str) -> Any:
    """Text must be storable anywhere (PostgreSQL refuses NUL, UTF-8 refuses lone surrogates)."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"{what} may not contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{what} must be valid Unicode text") from None
    return value


# ---- errors --------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str = Field(description="a stable name for the error, e.g. InvalidRequest, NotFound")
    message: str = Field(description="what went wrong, for people")
    status: str | None = Field(default=None, description="the generation's status, when that is the reason")
    needed: int | None = Field(default=None, description="402: the credits the generation costs")
    balance: int | None = Field(default=None, description="402: the caller's balance")


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ---- generations ---------------------------------------------------------------------------


class ImageIn(BaseModel):
    """One input image: exactly one of `url` (http or https) or `file_id` (from POST /v1/uploads)."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, max_length=MAX_URL_CHARS)
    file_id: str | None = Field(default=None, max_length=MAX_FILE_ID_CHARS)

    @field_validator("url", "file_id")
    @classmethod
    def _clean(cls, v: Any, info) -> Any:
        return _text(v, info.field_name)


class GenerationCreate(BaseModel):
    """A generation to start. `parameters` are free-form strings for the model; they may never
    carry the request's own fields (`images`, `prompt`, `model`)."""

    model_config = ConfigDict(extra="forbid")

    kind: Kind
    images: list[ImageIn] = Field(max_length=MAX_IMAGES,
                                  description="photography: 1-4 photos; fitting: the person, then 1-4 garments")
    prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    style: str = Field(default="", max_length=MAX_STYLE_CHARS)
    parameters: dict[str, str] = Field(default_factory=dict, max_length=MAX_PARAMETERS)
    webhook_url: str | None = Field(default=None, max_length=MAX_URL_CHARS)
    priority: Priority = Field(default=Priority.NORMAL,
                               description="lane for the model's quota: high, normal or low, up to your account's highest")
    webhook_events: list[WebhookEvent] = Field(
        default_factory=lambda: [WebhookEvent.COMPLETED], min_length=1, max_length=len(WEBHOOK_EVENTS),
        description="which events are delivered to `webhook_url`, each as its own signed message: `started`, "
                    "`progress` (every visible change), `completed` (the final object, whatever the outcome)")
    deadline_s: float | None = Field(
        default=None, ge=1, le=MAX_DEADLINE_S,
        description="seconds this generation may take in all; past it, it fails (ExpiredBeforeStart before the AI "
                    "call started, DeadlineExceeded after) and every credit is refunded. Bounded by the server's "
                    "ATELIER_GENERATION_DEADLINE_S")

    @field_validator("prompt", "style", "webhook_url")
    @classmethod
    def _clean(cls, v: Any, info) -> Any:
        return _text(v, info.field_name)

    @field_validator("parameters")
    @classmethod
    def _clean_parameters(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            _text(key, "parameter names")
            _text(value, "parameter values")
        return v


class GenerationUrls(BaseModel):
    get: str
    cancel: str


class GenerationAccepted(BaseModel):
    id: str
    status: str
    urls: GenerationUrls


class ImageOut(BaseModel):
    url: str = Field(description="a signed link that loads without an API key until it expires "
                                 "(ATELIER_URL_TTL_S); add `&w=256`, `512` or `1024` for a thumbnail")
    width: int
    height: int
    content_type: str


class GenerationResultOut(BaseModel):
    work_id: str | None = None
    images: list[ImageOut] = Field(default_factory=list)


class GenerationCredits(BaseModel):
    charged: int
    refunded: int


class GenerationError(BaseModel):
    code: str | None = Field(default=None, description="a stable name, e.g. ProviderUnavailable, DeadlineExceeded")
    message: str | None = Field(default=None, description="what went wrong, for people")
    stage: str | None = Field(default=None, description="the stage it failed in (null when unknown)")
    retryable: bool | None = Field(default=None, description="whether submitting the same request again could "
                                                             "succeed (null when unknown)")
    refunded: bool = Field(default=False, description="every credit charged for it is back (true too when "
                                                      "none was charged)")


class AttemptOut(BaseModel):
    """One AI call attempt."""

    model: str
    provider: str
    started_at: str | None = None
    ended_at: str | None = None
    outcome: str = Field(description="running, succeeded, failed, busy (the provider said 429), timed_out or canceled")
    error_code: str | None = None


class GenerationOut(BaseModel):
    id: str
    kind: str
    status: str = Field(description="queued, running, completed, failed, canceled or rejected")
    stage: str
    progress: int = Field(description="percent, 0-100")
    model: str | None = None
    attempt: int = 0
    queue_position: int | None = Field(default=None, description="while the stage is waiting_for_model: the place "
                                                                 "in the model's line, 1 = next (null otherwise)")
    eta_s: float | None = Field(default=None, description="while waiting for the model: about how many seconds "
                                                          "until a slot (null when unknown)")
    attempts: list[AttemptOut] = Field(default_factory=list, description="every AI call attempt, oldest first")
    error: GenerationError | None = None
    created_at: str | None = None
    completed_at: str | None = None
    credits: GenerationCredits
    result: GenerationResultOut | None = None


class GenerationSummary(BaseModel):
    id: str
    kind: str
    status: str
    created_at: str | None = None
    completed_at: str | None = None
    urls: GenerationUrls


class GenerationList(BaseModel):
    items: list[GenerationSummary]
    next_cursor: str | None = Field(default=None, description="pass as `cursor` for the next page")


# ---- admin ---------------------------------------------------------------------------------


class UserCreated(BaseModel):
    user_id: str
    api_key: str = Field(description="shown once: only its hash is stored")
    max_priority: Priority = Priority.NORMAL


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_priority: Priority = Field(default=Priority.NORMAL,
                                   description="the highest priority lane the user's generations may ask for")


class UserUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_priority: Priority


class UserOut(BaseModel):
    user_id: str
    max_priority: Priority


class CreditGrant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: int = Field(gt=0, le=MAX_GRANT)
    reason: str = Field(default="", max_length=MAX_REASON_CHARS)

    @field_validator("reason")
    @classmethod
    def _clean(cls, v: str) -> str:
        return _text(v, "reason")


class ErasedUser(BaseModel):
    user_id: str
    works: int = Field(description="works deleted")
    uploads: int = Field(description="uploads deleted")
    inputs: int = Field(description="generation inputs released")
    blobs_deleted: int = Field(description="images deleted from the blob store (shared ones stay for their other holders)")
    generations_canceled: int = Field(description="running generations canceled (their credits are refunded)")
    histories_deleted: int = Field(description="generation histories deleted from Temporal")
    still_running: int = Field(description="generations still closing: their histories stay until the next erase")
    histories_left: int = Field(description="histories Temporal kept failing to delete this time (a passing server "
                                            "error, retried): they stay until the next erase")


class Balance(BaseModel):
    user_id: str
    balance: int


# ---- files, works, credits -----------------------------------------------------------------


class Upload(BaseModel):
    file_id: str
    content_type: str
    width: int
    height: int
    size: int


class WorkOut(BaseModel):
    id: str
    generation_id: str
    kind: str
    model: str
    prompt: str
    created_at: str
    images: list[ImageOut]


class WorkList(BaseModel):
    items: list[WorkOut]
    next_cursor: str | None = None


class LedgerEntryOut(BaseModel):
    id: int
    generation_id: str = Field(description="the generation (or grant) this movement belongs to")
    entry: str = Field(description="charge, refund or grant")
    amount: int = Field(description="signed: a charge is negative")
    reason: str
    created_at: str


class Account(BaseModel):
    balance: int
    entries: list[LedgerEntryOut]


# ---- health --------------------------------------------------------------------------------


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    checks: dict[str, str]
