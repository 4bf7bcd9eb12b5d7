"""Test images made in memory: well-formed ones of each kind we accept, and the hostile or
broken ones we must refuse. Nothing here touches the disk or the network."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image, ImageDraw

ORIENTATION_TAG = 0x0112


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def two_tone(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """Left half red, right half blue: enough to tell orientation and colour apart."""
    image = Image.new("RGB", (width, height), (220, 30, 30))
    ImageDraw.Draw(image).rectangle((width // 2, 0, width, height), fill=(30, 30, 220))
    return image.convert(mode) if mode != "RGB" else image


def jpeg(width: int = 64, height: int = 48, *, quality: int = 85, mode: str = "RGB", **options) -> bytes:
    return _encode(two_tone(width, height, mode), "JPEG", quality=quality, **options)


def jpeg_with_orientation(width: int = 400, height: int = 200, orientation: int = 6) -> bytes:
    """A JPEG stored `width`x`height` whose EXIF says to display it rotated (6: 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    return _encode(two_tone(width, height), "JPEG", quality=85, exif=exif.tobytes())


def big_jpeg(width: int = 4000, height: int = 3000) -> bytes:
    """A 12-megapixel JPEG (by default), cheap to make: flat colours compress and encode fast."""
    return jpeg(width, height, quality=80)


def cmyk_jpeg(width: int = 80, height: int = 60) -> bytes:
    return _encode(Image.new("CMYK", (width, height), (0, 200, 200, 0)), "JPEG", quality=90)


def png(width: int = 64, height: int = 48, mode: str = "RGB") -> bytes:
    return _encode(two_tone(width, height, mode), "PNG")


def png_with_alpha(width: int = 64, height: int = 48) -> bytes:
    """An RGBA PNG: opaque left half, fully transparent right half."""
    image = Image.new("RGBA", (width, height), (10, 200, 10, 255))
    ImageDraw.Draw(image).rectangle((width // 2, 0, width, height), fill=(0, 0, 0, 0))
    return _encode(image, "PNG")


def palette_png_with_transparency(width: int = 32, height: int = 32) -> bytes:
    image = Image.new("P", (width, height), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    ImageDraw.Draw(image).rectangle((0, 0, width // 2, height), fill=1)
    return _encode(image, "PNG", transparency=0)


def png_16bit_grey(width: int = 32, height: int = 32, value: int = 32768) -> bytes:
    return _encode(Image.new("I;16", (width, height), value), "PNG")


def webp(width: int = 64, height: int = 48) -> bytes:
    return _encode(two_tone(width, height), "WEBP", quality=80)


def gif(width: int = 16, height: int = 16) -> bytes:
    return _encode(two_tone(width, height).convert("P"), "GIF")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_declaring(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header declares `width`x`height` (8-bit RGB) but whose data is
    a few bytes: decoding it would allocate the whole canvas. Built by hand, so making it
    allocates nothing."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\0" * 1024)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data)
            + _png_chunk(b"IEND", b""))


def bomb_png(side: int = 100_000) -> bytes:
    """A decompression bomb: a 10-gigapixel canvas in a few hundred bytes."""
    return png_declaring(side, side)


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: max(1, int(len(data) * keep))]


HTML = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Log in to see this</body></html>"
SVG = (b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" '
       b'height="10"><rect width="10" height="10"/></svg>')
