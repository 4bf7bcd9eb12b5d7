"""Content-addressed blob store on a local folder (a shared volume in production).

Keys are `<sha256>.<ext>`: writing the same bytes twice yields the same key and one file,
so a retried activity never duplicates an image. Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path

_EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}
CONTENT_TYPES = {ext: ctype for ctype, ext in _EXTENSIONS.items()}
_KEY = re.compile(r"[0-9a-f]{64}\.(jpg|png|webp)")  # fullmatch: "$" would let "\n" through
# Widths of the thumbnails kept beside a blob (see atelier/thumbnails.py); deleting a blob deletes them.
THUMBNAIL_WIDTHS = (256, 512, 1024)


class BlobNotFound(KeyError):
    pass


class InvalidBlobKey(ValueError):
    pass


def content_type_of(key: str) -> str:
    if not _KEY.fullmatch(key):
        raise InvalidBlobKey(key)
    return CONTENT_TYPES[key.rsplit(".", 1)[1]]


class BlobStore:
    def __init__(self, root: str | Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        if not _KEY.fullmatch(key):
            raise InvalidBlobKey(key)
        return self.root / key[:2] / key[2:4] / key

    def _put_sync(self, data: bytes, content_type: str) -> str:
        ext = _EXTENSIONS.get(content_type)
        if ext is None:
            raise ValueError(f"unsupported content type for the blob store: {content_type}")
        key = f"{hashlib.sha256(data).hexdigest()}.{ext}"
        final = self.path(key)
        if final.exists():
            return key
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return key

    async def put(self, data: bytes, content_type: str) -> str:
        return await asyncio.to_thread(self._put_sync, data, content_type)

    def _write_sync(self, final: Path, data: bytes) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @staticmethod
    def thumbnail_key(key: str, width: int) -> str:
        """Where the `width`-wide thumbnail of `key` is cached: derived from the key, not the bytes,
        so it is found without making it, and deleted with its blob."""
        content_type_of(key)
        ext = key.rsplit(".", 1)[1]
        return f"{hashlib.sha256(f'thumbnail:{width}:{key}'.encode()).hexdigest()}.{ext}"

    async def put_thumbnail(self, key: str, width: int, data: bytes) -> None:
        await asyncio.to_thread(self._write_sync, self.path(self.thumbnail_key(key, width)), data)

    def _delete_sync(self, key: str) -> bool:
        existed = False
        for name in (key, *(self.thumbnail_key(key, w) for w in THUMBNAIL_WIDTHS)):
            try:
                self.path(name).unlink()
                existed = existed or name == key
            except FileNotFoundError:
                pass
        return existed

    async def delete(self, key: str) -> bool:
        """Remove a blob and its thumbnails; True if the blob was there. Callers check references first."""
        return await asyncio.to_thread(self._delete_sync, key)

    def _get_sync(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(key) from None

    async def get(self, key: str) -> bytes:
        return await asyncio.to_thread(self._get_sync, key)

    def exists(self, key: str) -> bool:
        try:
            return self.path(key).is_file()
        except InvalidBlobKey:
            return False
