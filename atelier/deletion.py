"""Who holds which blob, and deleting what nobody holds any more.

Every stored image has holders in `blob_refs`: an upload (owner: its file id), a generation's
inputs and outputs (owner: the task id). Deleting a work, an upload, a generation's inputs or a
whole user removes holders; a blob (with its thumbnails) is deleted only when its last holder
goes, so bytes shared by two users (the store is content-addressed) stay for the other one.
The ledger is never touched: it holds amounts and reasons, no prompts and no images.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import and_, delete, exists, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from atelier.blobstore import BlobStore
from atelier.db import blob_refs, files, idempotency_keys, reading, works

UPLOAD, INPUT, OUTPUT = "upload", "input", "output"


def _insert(conn: AsyncConnection):
    return (postgresql if conn.dialect.name == "postgresql" else sqlite).insert(blob_refs)


async def add_refs(conn: AsyncConnection, *, user_id: str, kind: str, owner_id: str, keys: list[str]) -> None:
    """Record `owner_id` as a holder of each key (again: a no-op)."""
    now = datetime.now(timezone.utc)
    for key in dict.fromkeys(keys):
        await conn.execute(_insert(conn).values(blob_key=key, user_id=user_id, kind=kind, owner_id=owner_id,
                                                created_at=now).on_conflict_do_nothing())


async def record_inputs(engine: AsyncEngine, *, task_id: str, user_id: str, keys: list[str]) -> None:
    """A generation holds its input images until retention (or a deletion) releases them."""
    if keys:
        async with engine.begin() as conn:
            await add_refs(conn, user_id=user_id, kind=INPUT, owner_id=task_id, keys=keys)


async def collect(engine: AsyncEngine, blobs: BlobStore, keys) -> list[str]:
    """Delete each blob of `keys` that no holder is left for; returns the keys deleted."""
    deleted = []
    for key in dict.fromkeys(keys):
        # In a write transaction: on SQLite no holder can be added between the count and the unlink.
        async with engine.begin() as conn:
            held = (await conn.execute(select(func.count()).select_from(blob_refs)
                                       .where(blob_refs.c.blob_key == key))).scalar_one()
            if held == 0 and await blobs.delete(key):
                deleted.append(key)
    return deleted


async def _drop_output_files(conn: AsyncConnection, user_id: str, keys: list[str]) -> None:
    """The user may no longer read an output once no work of theirs holds it."""
    for key in keys:
        still = (await conn.execute(select(blob_refs.c.id).where(
            blob_refs.c.blob_key == key, blob_refs.c.user_id == user_id, blob_refs.c.kind == OUTPUT).limit(1))).first()
        if still is None:
            await conn.execute(delete(files).where(files.c.user_id == user_id, files.c.blob_key == key,
                                                   files.c.origin == OUTPUT))


async def _keys_of(conn: AsyncConnection, *conditions) -> list[str]:
    return list((await conn.execute(select(blob_refs.c.blob_key).where(*conditions))).scalars())


@dataclass
class DeletedWork:
    work_id: str
    task_id: str
    blobs_deleted: list[str]


async def delete_work(engine: AsyncEngine, blobs: BlobStore, *, user_id: str, work_id: str) -> DeletedWork | None:
    """Delete a user's work, its output images and its generation's inputs (None: no such work of theirs)."""
    async with engine.begin() as conn:
        row = (await conn.execute(select(works.c.task_id).where(works.c.id == work_id,
                                                                works.c.user_id == user_id))).first()
        if row is None:
            return None
        task_id = row.task_id
        owned = and_(blob_refs.c.owner_id == task_id, blob_refs.c.kind.in_((INPUT, OUTPUT)))
        keys = await _keys_of(conn, owned)
        outputs = await _keys_of(conn, owned, blob_refs.c.kind == OUTPUT)
        await conn.execute(delete(blob_refs).where(owned))
        await conn.execute(delete(works).where(works.c.id == work_id))
        await _drop_output_files(conn, user_id, outputs)
    return DeletedWork(work_id, task_id, await collect(engine, blobs, keys))


@dataclass
class DeletedUpload:
    file_id: str
    blob_key: str
    blobs_deleted: list[str]


async def delete_upload(engine: AsyncEngine, blobs: BlobStore, *, user_id: str, file_id: str) -> DeletedUpload | None:
    """Delete a user's upload (None: no such upload of theirs). Generations that used it keep their
    input until released (see release_inputs)."""
    async with engine.begin() as conn:
        row = (await conn.execute(select(files.c.blob_key).where(
            files.c.id == file_id, files.c.user_id == user_id, files.c.origin == UPLOAD))).first()
        if row is None:
            return None
        await conn.execute(delete(blob_refs).where(blob_refs.c.kind == UPLOAD, blob_refs.c.owner_id == file_id))
        await conn.execute(delete(files).where(files.c.id == file_id))
    return DeletedUpload(file_id, row.blob_key, await collect(engine, blobs, [row.blob_key]))


async def input_tasks_holding(engine: AsyncEngine, *, user_id: str, blob_key: str) -> list[str]:
    """The user's generations that hold `blob_key` as an input."""
    async with reading(engine) as conn:
        return list((await conn.execute(select(blob_refs.c.owner_id).where(
            blob_refs.c.user_id == user_id, blob_refs.c.blob_key == blob_key, blob_refs.c.kind == INPUT))).scalars())


