"""Liveness, readiness and metrics: what a load balancer and Prometheus ask."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text

from starter.api.context import ApiContext, context
from starter.api.schemas import ErrorResponse, Health, Readiness

log = logging.getLogger("atelier.api")
router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 3.0


@router.get("/healthz", response_model=Health, summary="The process is up")
async def healthz() -> dict:
    return {"status": "ok"}


async def _check(name: str, probe) -> str:
    try:
        await asyncio.wait_for(probe(), timeout=CHECK_TIMEOUT_S)
        return "ok"
    except asyncio.TimeoutError:
        log.warning("readiness: %s timed out", name)
        return "timeout"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready; logged, never shown
        log.warning("readiness: %s unreachable (%s)", name, type(exc).__name__)
        return "unreachable"


@router.get("/readyz", response_model=Readiness, responses={503: {"model": ErrorResponse}},
            summary="Temporal and the database are reachable")
async def readyz(ctx: ApiContext = Depends(context)):
    async def temporal() -> None:
        if not await ctx.client.service_client.check_health():
            raise RuntimeError("not serving")

    async def database() -> None:
        async with ctx.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    temporal_state, database_state = await asyncio.gather(_check("temporal", temporal), _check("database", database))
    checks = {"temporal": temporal_state, "database": database_state}
    if all(v == "ok" for v in checks.values()):
        return {"status": "ready", "checks": checks}
    failing = ", ".join(f"{k} {v}" for k, v in checks.items() if v != "ok")
    return JSONResponse({"error": {"code": "NotReady", "message": f"not ready: {failing}"}, "checks": checks},
                        status_code=503)


@router.get("/metrics", include_in_schema=False)
async def metrics(ctx: ApiContext = Depends(context)) -> Response:
    await ctx.metrics.refresh_models(ctx.client, ctx.model_names(), ctx.settings.task_queue)
    return Response(ctx.metrics.render(), media_type=ctx.metrics.content_type)
