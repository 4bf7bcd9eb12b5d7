"""download_and_convert: fetch each input (URL or uploaded file), check it, normalise it, store it.
Returns blob-store references: image bytes never enter the workflow history.

The images are fetched in parallel, all within one budget that ends before the activity's
start-to-close timeout. A heartbeat runs on a timer the whole time (decoding happens in a
thread, so the event loop stays free to beat). Each stored image is added to the heartbeat
details as soon as it is stored, so a retry (after a failure, a timeout or a dead worker)
fetches only what the last attempt had not stored yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.errors import to_application_error
from activities.heartbeat import heartbeating
from atelier import deletion, works
from atelier.blobstore import BlobStore, InvalidBlobKey
from atelier.downloader import Downloader
from atelier.errors import AtelierError, BadImage, DownloadFailed
from atelier.images import store_image
from atelier.messages import DownloadRequest, DownloadResult, ImageInput, StoredImage

# Kept back from the start-to-close timeout: time to report the outcome before the server gives up.
BUDGET_MARGIN_S = 2.0
BUDGET_MARGIN_FRACTION = 0.1


class _Progress:
    """What this attempt (and the ones before it) achieved: the heartbeat details."""

    def __init__(self, stored: dict[int, StoredImage]) -> None:
        self.stored = stored
        self.received: dict[int, int] = {}

    def details(self) -> dict[str, Any]:
        return {"stored": {str(i): asdict(image) for i, image in sorted(self.stored.items())},
                "received": {str(i): n for i, n in sorted(self.received.items())}}

    def beat(self) -> None:
        activity.heartbeat(self.details())


def budget_s(fallback_s: float) -> float:
    """Seconds this attempt may spend: what is left of its start-to-close timeout, less a margin."""
    info = activity.info()
    timeout = info.start_to_close_timeout
    if not timeout:
        return fallback_s
    total = timeout.total_seconds()
    started = info.started_time.timestamp() if info.started_time else time.time()
    left = total - max(0.0, time.time() - started)
    return max(1.0, left - max(BUDGET_MARGIN_S, total * BUDGET_MARGIN_FRACTION))


class ImageActivities:
    def __init__(self, engine: AsyncEngine, blobs: BlobStore, downloader: Downloader, *,
                 max_side: int, max_pixels: int) -> None:
        self.engine = engine
        self.blobs = blobs
        self.downloader = downloader
        self.max_side = max_side
        self.max_pixels = max_pixels

    @activity.defn
    async def download_and_convert(self, req: DownloadRequest) -> DownloadResult:
        progress = _Progress(self._stored_before(len(req.images)))
        timeout = activity.info().heartbeat_timeout
        every = max(0.2, min(5.0, timeout.total_seconds() / 3)) if timeout else 5.0
        budget = budget_s(self.downloader.total_timeout_s * max(1, len(req.images)))
        try:
            async with _beating(progress, every):
                try:
                    async with asyncio.timeout(budget):
                        await self._all(req, progress)
                except TimeoutError:
                    raise DownloadFailed(
                        f"{len(req.images) - len(progress.stored)} of {len(req.images)} image(s) not stored "
                        f"within this attempt's {budget:.0f} s", retryable=True) from None
        except AtelierError as err:
            raise to_application_error(err) from None
        stored = [progress.stored[i] for i in range(len(req.images)) if i in progress.stored]
        if len(stored) != len(req.images):
            # Never let an image vanish on the way: the old system did exactly that.
            raise to_application_error(BadImage(f"{len(req.images)} image(s) given, {len(stored)} stored"))
        # The generation holds its inputs until retention releases them (ATELIER_INPUT_RETENTION_HOURS).
        await deletion.record_inputs(self.engine, task_id=req.task_id, user_id=req.user_id,
                                     keys=[i.key for i in stored])
        if not all(self.blobs.exists(i.key) for i in stored):
            # Another holder's deletion removed identical bytes between our store and our record:
            # retried, the activity stores them again (now held, they stay).
            raise ApplicationError("an input was deleted while it was being stored; retrying", type="InputRaced")
        return DownloadResult(images=stored)

    def _stored_before(self, count: int) -> dict[int, StoredImage]:
        """The images an earlier attempt stored (from its heartbeat details), still in the blob store."""
        details = activity.info().heartbeat_details
        if not details or not isinstance(details[-1], dict) or not isinstance(details[-1].get("stored"), dict):
            return {}
        kept: dict[int, StoredImage] = {}
        for index, fields in details[-1]["stored"].items():
            try:
                i, image = int(index), StoredImage(**fields)
                if 0 <= i < count and self.blobs.exists(image.key):
                    kept[i] = image
            except (TypeError, ValueError, InvalidBlobKey):
                continue  # not what this code writes: fetch that image again
        if kept:
            activity.logger.info("resuming: %d of %d image(s) stored by an earlier attempt", len(kept), count)
        return kept

    async def _all(self, req: DownloadRequest, progress: _Progress) -> None:
        """Fetch and store every image not stored yet, in parallel. A failure that a retry may fix
        lets the others finish (so the retry does not fetch them again); one that it cannot fix
        stops them at once."""
        async def one(index: int, image: ImageInput) -> None:
            progress.stored[index] = await self._one(req.user_id, index, image, progress)
            progress.beat()  # stored: in the details now, not at the next tick

        tasks = [asyncio.create_task(one(i, image)) for i, image in enumerate(req.images) if i not in progress.stored]
        if not tasks:
            return
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failures = [t.exception() for t in done if t.exception() is not None]
            if failures and pending and not all(getattr(f, "retryable", False) for f in failures):
                for task in pending:
                    task.cancel()
            if pending:
                await asyncio.wait(pending)
            failures = [t.exception() for t in tasks if not t.cancelled() and t.exception() is not None]
            if failures:
                # The one a retry cannot fix first: it decides whether there is a retry at all.
                failures.sort(key=lambda f: getattr(f, "retryable", False))
                raise failures[0]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, user_id: str, index: int, image: ImageInput, progress: _Progress) -> StoredImage:
        if image.file_id:
            upload = await works.upload_of(self.engine, user_id=user_id, file_id=image.file_id)
            if upload is None or not self.blobs.exists(upload.image.key):
                raise BadImage(f"images[{index}]: no uploaded file {image.file_id!r}")
            return upload.image  # uploads were checked and normalised when they arrived

        def received(n: int) -> None:
            progress.received[index] = n

        data = await self.downloader.fetch(image.url or "", on_progress=received)
        return await self.store(data, label=f"images[{index}]")

    async def store(self, data: bytes, *, label: str) -> StoredImage:
        try:
            # Decoded in a thread: the heartbeat keeps beating meanwhile.
            return await store_image(self.blobs, data, max_side=self.max_side, max_pixels=self.max_pixels)
        except BadImage as err:
            raise BadImage(f"{label}: {err.message}") from None


@contextlib.asynccontextmanager
async def _beating(progress: _Progress, every_s: float):
    """Heartbeat with the current details on a timer while the body runs."""
    try:
        async with heartbeating(every_s, beat=progress.beat):
            yield
    finally:
        progress.beat()  # the last word: what a retry may keep
