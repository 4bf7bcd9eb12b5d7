"""Recent model failures, shared by all workers through the database, so select_model can
skip a model that failed repeatedly in the last minutes."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from atelier.db import model_failures, reading


async def record_failure(engine: AsyncEngine, model: str, error_code: str) -> None:
    now = datetime.now(timezone.utc)
    async with engine.begin() as conn:
        await conn.execute(insert(model_failures).values(model=model, error_code=error_code, at=now))
        # Keep the table small: forget failures older than a day.
        await conn.execute(delete(model_failures).where(model_failures.c.at < now - timedelta(days=1)))


async def unhealthy_models(engine: AsyncEngine, *, threshold: int, window_s: float) -> set[str]:
    since = datetime.now(timezone.utc) - timedelta(seconds=window_s)
    async with reading(engine) as conn:
        rows = (await conn.execute(
            select(model_failures.c.model, func.count())
            .where(model_failures.c.at >= since)
            .group_by(model_failures.c.model)
        )).all()
    return {model for model, count in rows if count >= threshold}
