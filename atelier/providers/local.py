"""The offline default provider: a Pillow compositor. NO AI, and every output says so.

photography: the subject photo fitted onto a studio backdrop, colour graded.
fitting: the garment images scaled and alpha-blended over the person image.
It waits `delay_s` (cancellable) so the rest of the system sees a realistic latency.

It waits first and reads its inputs after, so a thousand waiting calls hold no image (only
their existence is checked before the wait), and it composes cheaply (a few tens of ms of
CPU at the output size): JPEG inputs are decoded at reduced scale straight to about the size
they are drawn at, the backdrop, its grade and the label are made once per palette and size,
and the grade of the subject is one lookup table (docs/benchmarks.md, "Local provider").
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import math

from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont, ImageOps

from atelier.blobstore import BlobNotFound, BlobStore, InvalidBlobKey
from atelier.errors import BadImage, InvalidRequest, ProviderRejected
from atelier.messages import Kind
from atelier.providers.base import GeneratedImage, GenerationInput

LABEL = "Atelier local preview - no AI"
PORTRAIT_SIZE = (1024, 1280)
_MAX_FITTING_SIDE = 1280
_SUBJECT_BOX = (int(PORTRAIT_SIZE[0] * 0.82), int(PORTRAIT_SIZE[1] * 0.8))
# Speed over size: outputs are previews; no optimize pass (it doubles the encode's CPU).
_JPEG_OPTIONS = {"quality": 85}
_CONTRAST, _TINT_WEIGHT, _BRIGHTNESS = 1.08, 0.25, 0.97
# An input is drawn at the size the JPEG decoder gives it if that fills at least this much of its frame.
MIN_FILL = 0.75
# The photography subject may lose up to this much of a side to a centre crop instead of a resample.
_SUBJECT_TRIM = 0.2

# (top, bottom, tint) per backdrop; picked from the style so a style always looks the same.
_PALETTES = [
    ((236, 232, 226), (148, 140, 132), (255, 214, 170)),  # warm grey
    ((210, 222, 236), (58, 72, 96), (190, 210, 255)),     # cool blue
    ((238, 226, 214), (120, 88, 66), (255, 196, 150)),    # tan
    ((60, 60, 66), (12, 12, 16), (220, 220, 235)),        # low key
    ((230, 236, 228), (96, 116, 100), (214, 240, 206)),   # sage
]


class LocalProvider:
    name = "local"

    def __init__(self, blobs: BlobStore, *, delay_s: float) -> None:
        self._blobs = blobs
        self._delay_s = max(0.0, delay_s)

    async def aclose(self) -> None:
        return None

    async def _check_inputs(self, request: GenerationInput) -> None:
        for index, stored in enumerate(request.images, start=1):
            if not await asyncio.to_thread(self._blobs.exists, stored.key):
                raise ProviderRejected(f"input image {index} ({stored.key!r}) is not in the blob store")

    async def _read(self, request: GenerationInput) -> list[bytes]:
        datas: list[bytes] = []
        for index, stored in enumerate(request.images, start=1):
            try:
                data = await self._blobs.get(stored.key)
            except (BlobNotFound, InvalidBlobKey):
                raise ProviderRejected(f"input image {index} ({stored.key!r}) is not in the blob store") from None
            if not data:
                raise ProviderRejected(f"input image {index} ({stored.key!r}) is empty")
            datas.append(data)
        if len(datas) != len(request.images):
            raise ProviderRejected(f"{len(request.images)} input images given but {len(datas)} read")
        return datas

    async def generate(self, request: GenerationInput) -> list[GeneratedImage]:
        if request.kind not in (Kind.PHOTOGRAPHY.value, Kind.FITTING.value):
            raise InvalidRequest(f"unknown generation kind: {request.kind!r}")
        if request.kind == Kind.FITTING.value and len(request.images) < 2:
            raise ProviderRejected("fitting needs a photo of a person and at least one garment photo")
        await self._check_inputs(request)
        # Simulate the AI's latency first, holding nothing; cancellable like a real call.
        await asyncio.sleep(self._delay_s)
        datas = await self._read(request)
        style = request.style or request.parameters.get("style", "") or request.prompt
        if request.kind == Kind.PHOTOGRAPHY.value:
            data = await asyncio.to_thread(compose_photography, datas, style)
        else:
            data = await asyncio.to_thread(compose_fitting, datas[0], datas[1:])
        return [GeneratedImage(data=data, mime_type="image/jpeg")]


def _decode(data: bytes, box: tuple[int, int], index: int, *, trim: float = 0.0) -> Image.Image:
    """The image at about the size that fits `box`, RGB or RGBA, as cheaply as it looks right.

    A JPEG is decoded at 1/2, 1/4 or 1/8 scale when that still gives at least MIN_FILL of the
    fitted size (libjpeg's DCT scaling: a fraction of a full decode). What the decoder gives is
    used as is when it fits the box and fills at least MIN_FILL of the fitted size; else it is
    centre-cropped to the box when that trims at most `trim` of a side; else resampled (bilinear)
    to fit: a resample costs as much as the decode, so it is the last resort.
    """
    try:
        with Image.open(io.BytesIO(data)) as opened:
            fit = min(box[0] / opened.width, box[1] / opened.height)
            if opened.format == "JPEG" and fit < 1:
                opened.draft("RGB", (max(1, math.ceil(opened.width * fit * MIN_FILL)),
                                     max(1, math.ceil(opened.height * fit * MIN_FILL))))
            opened.load()
            image = ImageOps.exif_transpose(opened)  # stored inputs carry none; a copy only if they do
            has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
            image = image.convert("RGBA" if has_alpha else "RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise BadImage(f"input image {index} does not decode") from None
    width, height = image.size
    fit = min(box[0] / width, box[1] / height)
    if fit >= 1 and fit * MIN_FILL <= 1:
        return image  # fits, and fills enough of the box
    if fit < 1 and width * (1 - trim) <= box[0] and height * (1 - trim) <= box[1]:
        crop_w, crop_h = min(width, box[0]), min(height, box[1])
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
        return image.crop((left, top, left + crop_w, top + crop_h))
    size = (max(1, round(width * fit)), max(1, round(height * fit)))
    return image.resize(size, Image.Resampling.BILINEAR)


def _palette(style: str) -> tuple[tuple[int, int, int], ...]:
    digest = hashlib.sha256(style.strip().lower().encode()).digest()
    return _PALETTES[digest[0] % len(_PALETTES)]


@functools.lru_cache(maxsize=8)
def _grade_lut(tint: tuple[int, int, int]) -> list[int]:
    """Contrast around mid grey, then a quarter of the palette's tint multiplied in: per channel
    a straight line, so one `point` instead of three full-image passes."""
    lut: list[int] = []
    for channel_tint in tint:
        mix = (1 - _TINT_WEIGHT) + _TINT_WEIGHT * channel_tint / 255
        lut += [max(0, min(255, round((128 + (v - 128) * _CONTRAST) * mix))) for v in range(256)]
    return lut


@functools.lru_cache(maxsize=len(_PALETTES))
def _graded_backdrop(palette: tuple[tuple[int, int, int], ...]) -> Image.Image:
    """The backdrop of one palette, graded; made once (about 30 ms) and copied per output."""
    top, bottom, tint = palette
    size = PORTRAIT_SIZE
    ramp = Image.linear_gradient("L").resize(size)
    backdrop = Image.composite(Image.new("RGB", size, bottom), Image.new("RGB", size, top), ramp)
    # A soft pool of light behind the subject, as a studio strobe would make.
    light = ImageOps.invert(Image.radial_gradient("L").resize(size)).point(lambda v: v * 0.35)
    backdrop = Image.composite(Image.new("RGB", size, (255, 255, 255)), backdrop, light)
    return backdrop.point(_grade_lut(tint))


@functools.lru_cache(maxsize=16)
def _feathered_mask(size: tuple[int, int]) -> Image.Image:
    """A rounded rectangle with soft edges, drawn and blurred at a quarter size, then scaled up."""
    small = (max(1, size[0] // 4), max(1, size[1] // 4))
    inset = max(1, min(small) // 14)
    mask = Image.new("L", small, 0)
    ImageDraw.Draw(mask).rounded_rectangle((inset, inset, small[0] - inset, small[1] - inset),
                                           radius=inset * 2, fill=255)
    return mask.filter(ImageFilter.GaussianBlur(inset / 1.5)).resize(size, Image.Resampling.BILINEAR)


@functools.lru_cache(maxsize=8)
def _label(width: int) -> tuple[Image.Image, Image.Image]:
    """The visible label for an output `width` wide, as a patch and its alpha: nobody may mistake
    this output for an AI's."""
    font = ImageFont.load_default(size=max(14, width // 48))
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), LABEL, font=font)
    pad = max(6, width // 150)
    patch = Image.new("RGBA", (right + 2 * pad, bottom - top + 2 * pad), (0, 0, 0, 150))
    ImageDraw.Draw(patch).text((pad, pad - top), LABEL, font=font, fill=(255, 255, 255, 235))
    return patch.convert("RGB"), patch.getchannel("A")


def _stamp(image: Image.Image) -> None:
    """Paste the label in the bottom-left corner, in place."""
    patch, alpha = _label(image.width)
    pad = max(6, image.width // 150)
    image.paste(patch, (pad, image.height - patch.height - pad * 3), alpha)


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", **_JPEG_OPTIONS)
    return out.getvalue()


def compose_photography(images: list[bytes], style: str) -> bytes:
    palette = _palette(style)
    canvas = _graded_backdrop(palette).copy()
    if images:
        subject = _decode(images[0], _SUBJECT_BOX, 1, trim=_SUBJECT_TRIM).convert("RGB").point(_grade_lut(palette[2]))
        x = (canvas.width - subject.width) // 2
        y = canvas.height - subject.height - canvas.height // 14
        canvas.paste(subject, (x, y), _feathered_mask(subject.size))
    _stamp(canvas)
    return _jpeg(canvas)


def _garment_layer(garment: Image.Image) -> tuple[Image.Image, Image.Image]:
    """The garment and its alpha, its background made transparent (product shots are on white)."""
    if garment.mode == "RGBA" and garment.getchannel("A").getextrema()[0] < 250:
        rgb, alpha = garment.convert("RGB"), garment.getchannel("A")
    else:
        rgb = garment.convert("RGB")
        lightest = ImageChops.darker(ImageChops.darker(rgb.getchannel("R"), rgb.getchannel("G")), rgb.getchannel("B"))
        alpha = lightest.point(lambda v: 0 if v > 232 else 255).filter(ImageFilter.GaussianBlur(1.5))
    # Slightly translucent so the person's shape still reads through: a preview, not a render.
    return rgb, alpha.point(lambda v: int(v * 0.88))


def compose_fitting(person: bytes, garments: list[bytes]) -> bytes:
    base = _decode(person, (_MAX_FITTING_SIDE, _MAX_FITTING_SIDE), 1).convert("RGB")
    base = base.point(lambda v: round(v * _BRIGHTNESS))
    # Torso first, then legs, then cycling through the two for further garments.
    anchors = [0.22, 0.55]
    box = (max(1, int(base.width * 0.55)), max(1, int(base.height * 0.42)))
    for index, garment in enumerate(garments):
        rgb, alpha = _garment_layer(_decode(garment, box, index + 2))
        x = (base.width - rgb.width) // 2
        y = max(0, min(int(base.height * anchors[index % len(anchors)]), base.height - rgb.height))
        base.paste(rgb, (x, y), alpha)
    _stamp(base)
    return _jpeg(base)
