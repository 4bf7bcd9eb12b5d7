"""download_and_convert: fetch each input (URL or upload), check it, normalise it, store it.
Returns blob-store references: image bytes never enter the workflow history."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import activity

from activities.errors import to_application_error
from atelier import deletion, works
from atelier.blobstore import BlobStore
from atelier.downloader import Downloader
from atelier.errors import AtelierError, BadImage
from atelier.images import store_image
from atelier.messages import DownloadRequest, DownloadResult, ImageInput, StoredImage


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
        stored: list[StoredImage] = []
        try:
            for index, image in enumerate(req.images):
                activity.heartbeat({"image": index, "bytes": 0})
                stored.append(await self._one(req.user_id, index, image))
        except AtelierError as err:
            raise to_application_error(err) from None
        if len(stored) != len(req.images):
            # Never let an image vanish on the way: the old system did exactly that.
            raise to_application_error(BadImage(f"{len(req.images)} image(s) given, {len(stored)} stored"))
        # The generation holds its inputs until retention releases them (ATELIER_INPUT_RETENTION_HOURS).
        await deletion.record_inputs(self.engine, task_id=req.task_id, user_id=req.user_id,
                                     keys=[i.key for i in stored])
        return DownloadResult(images=stored)

    async def _one(self, user_id: str, index: int, image: ImageInput) -> StoredImage:
        if image.file_id:
            upload = await works.upload_of(self.engine, user_id=user_id, file_id=image.file_id)
            if upload is None or not self.blobs.exists(upload.image.key):
                raise BadImage(f"images[{index}]: no uploaded file {image.file_id!r}")
            return upload.image  # uploads were checked and normalised when they arrived
        data = await self.downloader.fetch(
            image.url or "", on_progress=lambda n: activity.heartbeat({"image": index, "bytes": n})
        )
        return await self.store(data, label=f"images[{index}]")

    async def store(self, data: bytes, *, label: str) -> StoredImage:
        try:
            return await store_image(self.blobs, data, max_side=self.max_side, max_pixels=self.max_pixels)
        except BadImage as err:
            raise BadImage(f"{label}: {err.message}") from None
