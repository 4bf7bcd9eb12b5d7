"""Save the finished work, once per task."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import activity

from activities.errors import to_application_error
from atelier import works
from atelier.errors import AtelierError
from atelier.messages import SavedWork, SaveWorkRequest


class WorkActivities:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    @activity.defn
    async def save_work(self, req: SaveWorkRequest) -> SavedWork:
        try:
            work_id, replayed = await works.save_work(
                self.engine, task_id=req.task_id, user_id=req.user_id, kind=req.kind, model=req.model,
                prompt=req.prompt, images=req.images,
            )
        except AtelierError as err:  # AlreadyRefunded: non-retryable
            raise to_application_error(err) from None
        return SavedWork(work_id=work_id, replayed=replayed)
