"""Works: the saved result of a completed generation, and the files a user may read."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from atelier.credits import charged_to, lock_task, refuse_if_refunded
from atelier.db import files, works, reading
from atelier.deletion import OUTPUT, UPLOAD, add_refs
from atelier.errors import InvalidRequest
from atelier.messages import StoredImage


@dataclass
class Work:
    id: str
    task_id: str
    user_id: str
    kind: str
    model: str
    prompt: str
    images: list[StoredImage]
    created_at: datetime


def _dialect(engine: AsyncEngine):
    return postgresql if engine.dialect.name == "postgresql" else sqlite


def _row_to_work(r) -> Work:
    return Work(r.id, r.task_id, r.user_id, r.kind, r.model, r.prompt,
                [StoredImage(**i) for i in r.images], r.created_at)


async def save_work(engine: AsyncEngine, *, task_id: str, user_id: str, kind: str, model: str,
                    prompt: str, images: list[StoredImage]) -> tuple[str, bool]:
    """Record the work for `task_id` once and make its images the user's. Returns (work_id, replayed).
    Raises AlreadyRefunded if the task was refunded first (a refunded task has no work) and
    InvalidRequest if it was never charged to this user."""
    now = datetime.now(timezone.utc)
    d = _dialect(engine)
    work_id = f"wrk_{uuid.uuid4().hex[:20]}"
    async with engine.begin() as conn:
        await lock_task(conn, task_id)
        await refuse_if_refunded(conn, task_id, "saved as a work")
        if not await charged_to(conn, task_id, user_id):
            raise InvalidRequest(f"task {task_id!r} was not charged to this user: no work is saved for it")
        inserted = await conn.execute(
            d.insert(works).values(
                id=work_id, task_id=task_id, user_id=user_id, kind=kind, model=model, prompt=prompt,
                images=[asdict(i) for i in images], created_at=now,
            ).on_conflict_do_nothing(index_elements=["task_id"])
        )
        if inserted.rowcount == 0:
            existing = (await conn.execute(select(works.c.id).where(works.c.task_id == task_id))).scalar_one()
            return existing, True
        await add_refs(conn, user_id=user_id, kind=OUTPUT, owner_id=task_id, keys=[i.key for i in images])
        for image in images:
            await conn.execute(
                d.insert(files).values(
                    id=f"fil_{uuid.uuid4().hex[:20]}", user_id=user_id, blob_key=image.key,
                    content_type=image.content_type, width=image.width, height=image.height,
                    size=image.size, origin="output", created_at=now,
                ).on_conflict_do_nothing()
            )
    return work_id, False


async def get_work(engine: AsyncEngine, work_id: str) -> Work | None:
    async with reading(engine) as conn:
        r = (await conn.execute(select(works).where(works.c.id == work_id))).one_or_none()
    return _row_to_work(r) if r else None


async def work_for_task(engine: AsyncEngine, task_id: str) -> Work | None:
    async with reading(engine) as conn:
        r = (await conn.execute(select(works).where(works.c.task_id == task_id))).one_or_none()
    return _row_to_work(r) if r else None


async def list_works(engine: AsyncEngine, user_id: str, *, limit: int = 50, before: datetime | None = None) -> list[Work]:
    q = select(works).where(works.c.user_id == user_id)
    if before is not None:
        q = q.where(works.c.created_at < before)
    q = q.order_by(works.c.created_at.desc()).limit(limit)
    async with reading(engine) as conn:
        return [_row_to_work(r) for r in (await conn.execute(q)).all()]


@dataclass
class UserFile:
    id: str
    user_id: str
    image: StoredImage
    origin: str


async def record_upload(engine: AsyncEngine, *, user_id: str, image: StoredImage) -> str:
    file_id = f"fil_{uuid.uuid4().hex[:20]}"
    d = _dialect(engine)
    async with engine.begin() as conn:
        await conn.execute(
            d.insert(files).values(
                id=file_id, user_id=user_id, blob_key=image.key, content_type=image.content_type,
                width=image.width, height=image.height, size=image.size, origin="upload",
                created_at=datetime.now(timezone.utc),
            ).on_conflict_do_nothing()
        )
        # The same bytes uploaded twice share one row: answer with the existing id.
        row = (await conn.execute(
            select(files.c.id).where(files.c.user_id == user_id, files.c.blob_key == image.key, files.c.origin == "upload")
        )).scalar_one()
        await add_refs(conn, user_id=user_id, kind=UPLOAD, owner_id=row, keys=[image.key])
    return row


async def upload_of(engine: AsyncEngine, *, user_id: str, file_id: str) -> UserFile | None:
    """An uploaded file, only if it belongs to `user_id` (someone else's id is as good as unknown)."""
    async with reading(engine) as conn:
        r = (await conn.execute(
            select(files).where(files.c.id == file_id, files.c.user_id == user_id, files.c.origin == "upload")
        )).one_or_none()
    if r is None:
        return None
    return UserFile(r.id, r.user_id, StoredImage(r.blob_key, r.content_type, r.width, r.height, r.size), r.origin)


async def owns_blob(engine: AsyncEngine, *, user_id: str, blob_key: str) -> bool:
    async with reading(engine) as conn:
        return (await conn.execute(
            select(files.c.id).where(files.c.user_id == user_id, files.c.blob_key == blob_key).limit(1)
        )).first() is not None
