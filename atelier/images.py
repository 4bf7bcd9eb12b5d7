"""Check, decode and normalise one input image.

`prepare_image` is the one place bytes from a user become an image we store: it accepts
JPEG, PNG and WebP (told apart by their first bytes, never by a Content-Type header),
refuses decompression bombs before decoding, applies the EXIF orientation, bounds the
longest side and re-encodes: PNG when the image has transparency, JPEG otherwise.
Re-encoding drops all metadata (EXIF with its GPS position, XMP, JPEG comments, PNG text
chunks) but the colour profile.

It is synchronous and CPU-bound: callers run it in a thread.
"""

from __future__ import annotations

import asyncio

import io
import math
from dataclasses import dataclass

from PIL import Image, ImageOps

from atelier.blobstore import BlobStore
from atelier.errors import BadImage
from atelier.messages import StoredImage

JPEG = "image/jpeg"
PNG = "image/png"
WEBP = "image/webp"
ACCEPTED = {JPEG: "JPEG", PNG: "PNG", WEBP: "WEBP"}  # content type -> Pillow format
JPEG_QUALITY = 90
# How far under max_side a JPEG may come out when that lets libjpeg decode it at 1/2, 1/4 or
# 1/8 scale: a 4000-px photo then decodes a quarter of its pixels and needs no resampling
# (2000 px instead of 2048; see docs/benchmarks.md, image pipeline).
DRAFT_TOLERANCE = 0.05

# What other things are called in errors; documents are "not an image", images "not accepted".
_DOCUMENTS = {
    "text/html": "HTML document",
    "application/xml": "XML document",
    "application/json": "JSON document",
    "application/pdf": "PDF document",
    "text/plain": "text file",
}
_OTHER_IMAGES = {
    "image/gif": "GIF image",
    "image/svg+xml": "SVG image",
    "image/bmp": "BMP image",
    "image/tiff": "TIFF image",
    "image/heic": "HEIC image",
    "image/avif": "AVIF image",
    "image/x-icon": "ICO image",
}
_HTML_MARKERS = ("<!doctype html", "<html", "<head", "<body", "<title", "<script", "<meta", "<div", "<p>")


@dataclass
class PreparedImage:
    data: bytes
    content_type: str
    width: int
    height: int


def sniff(data: bytes) -> str | None:
    """The content type the first bytes of `data` announce, or None when unrecognised."""
    if data.startswith(b"\xff\xd8\xff"):
        return JPEG
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return WEBP
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data.startswith(b"%PDF-"):
        return "application/pdf"
    if data[:2] == b"BM" and len(data) >= 14:
        return "image/bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    if data[:4] == b"\x00\x00\x01\x00":
        return "image/x-icon"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in (b"avif", b"avis"):
            return "image/avif"
        if brand in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
            return "image/heic"
        return None
    return _sniff_text(data[:1024])


def _sniff_text(head: bytes) -> str | None:
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    text = head.decode("utf-8", errors="replace").lstrip().lower()
    if not text:
        return None
    if text.startswith("<"):
        if "<svg" in text:
            return "image/svg+xml"
        if text.startswith("<?xml") and not any(marker in text for marker in _HTML_MARKERS):
            return "application/xml"
        return "text/html"
    if text[0] in "{[":
        return "application/json"
    # A multi-byte character cut at the end of the head is the only replacement allowed.
    if "\ufffd" not in text[:-4] and all(c.isprintable() or c in "\r\n\t" for c in text[:-4]):
        return "text/plain"
    return None


def describe(content_type: str | None) -> str:
    """Why bytes of this sniffed type are refused, in words for the user."""
    if content_type in _DOCUMENTS:
        return f"{_DOCUMENTS[content_type]}, not an image"
    if content_type in _OTHER_IMAGES:
        return f"{_OTHER_IMAGES[content_type]}: only JPEG, PNG and WebP images are accepted"
    return "not a recognised image: only JPEG, PNG and WebP images are accepted"


def prepare_image(data: bytes, *, max_side: int = 2048, max_pixels: int = 50_000_000) -> PreparedImage:
    """Decode `data`, fix its orientation, bound its longest side to `max_side` and re-encode it.

    Raises BadImage (not retryable) for anything that is not an acceptable, intact image,
    including one that declares more than `max_pixels` pixels. Pillow's global
    MAX_IMAGE_PIXELS is left alone, so a `max_pixels` above twice it (about 179 million)
    is capped by Pillow's own check, which is reported as the same BadImage.
    """
    if not data:
        raise BadImage("empty file")
    content_type = sniff(data)
    if content_type not in ACCEPTED:
        raise BadImage(describe(content_type))
    try:
        image = _decode(data, content_type, max_side=max_side, max_pixels=max_pixels)
        return _encode(_bound(_normalise_mode(image), max_side))
    except BadImage:
        raise
    except Image.DecompressionBombError as exc:
        raise BadImage(f"image declares too many pixels, possible decompression bomb: {exc}") from None
    except MemoryError:
        raise BadImage("image too large to decode") from None
    except Exception:  # Pillow's decoders raise OSError, SyntaxError, ValueError, struct.error...
        raise BadImage("truncated or corrupt image") from None


