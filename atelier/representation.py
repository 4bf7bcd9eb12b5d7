"""The generation object as clients see it: one shape for the API and for webhooks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from atelier.messages import GenerationResult, Stage, StoredImage


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


def view_of_result(r: GenerationResult, *, task_id: str = "", kind: str = "", created_at: str | None = None,
                   completed_at: str | None = None) -> GenerationView:
    """A closed generation as clients see it, from the workflow's own result."""
    return GenerationView(
        id=r.task_id or task_id, kind=r.kind or kind, status=r.status, stage=Stage.DONE.value, progress=100,
        model=r.model, error={"code": r.error_code, "message": r.error or ""} if r.error_code else None,
        created_at=created_at, completed_at=completed_at, charged=r.credits_charged, refunded=r.credits_refunded,
        work_id=r.work_id, images=[i if isinstance(i, StoredImage) else StoredImage(**i) for i in r.images or []],
    )


def file_url(base_url: str, key: str) -> str:
    return f"{base_url.rstrip('/')}/v1/files/{key}"


def generation_object(view: GenerationView, *, base_url: str = "") -> dict[str, Any]:
    result = None
    if view.work_id or view.images:
        result = {
            "work_id": view.work_id,
            "images": [
                {"url": file_url(base_url, i.key), "width": i.width, "height": i.height,
                 "content_type": i.content_type}
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
        "error": view.error,
        "created_at": view.created_at,
        "completed_at": view.completed_at,
        "credits": {"charged": view.charged, "refunded": view.refunded},
        "result": result,
    }
