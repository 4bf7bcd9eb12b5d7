"""The web studio and the two small routes it reads: what a generation accepts and costs
(`GET /v1/limits`, public: the same numbers the server enforces) and, for operators, where the
Temporal UI is (`GET /v1/admin/temporal-ui`).

The studio itself is static (starter/web/: HTML, CSS and JavaScript modules, no build step):
`/` serves its page and `/studio/*` its files. It runs offline: everything it loads comes from
this origin, which its Content-Security-Policy enforces.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.types import Scope

from atelier.images import ACCEPTED
from atelier.messages import Kind
from atelier.settings import Settings
from atelier.validation import current_limits, image_counts
from starter.api.auth import require_admin
from starter.api.context import ApiContext, context
from starter.api.schemas import ErrorResponse

WEB_DIR = Path(__file__).resolve().parent.parent / "web"

router = APIRouter(tags=["studio"])


class CountRange(BaseModel):
    min: int
    max: int


class KindTerms(BaseModel):
    cost: int = Field(description="credits charged when it starts; all of them come back if it does not complete")
    images: CountRange = Field(description="how many input images a request of this kind takes")
    garments: CountRange | None = Field(default=None, description="fitting: garment images after the person")


class UploadTerms(BaseModel):
    max_bytes: int = Field(description="largest image accepted, by upload or URL")
    content_types: list[str]
    max_pixels: int = Field(description="largest canvas (width x height) decoded")


class Limits(BaseModel):
    kinds: dict[str, KindTerms]
    upload: UploadTerms
    max_prompt_chars: int
    max_style_chars: int


class TemporalUi(BaseModel):
    url: str = Field(description="base URL of the Temporal Web UI")
    namespace: str
    workflow_url: str = Field(description="a generation's history: replace {id} with the generation id")


@router.get("/v1/limits", response_model=Limits, summary="What a generation accepts and costs (no key needed)")
async def limits(ctx: ApiContext = Depends(context)) -> dict:
    settings = ctx.settings
    checked = current_limits()  # what a request submitted now is checked against
    counts = image_counts(checked)
    kinds = {}
    for kind in Kind:
        low, high = counts[kind.value]
        terms = {"cost": settings.cost_of(kind.value), "images": {"min": low, "max": high}}
        if kind is Kind.FITTING:
            terms["garments"] = {"min": low - 1, "max": high - 1}
        kinds[kind.value] = terms
    return {
        "kinds": kinds,
        "upload": {"max_bytes": settings.max_download_bytes, "content_types": sorted(ACCEPTED),
                   "max_pixels": settings.max_image_pixels},
        "max_prompt_chars": checked.max_prompt_chars,
        "max_style_chars": checked.max_style_chars,
    }


@router.get("/v1/admin/temporal-ui", response_model=TemporalUi, dependencies=[Depends(require_admin)],
            responses={s: {"model": ErrorResponse} for s in (401, 403)},
            summary="Where operators read a generation's workflow history", tags=["admin"])
async def temporal_ui(ctx: ApiContext = Depends(context)) -> dict:
    base = ctx.settings.temporal_ui_url.rstrip("/")
    namespace = ctx.settings.temporal_namespace
    return {"url": base, "namespace": namespace, "workflow_url": f"{base}/namespaces/{namespace}/workflows/{{id}}"}


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme in ("http", "https") and parts.netloc else ""


def content_security_policy(settings: Settings) -> str:
    """Everything from this origin (plus the public URL, where images are linked); nothing else."""
    extra = _origin(settings.public_base_url)
    own = f"'self' {extra}".strip()
    return "; ".join([
        "default-src 'self'", "script-src 'self'", "style-src 'self'", f"img-src {own} blob: data:",
        f"connect-src {own}", "object-src 'none'", "base-uri 'none'", "form-action 'self'",
        "frame-ancestors 'none'",
    ])


class _StudioFiles(StaticFiles):
    """Static files that a browser revalidates (ETag) instead of keeping a stale copy after an upgrade."""

    def file_response(self, full_path, stat_result, scope: Scope, status_code: int = 200):
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def install_studio(app: FastAPI, settings: Settings) -> None:
    """The studio's page at `/` and its files under `/studio/`. Added after the API's routes."""
    headers = {
        "Content-Security-Policy": content_security_policy(settings),
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }

    @app.get("/", include_in_schema=False)
    async def studio_page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html; charset=utf-8", headers=headers)

    app.mount("/studio", _StudioFiles(directory=WEB_DIR), name="studio")
