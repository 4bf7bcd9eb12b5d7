"""Thumbnails of stored images, at a few fixed widths, made once and cached in the blob store."""

from __future__ import annotations

import asyncio
import io

from PIL import Image

from atelier.blobstore import THUMBNAIL_WIDTHS, BlobNotFound, BlobStore, content_type_of

_FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}


def _resize(data: bytes, content_type: str, width: int) -> bytes | None:
    """The image scaled to `width` (aspect kept), in its own format; None if it is not wider."""
    with Image.open(io.BytesIO(data), formats=[_FORMATS[content_type]]) as image:
        if image.width <= width:
            return None
        height = max(1, round(image.height * width / image.width))
        # Our own stored images only (checked when stored): decoding them is safe.
        image.draft(image.mode, (width, height))
        small = image.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=2.0)
        out = io.BytesIO()
        options = {"quality": 85} if content_type != "image/png" else {"optimize": True}
        small.save(out, _FORMATS[content_type], **options)
        return out.getvalue()


async def thumbnail(blobs: BlobStore, key: str, width: int) -> bytes:
    """The `width`-wide thumbnail of `key` (the image itself when it is not wider). Raises
    BlobNotFound when the image is gone, ValueError for a width not offered."""
    if width not in THUMBNAIL_WIDTHS:
        raise ValueError(f"width must be one of {', '.join(map(str, THUMBNAIL_WIDTHS))}")
    cached = blobs.thumbnail_key(key, width)
    try:
        return await blobs.get(cached)
    except BlobNotFound:
        pass
    data = await blobs.get(key)
    small = await asyncio.to_thread(_resize, data, content_type_of(key), width)
    if small is None:
        return data
    if blobs.exists(key):  # not deleted meanwhile: never leave a thumbnail of a deleted image
        await blobs.put_thumbnail(key, width, small)
    return small