async def release_inputs(engine: AsyncEngine, blobs: BlobStore, task_ids: list[str]) -> list[str]:
    """These generations no longer need their inputs; returns the blobs deleted. Callers make
    sure none of them is still running."""
    if not task_ids:
        return []
    async with engine.begin() as conn:
        held = and_(blob_refs.c.kind == INPUT, blob_refs.c.owner_id.in_(task_ids))
        keys = await _keys_of(conn, held)
        await conn.execute(delete(blob_refs).where(held))
    return await collect(engine, blobs, keys)


async def input_tasks_before(engine: AsyncEngine, cutoff: datetime, *, limit: int) -> list[str]:
    """Generations holding inputs recorded before `cutoff` (candidates for retention), oldest first."""
    async with reading(engine) as conn:
        rows = await conn.execute(
            select(blob_refs.c.owner_id, func.min(blob_refs.c.created_at).label("first"))
            .where(blob_refs.c.kind == INPUT, blob_refs.c.created_at < cutoff)
            .group_by(blob_refs.c.owner_id).order_by("first").limit(limit))
        return [r.owner_id for r in rows]


async def withdrawn_output_tasks_before(engine: AsyncEngine, cutoff: datetime, *, limit: int) -> list[str]:
    """Generations holding outputs recorded before `cutoff` with no work (the generation ended
    without saving one, or a refund that came after the save withdrew it): those outputs are
    nobody's to keep."""
    no_work = ~exists().where(works.c.task_id == blob_refs.c.owner_id)
    async with reading(engine) as conn:
        rows = await conn.execute(
            select(blob_refs.c.owner_id).where(blob_refs.c.kind == OUTPUT, blob_refs.c.created_at < cutoff, no_work)
            .group_by(blob_refs.c.owner_id).limit(limit))
        return [r.owner_id for r in rows]


async def release_outputs(engine: AsyncEngine, blobs: BlobStore, task_ids: list[str]) -> list[str]:
    """Drop the outputs these generations hold (and their owners' right to read them); returns
    the blobs deleted."""
    if not task_ids:
        return []
    async with engine.begin() as conn:
        held = and_(blob_refs.c.kind == OUTPUT, blob_refs.c.owner_id.in_(task_ids))
        rows = (await conn.execute(select(blob_refs.c.blob_key, blob_refs.c.user_id).where(held))).all()
        await conn.execute(delete(blob_refs).where(held))
        for user_id in {r.user_id for r in rows}:
            await _drop_output_files(conn, user_id, [r.blob_key for r in rows if r.user_id == user_id])
    return await collect(engine, blobs, [r.blob_key for r in rows])


async def expire_uploads(engine: AsyncEngine, blobs: BlobStore, cutoff: datetime, *, limit: int) -> tuple[int, list[str]]:
    """Delete uploads made before `cutoff` that no generation holds as an input any more.
    Returns (uploads deleted, blobs deleted)."""
    used = exists().where(blob_refs.c.kind == INPUT, blob_refs.c.blob_key == files.c.blob_key,
                          blob_refs.c.user_id == files.c.user_id)
    async with engine.begin() as conn:
        rows = (await conn.execute(select(files.c.id, files.c.blob_key).where(
            files.c.origin == UPLOAD, files.c.created_at < cutoff, ~used).limit(limit))).all()
        ids = [r.id for r in rows]
        if ids:
            await conn.execute(delete(blob_refs).where(blob_refs.c.kind == UPLOAD, blob_refs.c.owner_id.in_(ids)))
            await conn.execute(delete(files).where(files.c.id.in_(ids)))
    return len(ids), await collect(engine, blobs, [r.blob_key for r in rows])


@dataclass
class Erased:
    works: int
    uploads: int
    inputs: int
    blobs_deleted: list[str]


