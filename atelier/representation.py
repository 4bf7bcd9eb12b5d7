"""The generation object as clients see it: one shape for the API and for webhooks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from atelier.messages import AttemptRecord, GenerationResult, Stage, StoredImage

# Makes the URL clients get for a stored image (a signed link, or the bearer /v1/files route).
ImageUrl = Callable[[str], str]


@dataclass
class GenerationView:
    id: str
    kind: str
    status: str
    stage: str
    progress: int
    model: str | None = None
    attempt: int = 0
    error: dict[str, str] | None = None
    created_at: str | None = None
    completed_at: str | None = None
    charged: int = 0
    refunded: int = 0
    work_id: str | None = None
    images: list[StoredImage] = field(default_factory=list)
    attempts: list[AttemptRecord] = field(default_factory=list)
    # The stage the generation failed in and whether submitting it again could help (None: unknown).
    error_stage: str | None = None
    retryable: bool | None = None
    # While waiting for a slot of the model's quota: 1 = next; None when not waiting or unknown.
    queue_position: int | None = None
    eta_s: float | None = None
    # A closed generation: the sequence number of the change that ended it (None: not known).
    seq: int | None = None


def attempts_of(items) -> list[AttemptRecord]:
    """Attempt records as the workflow wrote them (dataclasses, or dicts from an untyped payload)."""
    return [a if isinstance(a, AttemptRecord) else AttemptRecord(**a) for a in items or []]


def view_of_result(r: GenerationResult, *, task_id: str = "", kind: str = "", created_at: str | None = None,
                   completed_at: str | None = None) -> GenerationView:
    """A closed generation as clients see it, from the workflow's own result."""
    return GenerationView(
        id=r.task_id or task_id, kind=r.kind or kind, status=r.status, stage=Stage.DONE.value, progress=100,
        model=r.model, error={"code": r.error_code, "message": r.error or ""} if r.error_code else None,
        created_at=created_at, completed_at=completed_at, charged=r.credits_charged, refunded=r.credits_refunded,
        work_id=r.work_id, images=[i if isinstance(i, StoredImage) else StoredImage(**i) for i in r.images or []],
        attempts=attempts_of(r.attempts), error_stage=r.error_stage, retryable=r.retryable, seq=r.seq or None,
    )


def file_url(base_url: str, key: str) -> str:
    return f"{base_url.rstrip('/')}/v1/files/{key}"


def attempt_object(a: AttemptRecord) -> dict[str, Any]:
    return {"model": a.model, "provider": a.provider, "started_at": a.started_at or None, "ended_at": a.ended_at,
            "outcome": a.outcome, "error_code": a.error_code}


def error_object(view: GenerationView) -> dict[str, Any] | None:
    """`{code, message, stage, retryable, refunded}`: what failed, where, whether trying again could
    help, and whether every credit charged for it is back (true too when none was charged)."""
    if not view.error:
        return None
    return {
        "code": view.error.get("code"),
        "message": view.error.get("message"),
        "stage": view.error_stage,
        "retryable": view.retryable,
        "refunded": view.refunded >= view.charged,
    }


def generation_object(view: GenerationView, *, base_url: str = "", image_url: ImageUrl | None = None) -> dict[str, Any]:
    """The generation as clients see it. `image_url` makes each image's link (default: the bearer
    /v1/files route under `base_url`)."""
    link = image_url or (lambda key: file_url(base_url, key))
    result = None
    if view.work_id or view.images:
        result = {
            "work_id": view.work_id,
            "images": [
                {"url": link(i.key), "width": i.width, "height": i.height, "content_type": i.content_type}
                for i in view.images
            ],
        }
    return {
        "id": view.id,
        "kind": view.kind,
        "status": view.status,
        "stage": view.stage,
        "progress": view.progress,
        "model": view.model,
        "attempt": view.attempt,
        "queue_position": view.queue_position,
        "eta_s": view.eta_s,
        "attempts": [attempt_object(a) for a in view.attempts],
        "error": error_object(view),
        "created_at": view.created_at,
        "completed_at": view.completed_at,
        "credits": {"charged": view.charged, "refunded": view.refunded},
        "result": result,
    }
