"""Races the chaos run found, pinned down one at a time so they fail every time, not one run in three.

Cancel while the work is being saved: the chaos run saw a generation end "canceled", its
credits refunded, yet its work saved and its images made the user's: images for free.
Here the save is held back deterministically (the test holds SQLite's write lock while the
workflow is in its saving stage), the cancel lands, then the lock is released.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3

import pytest
from temporalio.client import WorkflowFailureError

from atelier import works
from atelier.messages import ImageInput
from starter.service import read_generation
from tests.conftest import wait_for
from tests.fakes import images as fake_images

pytestmark = pytest.mark.skipif(bool(os.environ.get("ATELIER_TEST_DATABASE_URL")),
                                reason="holds SQLite's write lock to widen the race")


async def _stage(h, task_id: str) -> str | None:
    state = await read_generation(h.client, task_id)
    return state.view.stage if state else None


@pytest.mark.timeout(120)
async def test_cancel_while_saving_never_leaves_a_refunded_work(harness_factory):
    h = await harness_factory(local_ai_delay_s=1.5)
    user = await h.user(100)
    photo = [ImageInput(file_id=await h.upload(user, fake_images.jpeg(320, 240)))]
    db_path = h.settings.database_url.split(":///", 1)[1]
    async with h.worker():
        handle = await h.start(user, "photography", photo)
        await wait_for(lambda: _is(h, handle.id, "generating"), timeout=30)
        # Writers now queue behind this lock: save_work starts but cannot commit yet.
        lock = sqlite3.connect(db_path, isolation_level=None, timeout=30)
        try:
            lock.execute("BEGIN IMMEDIATE")
            await wait_for(lambda: _is(h, handle.id, "saving"), timeout=30)
            await handle.cancel()
            await asyncio.sleep(1.5)  # the cancel reaches the workflow while save_work waits
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        try:
            result = await asyncio.wait_for(handle.result(), timeout=60)
            status = result.status
        except WorkflowFailureError:
            status = "canceled"
    charged, refunded = await h.ledger(handle.id)
    work = await works.work_for_task(h.engine, handle.id)
    if status == "completed":
        assert (charged, refunded) == (10, 0) and work is not None
    else:
        assert (charged, refunded) == (10, 10)
        assert work is None, (f"generation {status} and refunded, yet work {work.id} was saved and its "
                              f"images are the user's: they got them for free")


async def _is(h, task_id: str, stage: str) -> bool:
    return await _stage(h, task_id) == stage