async def erase_user(engine: AsyncEngine, blobs: BlobStore, user_id: str) -> Erased:
    """Everything a user has, except the ledger and the account: works, uploads, inputs, outputs,
    idempotency keys (they name generations), and every blob no one else holds."""
    async with engine.begin() as conn:
        keys = await _keys_of(conn, blob_refs.c.user_id == user_id)
        keys += list((await conn.execute(select(files.c.blob_key).where(files.c.user_id == user_id))).scalars())
        inputs = (await conn.execute(select(func.count()).select_from(blob_refs).where(
            blob_refs.c.user_id == user_id, blob_refs.c.kind == INPUT))).scalar_one()
        uploads = (await conn.execute(delete(files).where(files.c.user_id == user_id, files.c.origin == UPLOAD)
                                      )).rowcount
        await conn.execute(delete(files).where(files.c.user_id == user_id))
        erased_works = (await conn.execute(delete(works).where(works.c.user_id == user_id))).rowcount
        await conn.execute(delete(blob_refs).where(blob_refs.c.user_id == user_id))
        await conn.execute(delete(idempotency_keys).where(idempotency_keys.c.user_id == user_id))
    return Erased(erased_works, uploads, inputs, await collect(engine, blobs, keys))


# ---- the sweep: blobs nobody holds --------------------------------------------------------

# Files one sweep call looks at (each a stat, the old ones a holder lookup, the unheld old ones a
# write transaction and an unlink): seconds on a local disk, heartbeating as it goes. The scan
# goes on from where the last call stopped (kept in the store: BlobStore.sweep_position), so a
# store of any size is gone through, this many files per call.
SWEEP_FILES = 2000
# Never younger than this, whatever the input retention says.
MIN_SWEEP_AGE_S = 3600.0


@dataclass
class Swept:
    examined: int = 0
    deleted: int = 0        # blobs (each with its thumbnails)
    leftovers: int = 0      # thumbnails of deleted blobs, temporary files of crashed writes
    wrapped: bool = False   # this call reached the end of the store (the next one starts over)


async def _held(engine: AsyncEngine, keys: list[str]) -> set[str]:
    held: set[str] = set()
    async with reading(engine) as conn:
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            held.update((await conn.execute(select(blob_refs.c.blob_key).where(
                blob_refs.c.blob_key.in_(chunk)).distinct())).scalars())
    return held


async def sweep_unheld(engine: AsyncEngine, blobs: BlobStore, *, older_than_s: float, limit: int = SWEEP_FILES,
                       beat=lambda examined: None) -> Swept:
    """Delete the blobs that no row of `blob_refs` holds and that were last stored more than
    `older_than_s` ago (at least MIN_SWEEP_AGE_S), with their thumbnails; looks at `limit` files
    of the store, going on from where the last call stopped.

    What it finds: outputs an AI attempt stored whose result never became a work (the worker died
    after storing, the save failed for good, an attempt was retried), and any other bytes whose
    holder never got recorded. Everything the product keeps has a holder (an upload, a
    generation's inputs, a work's outputs): held blobs are never deleted, whatever their age.

    The age is the race guard. A generation stores its outputs (activities/ai.py, call_ai) with
    no holder, and records the holder a moment later when save_work saves the work (the next
    activity: seconds, a few quick retries at most); an upload and a download record theirs right
    after storing. A blob stored less than an hour (and the input retention) ago is never taken
    here, so an output stored a moment ago and about to be saved stays; only a save held up longer
    than that (every worker down for over an hour between the two steps) could find its image
    gone. Storing bytes that are already there makes them young again (BlobStore.put), so a new
    generation whose output has the bytes of an old stranded one keeps them; and
    BlobStore.delete_if_older reads the time again after moving the blob aside, so a store racing
    the deletion wins. The holder count and the deletion share one write transaction (on SQLite
    nothing can add a holder in between, as in `collect`)."""
    cutoff = time.time() - max(MIN_SWEEP_AGE_S, older_than_s)
    after = await asyncio.to_thread(blobs.sweep_position)
    found, position = await asyncio.to_thread(blobs.scan, after, limit)
    swept = Swept(examined=len(found), wrapped=position == "")
    beat(swept.examined)
    old = [f for f in found if f.mtime < cutoff]
    owners = {f.name: (f.name if f.is_blob else blobs.blob_of_thumbnail(f.name)) for f in old}
    held = await _held(engine, sorted({k for k in owners.values() if k}))
    for n, f in enumerate(old):
        if n and n % 100 == 0:
            beat(swept.examined)
        owner = owners[f.name]
        if owner in held:
            continue  # a held blob, or a thumbnail of one: kept whatever its age
        if f.is_blob:
            async with engine.begin() as conn:
                count = (await conn.execute(select(func.count()).select_from(blob_refs)
                                            .where(blob_refs.c.blob_key == f.name))).scalar_one()
                if count == 0 and await asyncio.to_thread(blobs.delete_if_older, f.name, cutoff):
                    swept.deleted += 1
        elif owner is None or not await asyncio.to_thread(blobs.exists, owner):
            # A temporary file left by a crashed write, or a thumbnail whose blob is gone (an old
            # unheld blob takes its thumbnails with it; these are what a race left behind).
            if await asyncio.to_thread(blobs.unlink_if_older, f.path, cutoff):
                swept.leftovers += 1
    await asyncio.to_thread(blobs.set_sweep_position, position)
    return swept
