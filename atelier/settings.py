"""Every setting of the project, read once at start, typed and validated.

A wrong value stops the process with a message naming the variable. Nothing reads the
environment at import time: call `load_settings()` where a process starts.
The README's settings table lists each field below with its variable and default.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ATELIER_", extra="ignore", populate_by_name=True)

    # --- Temporal
    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    task_queue: str = "atelier-generation"
    # The AI activity's own queue, so long AI calls never starve the short steps.
    ai_task_queue: str = "atelier-ai"

    # --- storage
    database_url: str = "sqlite+aiosqlite:///var/atelier.db"
    database_pool_size: int = Field(default=20, ge=1)
    blob_dir: Path = Path("var/blobs")
    blob_fsync: bool = True

    # --- worker
    max_concurrent_activities: int = Field(default=200, ge=1)
    max_concurrent_ai_calls: int = Field(default=1000, ge=1)
    max_concurrent_workflow_tasks: int = Field(default=200, ge=1)
    max_cached_workflows: int = Field(default=2000, ge=0)
    task_queue_polls: int = Field(default=5, ge=2)
    workflow_sandbox: bool = False

    # --- credits
    cost_photography: int = Field(default=10, ge=0)
    cost_fitting: int = Field(default=15, ge=0)

    # --- downloads and images
    allow_private_urls: bool = False
    allowed_url_ports: Annotated[list[int], NoDecode] = Field(default_factory=list)
    max_download_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    max_redirects: int = Field(default=5, ge=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=15.0, gt=0)
    download_total_timeout_s: float = Field(default=45.0, gt=0)
    max_image_pixels: int = Field(default=50_000_000, ge=1)
    max_image_side: int = Field(default=2048, ge=64)

    # --- AI providers
    ai_provider: str | None = None  # gemini | local; default: gemini when GEMINI_API_KEY is set
    local_ai_delay_s: float = Field(default=2.0, ge=0)
    model_catalogue: Path | None = None
    model_failure_threshold: int = Field(default=3, ge=1)
    model_failure_window_s: float = Field(default=300.0, gt=0)
    gemini_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("GEMINI_API_KEY", "ATELIER_GEMINI_API_KEY")
    )
    gemini_base_url: str = Field(
        default="https://generativelanguage.googleapis.com",
        validation_alias=AliasChoices("GEMINI_BASE_URL", "ATELIER_GEMINI_BASE_URL"),
    )
    gemini_timeout_s: float = Field(default=180.0, gt=0)
    admission_aging_s: float = Field(default=120.0, ge=0)
    admission_check_s: float = Field(default=30.0, gt=0)

    # --- activity timeouts (seconds)
    short_timeout_s: float = Field(default=10.0, gt=0)
    download_timeout_s: float = Field(default=60.0, gt=0)
    download_heartbeat_s: float = Field(default=20.0, gt=0)
    ai_timeout_s: float = Field(default=300.0, gt=0)
    ai_heartbeat_s: float = Field(default=55.0, gt=0)
    ai_schedule_to_start_s: float = Field(default=600.0, gt=0)
    ai_max_attempts: int = Field(default=3, ge=1)
    generation_deadline_s: float = Field(default=3600.0, gt=0)
    webhook_retry_hours: float = Field(default=6.0, gt=0)

    # --- API
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    public_base_url: str = ""
    admin_token: SecretStr | None = None
    webhook_secret: SecretStr | None = None
    idempotency_ttl_hours: float = Field(default=24.0, ge=24.0)
    url_signing_secret: SecretStr | None = None
    url_ttl_s: int = Field(default=3600, ge=60, le=7 * 24 * 3600)
    events_poll_s: float = Field(default=1.0, ge=0.1, le=10.0)
    events_keepalive_s: float = Field(default=15.0, ge=1.0, le=60.0)
    read_watch_max: int = Field(default=2_000, ge=0, le=100_000)

    # --- retention
    input_retention_hours: float = Field(default=24.0, gt=0)
    retention_interval_s: float = Field(default=900.0, ge=10)

    # --- web studio
    temporal_ui_url: str = "http://127.0.0.1:8233"

    @field_validator("ai_provider")
    @classmethod
    def _known_provider(cls, v: str | None) -> str | None:
        if v in (None, ""):
            return None
        if v not in ("gemini", "local"):
            raise ValueError("must be 'gemini' or 'local'")
        return v

    @field_validator("allowed_url_ports", mode="before")
    @classmethod
    def _ports_from_a_list(cls, v: object) -> object:
        if isinstance(v, str):  # "8080,8443" (or spaces) from the environment
            return [part for part in v.replace(",", " ").split() if part]
        return v

    @field_validator("allowed_url_ports")
    @classmethod
    def _ports_in_range(cls, v: list[int]) -> list[int]:
        for port in v:
            if not 1 <= port <= 65535:
                raise ValueError(f"{port} is not a TCP port (1-65535)")
        return sorted(set(v))

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret_is_base64(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None or not v.get_secret_value():
            return None
        import base64
        import binascii

        raw = v.get_secret_value().removeprefix("whsec_")
        try:
            if len(base64.b64decode(raw + "==", validate=False)) < 16:
                raise ValueError
        except (binascii.Error, ValueError):
            raise ValueError("must be 'whsec_' followed by base64 of at least 16 random bytes") from None
        return v

    @field_validator("url_signing_secret")
    @classmethod
    def _signing_secret_is_long(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None or not v.get_secret_value():
            return None
        if len(v.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters of random text (e.g. `openssl rand -base64 32`)")
        return v

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, v: str) -> str:
        # Accept the plain forms people paste and pick the async driver.
        if v.startswith("sqlite:///"):
            return "sqlite+aiosqlite:///" + v[len("sqlite:///") :]
        if v.startswith("postgresql://") or v.startswith("postgres://"):
            return "postgresql+asyncpg://" + v.split("://", 1)[1]
        return v

    @property
    def provider(self) -> str:
        if self.ai_provider:
            return self.ai_provider
        return "gemini" if self.gemini_api_key else "local"

    def cost_of(self, kind: str) -> int:
        return {"photography": self.cost_photography, "fitting": self.cost_fitting}[kind]


# One line per setting: what it is. Rendered into the README by `python -m atelier.settings_doc`.
DESCRIPTIONS = {
    "temporal_address": "Temporal frontend host:port",
    "temporal_namespace": "Temporal namespace",
    "task_queue": "task queue of the workflows and the short activities",
    "ai_task_queue": "task queue of `call_ai` alone, so long AI calls never starve the short steps",
    "database_url": "SQLAlchemy URL of the product's database (SQLite file, or `postgresql://...` in production)",
    "database_pool_size": "connections per process (PostgreSQL; as many again may overflow)",
    "blob_dir": "folder of the content-addressed blob store (a shared volume when several hosts run)",
    "blob_fsync": "fsync each blob before it is renamed into place",
    "max_concurrent_activities": "short activities one worker runs at once",
    "max_concurrent_ai_calls": "AI calls one worker runs at once (the provider's quota)",
    "max_concurrent_workflow_tasks": "workflow tasks one worker runs at once",
    "max_cached_workflows": "workflows kept in a worker's cache (0 replays every task: tests only)",
    "task_queue_polls": "long polls a worker keeps open on each of its task queues, for workflow tasks and for "
                        "activities alike: a fixed number (the SDK's autoscaling pollers give their polls an 11 s "
                        "deadline while tasks flow, and on a saturated server a task handed to a poll whose "
                        "deadline ran out waits out its timeout; docs/benchmarks.md)",
    "workflow_sandbox": "run the generation, webhook and retention workflows in the SDK's sandbox; off by default: "
                        "it costs a third of the worker's CPU in a burst, and the tests run every workflow in it and "
                        "replay every recorded history under both runners, so a non-deterministic call is caught "
                        "before it ships (docs/benchmarks.md)",
    "cost_photography": "credits charged for a photography generation",
    "cost_fitting": "credits charged for a fitting generation",
    "allow_private_urls": "let image and webhook URLs reach loopback, private and link-local addresses (tests and local runs only)",
    "allowed_url_ports": "ports other than 80 and 443 that image and webhook URLs may name, comma-separated "
                         "(e.g. `8080,8443`); ATELIER_ALLOW_PRIVATE_URLS lifts the port rule too",
    "max_download_bytes": "largest input image accepted, by URL or upload",
    "max_redirects": "redirects followed when fetching an image",
    "connect_timeout_s": "seconds to connect to an image host",
    "read_timeout_s": "seconds without a byte from an image host",
    "download_total_timeout_s": "seconds one image download may take in all",
    "max_image_pixels": "largest declared canvas decoded (decompression bombs are refused)",
    "max_image_side": "longest side of a stored input image; larger ones are scaled down",
    "ai_provider": "`gemini` or `local`; default: `gemini` when `GEMINI_API_KEY` is set, else `local` (no AI)",
    "local_ai_delay_s": "seconds the `local` provider waits, standing in for the AI's latency",
    "model_catalogue": "JSON file listing models (see models.example.json); default: built in per provider",
    "model_failure_threshold": "failures within the window after which a model is tried last",
    "model_failure_window_s": "the window, in seconds, over which model failures count",
    "gemini_api_key": "Google Gemini API key; never logged",
    "gemini_base_url": "Gemini REST endpoint (a fake on loopback in tests)",
    "gemini_timeout_s": "seconds one Gemini call may take",
    "admission_aging_s": "seconds a generation waits for a model slot before it moves up one priority lane (0: never)",
    "admission_check_s": "how often a model's admission workflow checks that slot holders still run",
    "short_timeout_s": "start-to-close timeout of charge, refund, select_model and save_work",
    "download_timeout_s": "start-to-close timeout of download_and_convert",
    "download_heartbeat_s": "heartbeat timeout of download_and_convert",
    "ai_timeout_s": "start-to-close timeout of one AI call",
    "ai_heartbeat_s": "heartbeat timeout of the AI call: a dead worker is noticed within this (heartbeats go out every 0.8 of it)",
    "ai_schedule_to_start_s": "how long an AI call may wait for a worker before that is a failure",
    "ai_max_attempts": "attempts per model before falling back to the next one",
    "generation_deadline_s": "a generation still unfinished after this fails and is refunded (a timer in the workflow)",
    "webhook_retry_hours": "how long a failing webhook keeps being retried",
    "api_host": "address the API listens on",
    "api_port": "port the API listens on",
    "public_base_url": "base URL of links in answers and webhooks; default: the URL the client used",
    "admin_token": "bearer token of the /v1/admin routes (unset: they answer 403)",
    "webhook_secret": "Standard Webhooks signing secret, `whsec_` + base64 (unset: webhooks fail)",
    "idempotency_ttl_hours": "how long an Idempotency-Key is remembered (at least 24)",
    "url_signing_secret": "HMAC key of the signed image links in answers and webhooks, 32+ characters "
                          "(unset: image links need the API key)",
    "url_ttl_s": "seconds a signed image link stays valid at least; its expiry is rounded up to a twelfth of "
                 "this, so the links made meanwhile are one URL a browser caches",
    "events_poll_s": "how often the progress stream asks the workflow for changes (its `events` query)",
    "events_keepalive_s": "seconds between keep-alive comments on an idle progress stream",
    "read_watch_max": "running generations each API process watches (a long poll on the history, a query only "
                      "after the workflow acts), so that reads and streams of them ask no query each; 0: none",
    "input_retention_hours": "input images (uploads and downloaded inputs) are deleted this long after the "
                             "generation that used them ended (unused uploads: after their upload); images "
                             "nobody holds (outputs that never became a work) this long after they were "
                             "stored, never under an hour",
    "retention_interval_s": "how often the retention schedule runs its clean-up workflow",
    "temporal_ui_url": "base URL of the Temporal Web UI; the web studio links operators to each generation's history there",
}
for _name, _text in DESCRIPTIONS.items():
    Settings.model_fields[_name].description = _text


def _variable_name(loc: tuple) -> str:
    name = str(loc[0]) if loc else "?"
    if name.isupper():
        return name
    return "ATELIER_" + name.upper()


def load_settings(**overrides) -> Settings:
    """Read the settings once. On a bad value, exit with a message naming the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = [f"  {_variable_name(err['loc'])}: {err['msg']}" for err in exc.errors()]
        sys.stderr.write("atelier: invalid settings:\n" + "\n".join(lines) + "\n")
        raise SystemExit(2) from None