def _decode(data: bytes, content_type: str, *, max_side: int, max_pixels: int) -> Image.Image:
    # Only the header is read here; Pillow's own bomb check (at 2x its global limit) may raise.
    image = Image.open(io.BytesIO(data), formats=[ACCEPTED[content_type]])
    width, height = image.size
    if width < 1 or height < 1:
        raise BadImage(f"image declares an empty canvas ({width}x{height})")
    if width * height > max_pixels:
        raise BadImage(f"image declares {width}x{height} = {width * height} pixels, more than the "
                       f"{max_pixels} allowed (possible decompression bomb)")
    longest = max(width, height)
    if content_type == JPEG and longest > max_side:
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale, never more than DRAFT_TOLERANCE under
        # the size we need (draft keeps at least the size asked for).
        scale = max_side * (1 - DRAFT_TOLERANCE) / longest
        image.draft("RGB", (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))))
    image.load()
    try:
        ImageOps.exif_transpose(image, in_place=True)  # in place: no full-size copy
    except Exception:
        pass  # unreadable EXIF: the pixels are fine, keep them as stored
    return image


def _normalise_mode(image: Image.Image) -> Image.Image:
    """One of L, LA, RGB, RGBA or CMYK, with transparency (palette or tRNS) as a real alpha channel."""
    mode = image.mode
    if mode in ("L", "LA", "RGB", "RGBA", "CMYK") and "transparency" not in image.info:
        return image
    if mode.startswith("I;16") or mode == "I":
        image = image.convert("I")
        _, high = image.getextrema()
        # 16-bit grey is scaled to 8 bits, not clipped to white.
        return (image.point(lambda v: v * (1 / 256)) if high > 255 else image).convert("L")
    if mode in ("1", "F"):
        return image.convert("L")
    if mode in ("P", "PA", "RGBa", "La", "L", "LA", "RGB", "RGBA") and (
            "A" in mode or "a" in mode or "transparency" in image.info):
        return image.convert("RGBA")
    return image.convert("RGB")


def _bound(image: Image.Image, max_side: int) -> Image.Image:
    width, height = image.size
    longest = max(width, height)
    if longest <= max_side:
        return image
    scale = max_side / longest
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _encode(image: Image.Image) -> PreparedImage:
    icc = image.info.get("icc_profile")
    # An ICC profile describes the source's colour space; keep it only where the output is RGB too.
    keep_icc = icc if isinstance(icc, bytes) and icc[16:20] == b"RGB " else None
    if image.mode in ("RGBA", "LA"):
        alpha_min, _ = image.getchannel("A").getextrema()
        if alpha_min < 255:
            return _save(image.convert("RGBA"), "PNG", icc_profile=keep_icc)
        # An alpha channel opaque everywhere: a JPEG loses nothing.
    if image.mode == "CMYK":
        return _save(_cmyk_to_rgb(image, icc), "JPEG", icc_profile=None, quality=JPEG_QUALITY)
    return _save(image.convert("RGB"), "JPEG", icc_profile=keep_icc, quality=JPEG_QUALITY)


def _cmyk_to_rgb(image: Image.Image, icc: object) -> Image.Image:
    if isinstance(icc, bytes):
        try:
            from PIL import ImageCms

            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:
            pass  # a broken or missing profile: the plain conversion below is close enough
    return image.convert("RGB")


def _save(image: Image.Image, fmt: str, *, icc_profile: bytes | None, **options) -> PreparedImage:
    out = io.BytesIO()
    # Encoders pick some metadata from `info` (the JPEG encoder writes info["comment"], which a
    # PNG's text chunk can set too): nothing read from the input may reach the output.
    image.info = {}
    if icc_profile:
        options["icc_profile"] = icc_profile
    image.save(out, fmt, **options)
    return PreparedImage(data=out.getvalue(), content_type=JPEG if fmt == "JPEG" else PNG,
                         width=image.width, height=image.height)


async def store_image(blobs: BlobStore, data: bytes, *, max_side: int, max_pixels: int) -> StoredImage:
    """Check and normalise `data` (off the event loop), put it in the blob store and return its
    reference: the one way bytes from a user or a provider become a stored image."""
    prepared = await asyncio.to_thread(prepare_image, data, max_side=max_side, max_pixels=max_pixels)
    key = await blobs.put(prepared.data, prepared.content_type)
    return StoredImage(key=key, content_type=prepared.content_type, width=prepared.width,
                       height=prepared.height, size=len(prepared.data))
