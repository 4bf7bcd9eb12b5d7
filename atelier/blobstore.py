"""Content-addressed blob store on a local folder (a shared volume in production).

Keys are `<sha256>.<ext>`: writing the same bytes twice yields the same key and one file,
so a retried activity never duplicates an image. Writes are atomic (temp file + rename).
Thumbnails sit beside their blob (`<sha256>.w<width>.<ext>`). A file's modification time is when
its bytes were last stored: the sweep of blobs nobody holds (atelier/deletion.py) goes by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

_EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}
CONTENT_TYPES = {ext: ctype for ctype, ext in _EXTENSIONS.items()}
_KEY = re.compile(r"[0-9a-f]{64}\.(jpg|png|webp)")  # fullmatch: "$" would let "\n" through
# A thumbnail's file name: its blob's hash, the width, its blob's extension (beside the blob, so a
# scan of the store tells it from a blob and knows its blob). Never a key: no route serves it by name.
_THUMBNAIL = re.compile(r"(?P<hash>[0-9a-f]{64})\.w(?P<width>[0-9]{1,5})\.(?P<ext>jpg|png|webp)")
_SUBDIR = re.compile(r"[0-9a-f]{2}")
# Files a writer or the sweep leave only while they work (a crash may leave one behind).
TEMP_PREFIX, SWEEP_PREFIX = ".tmp-", ".sweep-"
# In the store's root (never scanned: only the two-level hex folders are).
SWEEP_POSITION_FILE = ".sweep-position"
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
        """Where a blob (or the thumbnail named by thumbnail_key) lives."""
        if not (_KEY.fullmatch(key) or _THUMBNAIL.fullmatch(key)):
            raise InvalidBlobKey(key)
        return self.root / key[:2] / key[2:4] / key

    def _put_sync(self, data: bytes, content_type: str) -> str:
        ext = _EXTENSIONS.get(content_type)
        if ext is None:
            raise ValueError(f"unsupported content type for the blob store: {content_type}")
        key = f"{hashlib.sha256(data).hexdigest()}.{ext}"
        final = self.path(key)
        try:
            # Stored again: its age starts again. The sweep of blobs nobody holds (see
            # atelier/deletion.py, sweep_unheld) goes by this time, so bytes just stored (and about to
            # get a holder) are never old, even when the same bytes were stored long ago.
            os.utime(final)
            return key
        except FileNotFoundError:
            pass  # new, or swept a moment ago: written below
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
        so it is found without making it, and deleted with its blob. Beside its blob (same folder,
        the blob's name with `.w<width>`), so a scan of the store knows whose thumbnail a file is."""
        content_type_of(key)
        digest, ext = key.rsplit(".", 1)
        return f"{digest}.w{int(width)}.{ext}"

    @staticmethod
    def blob_of_thumbnail(name: str) -> str | None:
        """The blob key a thumbnail file name belongs to (None: not a thumbnail's name)."""
        m = _THUMBNAIL.fullmatch(name)
        return f"{m['hash']}.{m['ext']}" if m else None

    async def put_thumbnail(self, key: str, width: int, data: bytes) -> None:
        await asyncio.to_thread(self._write_sync, self.path(self.thumbnail_key(key, width)), data)

    @staticmethod
    def _legacy_thumbnail_key(key: str, width: int) -> str:
        """Where thumbnails were cached before they moved beside their blob (a hash, which a scan
        cannot tell from a blob's key): still deleted with their blob; those of blobs deleted since
        go with the sweep of unheld blobs, like any file no one holds."""
        return f"{hashlib.sha256(f'thumbnail:{width}:{key}'.encode()).hexdigest()}.{key.rsplit('.', 1)[1]}"

    def _delete_sync(self, key: str) -> bool:
        existed = False
        thumbnails = [f(key, w) for f in (self.thumbnail_key, self._legacy_thumbnail_key) for w in THUMBNAIL_WIDTHS]
        for name in (key, *thumbnails):
            try:
                self.path(name).unlink()
                existed = existed or name == key
            except FileNotFoundError:
                pass
        return existed

    async def delete(self, key: str) -> bool:
        """Remove a blob and its thumbnails; True if the blob was there. Callers check references first."""
        return await asyncio.to_thread(self._delete_sync, key)

    # ---- the sweep of blobs nobody holds (atelier/deletion.py, sweep_unheld) --------------------

    def scan(self, after: str, limit: int) -> tuple[list["StoredFile"], str]:
        """Up to `limit` files of the store, in a fixed order, starting after the position `after`
        ("" = from the start). Returns them and the position to start from next time ("" when the
        scan reached the end: the next one starts over). Blobs, thumbnails and leftover temporary
        files are listed; anything else (not made by this class) is not. Blocking: run in a thread."""
        found: list[StoredFile] = []
        for top in _sorted_subdirs(self.root):
            if after and top < after[:2]:
                continue
            for sub in _sorted_subdirs(self.root / top):
                folder = f"{top}/{sub}"
                if after and folder < after[:5]:
                    continue
                try:
                    entries = sorted(os.scandir(self.root / top / sub), key=lambda e: e.name)
                except FileNotFoundError:
                    continue
                for entry in entries:
                    position = f"{folder}/{entry.name}"
                    if after and position <= after:
                        continue
                    if not (_KEY.fullmatch(entry.name) or _THUMBNAIL.fullmatch(entry.name)
                            or entry.name.startswith((TEMP_PREFIX, SWEEP_PREFIX))):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    found.append(StoredFile(entry.name, st.st_mtime, entry.path))
                    if len(found) >= limit:
                        return found, position
        return found, ""

    def delete_if_older(self, key: str, cutoff: float) -> bool:
        """Delete blob `key` and its thumbnails only if it was last stored before `cutoff` (a Unix
        time), atomically with respect to `put`: the blob is moved aside first and its time read
        there; a `put` of the same bytes meanwhile either refreshed the time before the move (then
        the blob is moved back) or found no file and wrote a new one. True if deleted.
        Callers check that no one holds it. Blocking: run in a thread."""
        final = self.path(key)
        aside = final.with_name(SWEEP_PREFIX + key)
        try:
            os.rename(final, aside)
        except FileNotFoundError:
            return False
        if os.stat(aside).st_mtime >= cutoff:
            os.replace(aside, final)  # stored again a moment ago: it stays (same bytes if rewritten)
            return False
        os.unlink(aside)
        self._delete_sync(key)  # its thumbnails
        return True

    def unlink_if_older(self, path: str, cutoff: float) -> bool:
        """Remove one thumbnail or leftover temporary file if untouched since `cutoff`."""
        try:
            if os.stat(path).st_mtime >= cutoff:
                return False
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False

    def sweep_position(self) -> str:
        """Where the last sweep's scan stopped ("" = the start): kept in the store, which every
        worker sharing it sees."""
        try:
            return (self.root / SWEEP_POSITION_FILE).read_text().strip()[:300]
        except (FileNotFoundError, UnicodeDecodeError):
            return ""

    def set_sweep_position(self, position: str) -> None:
        self._write_sync(self.root / SWEEP_POSITION_FILE, position.encode())

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


@dataclass
class StoredFile:
    name: str
    mtime: float
    path: str

    @property
    def is_blob(self) -> bool:
        return bool(_KEY.fullmatch(self.name))


def _sorted_subdirs(folder: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(folder) if _SUBDIR.fullmatch(e.name) and e.is_dir())
    except FileNotFoundError:
        return []
