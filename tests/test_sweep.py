"""The sweep of blobs nobody holds (atelier/deletion.py, sweep_unheld), run by the retention
clean-up: a blob with no row in blob_refs goes (with its thumbnails) once it was last stored longer
ago than the input retention (at least an hour); a held blob stays whatever its age; an AI
attempt's output that never became a work is gone after a retention run, other works untouched."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest
from temporalio import activity
from temporalio.client import WorkflowFailureError
from temporalio.testing import ActivityEnvironment

from activities.retention import RetentionActivities
from atelier import deletion
from atelier.errors import ContentBlocked
from atelier.images import store_image
from atelier.messages import ImageInput, RetentionRequest, RetentionResult
from atelier.thumbnails import thumbnail
from tests.test_deletion import _refs_of, photo
from workflows.retention import RetentionWorkflow

HOUR = 3600.0


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def _age_store(root: Path, seconds: float) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            _age(p, seconds)


async def _orphan(harness, seed: int, *, age_s: float = 0.0, thumbnails: bool = False) -> str:
    """Bytes stored with no holder (as an AI attempt stores its output), last stored `age_s` ago."""
    blobs = harness.deps.blobs
    image = await store_image(blobs, photo(400, 300, seed), max_side=4096, max_pixels=40_000_000)
    if thumbnails:
        await thumbnail(blobs, image.key, 256)
        assert blobs.exists(blobs.thumbnail_key(image.key, 256))
    for name in (image.key, *(blobs.thumbnail_key(image.key, w) for w in (256, 512, 1024))):
        if blobs.exists(name):
            _age(blobs.path(name), age_s)
    return image.key


async def _clean(harness):
    acts = RetentionActivities(harness.engine, harness.deps.blobs, harness.client,
                               retention_hours=harness.settings.input_retention_hours)
    return await ActivityEnvironment().run(acts.clean_inputs, RetentionRequest())


async def test_an_unheld_blob_goes_with_its_thumbnails_once_older_than_the_input_retention(harness):
    assert harness.settings.input_retention_hours == 24.0
    blobs = harness.deps.blobs
    old = await _orphan(harness, 1, age_s=25 * HOUR, thumbnails=True)
    young = await _orphan(harness, 2, age_s=23 * HOUR, thumbnails=True)
    fresh = await _orphan(harness, 3)
    # Stored long ago, and again just now (a generation whose output has the same bytes, about to
    # save its work): young again.
    again = await _orphan(harness, 4, age_s=25 * HOUR)
    await store_image(blobs, photo(400, 300, 4), max_side=4096, max_pixels=40_000_000)

    result = await _clean(harness)

    assert not blobs.exists(old) and not blobs.exists(blobs.thumbnail_key(old, 256))
    assert blobs.exists(young) and blobs.exists(blobs.thumbnail_key(young, 256))
    assert blobs.exists(fresh) and blobs.exists(again)
    assert result.blobs_examined == 6  # four blobs, two thumbnails
    assert result.unheld_blobs_deleted == 1 and result.blobs_deleted == 1
    # Nothing left of the deleted one: not even the file moved aside while deleting it.
    assert not [p for p in blobs.root.rglob("*") if old.split(".")[0] in p.name]


async def test_the_sweep_age_is_never_under_an_hour(harness_factory):
    harness = await harness_factory(input_retention_hours=1 / 3600)
    blobs = harness.deps.blobs
    half_hour = await _orphan(harness, 5, age_s=HOUR / 2)
    two_hours = await _orphan(harness, 6, age_s=2 * HOUR)
    result = await _clean(harness)
    assert blobs.exists(half_hour) and not blobs.exists(two_hours)
    assert result.unheld_blobs_deleted == 1


async def test_a_held_blob_stays_whatever_its_age(harness):
    blobs = harness.deps.blobs
    user = await harness.user()
    uploaded = await harness.upload(user, photo(400, 300, 7))
    [upload_ref] = await _refs_of(harness, uploaded)
    as_input = await _orphan(harness, 8)
    await deletion.record_inputs(harness.engine, task_id="gen_sweep_input", user_id=user, keys=[as_input])
    as_output = await _orphan(harness, 9)
    async with harness.engine.begin() as conn:
        await deletion.add_refs(conn, user_id=user, kind=deletion.OUTPUT, owner_id="gen_sweep_output", keys=[as_output])
    held = [upload_ref.blob_key, as_input, as_output]
    for key in held:
        await thumbnail(blobs, key, 256)
    unheld = await _orphan(harness, 10, thumbnails=True)
    _age_store(blobs.root, 10 * 365 * 24 * HOUR)

    result = await _clean(harness)

    for key in held:
        assert blobs.exists(key) and blobs.exists(blobs.thumbnail_key(key, 256)), key
    assert not blobs.exists(unheld) and not blobs.exists(blobs.thumbnail_key(unheld, 256))
    assert result.blobs_examined == 8 and result.unheld_blobs_deleted == 1


async def test_each_call_looks_at_a_bounded_number_of_files_and_the_next_goes_on(harness):
    blobs = harness.deps.blobs
    keys = [await _orphan(harness, 20 + i, age_s=25 * HOUR) for i in range(5)]
    calls = []
    for _ in range(3):
        calls.append(await deletion.sweep_unheld(harness.engine, blobs, older_than_s=24 * HOUR, limit=2))
    assert [(s.examined, s.deleted, s.wrapped) for s in calls] == [(2, 2, False), (2, 2, False), (1, 1, True)]
    assert not any(blobs.exists(k) for k in keys)


async def test_a_blob_stored_again_while_being_swept_stays(tmp_path):
    from atelier.blobstore import BlobStore

    blobs = BlobStore(tmp_path, fsync=False)
    data = photo(80, 60, 40)
    key = await blobs.put(data, "image/jpeg")
    _age(blobs.path(key), 2 * HOUR)
    cutoff = time.time() - HOUR
    # The sweep found it old and unheld; before it deletes, a generation stores the same bytes.
    assert await blobs.put(data, "image/jpeg") == key
    assert not blobs.delete_if_older(key, cutoff) and blobs.exists(key)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [key]  # moved back, nothing aside
    _age(blobs.path(key), 2 * HOUR)
    assert blobs.delete_if_older(key, cutoff) and not blobs.exists(key)


async def test_leftovers_go_too_a_thumbnail_whose_blob_is_gone_and_a_crashed_write(harness):
    blobs = harness.deps.blobs
    key = await _orphan(harness, 41)
    await thumbnail(blobs, key, 256)
    blobs.path(key).unlink()  # what a thumbnail made while its blob was deleted leaves behind
    folder = blobs.path(key).parent
    (folder / ".tmp-crashed").write_bytes(b"half an image")
    (folder / ".tmp-writing").write_bytes(b"being written")
    _age(blobs.path(blobs.thumbnail_key(key, 256)), 25 * HOUR)
    _age(folder / ".tmp-crashed", 25 * HOUR)
    result = await _clean(harness)
    assert sorted(p.name for p in folder.iterdir()) == [".tmp-writing"]
    assert result.leftovers_deleted == 2 and result.unheld_blobs_deleted == 0


def test_deleting_a_blob_deletes_thumbnails_cached_where_they_were_before_too(tmp_path):
    from atelier.blobstore import BlobStore

    blobs = BlobStore(tmp_path, fsync=False)
    key = blobs._put_sync(photo(80, 60, 42), "image/jpeg")
    legacy = blobs.path(blobs._legacy_thumbnail_key(key, 512))
    legacy.parent.mkdir(parents=True, exist_ok=True)
    legacy.write_bytes(b"a thumbnail made before they moved beside their blob")
    assert blobs._delete_sync(key)
    assert not legacy.exists() and not any(p.is_file() for p in tmp_path.rglob("*"))


class _StoreThenFail:
    """A blob store through which, while `failing`, an AI attempt stores its output and then fails
    for good: the output is on disk and never reaches a work (the worker-killed-after-storing case)."""

    def __init__(self, blobs) -> None:
        self._blobs, self.failing, self.stranded = blobs, False, []

    def __getattr__(self, name):
        return getattr(self._blobs, name)

    async def put(self, data: bytes, content_type: str) -> str:
        key = await self._blobs.put(data, content_type)
        if self.failing and activity.in_activity() and activity.info().activity_type == "call_ai":
            self.stranded.append(key)
            raise ContentBlocked("test: the attempt failed after storing its output")
        return key


async def test_an_output_that_never_became_a_work_is_swept_and_other_works_stay(harness):
    from atelier.blobstore import SWEEP_POSITION_FILE

    real = harness.deps.blobs
    stranding = _StoreThenFail(real)
    harness.deps.blobs = stranding  # the worker's call_ai and retention go through it
    user = await harness.user()
    async with harness.worker():
        saved_file = await harness.upload(user, photo(300, 220, 31))
        saved = await (await harness.start(user, "photography", [ImageInput(file_id=saved_file)])).result()
        assert saved.status == "completed", saved
        stranding.failing = True
        failed_file = await harness.upload(user, photo(310, 210, 32))
        failed = await harness.start(user, "photography", [ImageInput(file_id=failed_file)])
        with pytest.raises(WorkflowFailureError):
            await failed.result()
        stranding.failing = False
        [stranded] = stranding.stranded
        assert real.exists(stranded)
        assert await _refs_of(harness, failed.id) and not [
            r for r in await _refs_of(harness, failed.id) if r.blob_key == stranded]
        [work_image] = saved.images
        await thumbnail(real, work_image.key, 256)
        before = {p: p.read_bytes() for p in real.root.rglob("*") if p.is_file()}
        _age_store(real.root, 25 * HOUR)

        handle = await harness.client.start_workflow(
            RetentionWorkflow.run, RetentionRequest(), id=f"retention-{uuid.uuid4().hex[:8]}",
            task_queue=harness.settings.task_queue)
        total = await handle.result()
        assert isinstance(total, RetentionResult) and total.blobs_deleted == 1

    assert not real.exists(stranded)
    # Everything else is there, byte for byte: the saved work's image and thumbnail, both uploads.
    after = {p: p.read_bytes() for p in real.root.rglob("*") if p.is_file() and p.name != SWEEP_POSITION_FILE}
    assert {p for p in before if p.name != stranded} == set(after)
    assert all(after[p] == before[p] for p in after)
    assert real.exists(real.thumbnail_key(work_image.key, 256))
    # The operator sees the counts in the activity's result (Temporal UI) and in the log.
    history = await handle.fetch_history()
    results = [json.loads(e.activity_task_completed_event_attributes.result.payloads[0].data)
               for e in history.events if e.HasField("activity_task_completed_event_attributes")]
    assert [(r["blobs_examined"], r["unheld_blobs_deleted"]) for r in results] == [(len(before), 1)]
