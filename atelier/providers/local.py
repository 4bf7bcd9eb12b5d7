"""The offline default provider: a Pillow compositor. NO AI, and every output says so.

photography: the subject photo fitted onto a studio backdrop, colour graded.
fitting: the garment images scaled and alpha-blended over the person image.
It waits `delay_s` (cancellable) so the rest of the system sees a realistic latency.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import time

from PIL import Image, ImageChops, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from atelier.blobstore import BlobNotFound, BlobStore, InvalidBlobKey
from atelier.errors import BadImage, InvalidRequest, ProviderRejected
from atelier.messages import Kind
from atelier.providers.base import GeneratedImage, GenerationInput

LABEL = "Atelier local preview - no AI"
PORTRAIT_SIZE = (1024, 1280)
_MAX_INPUT_SIDE = 1536
_MAX_FITTING_SIDE = 1280

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

    async def _load_images(self, request: GenerationInput) -> list[Image.Image]:
        """The one conversion: stored image references -> decoded Pillow images."""
        images: list[Image.Image] = []
        for index, stored in enumerate(request.images, start=1):
            try:
                data = await self._blobs.get(stored.key)
            except (BlobNotFound, InvalidBlobKey):
                raise ProviderRejected(f"input image {index} ({stored.key!r}) is not in the blob store") from None
            if not data:
                raise ProviderRejected(f"input image {index} ({stored.key!r}) is empty")
            try:
                images.append(await asyncio.to_thread(_decode, data))
            except (OSError, ValueError, Image.DecompressionBombError):
                raise BadImage(f"input image {index} ({stored.key!r}) does not decode") from None
        if len(images) != len(request.images):
            raise ProviderRejected(f"{len(request.images)} input images given but {len(images)} converted")
        return images

    async def generate(self, request: GenerationInput) -> list[GeneratedImage]:
        started = time.monotonic()
        if request.kind not in (Kind.PHOTOGRAPHY.value, Kind.FITTING.value):
            raise InvalidRequest(f"unknown generation kind: {request.kind!r}")
        if request.kind == Kind.FITTING.value and len(request.images) < 2:
            raise ProviderRejected("fitting needs a photo of a person and at least one garment photo")
        images = await self._load_images(request)
        style = request.style or request.parameters.get("style", "") or request.prompt
        if request.kind == Kind.PHOTOGRAPHY.value:
            data = await asyncio.to_thread(compose_photography, images, style)
        else:
            data = await asyncio.to_thread(compose_fitting, images[0], images[1:])
        # Simulate the AI's latency; cancellable like a real call.
        await asyncio.sleep(max(0.0, self._delay_s - (time.monotonic() - started)))
        return [GeneratedImage(data=data, mime_type="image/jpeg")]


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as opened:
        image = ImageOps.exif_transpose(opened)
        image.thumbnail((_MAX_INPUT_SIDE, _MAX_INPUT_SIDE), Image.Resampling.LANCZOS)
        has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
        return image.convert("RGBA" if has_alpha else "RGB")


def _palette(style: str) -> tuple[tuple[int, int, int], ...]:
    digest = hashlib.sha256(style.strip().lower().encode()).digest()
    return _PALETTES[digest[0] % len(_PALETTES)]


def _backdrop(size: tuple[int, int], top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    width, height = size
    ramp = Image.linear_gradient("L").resize((width, height))
    backdrop = Image.composite(Image.new("RGB", size, bottom), Image.new("RGB", size, top), ramp)
    # A soft pool of light behind the subject, as a studio strobe would make.
    light = ImageOps.invert(Image.radial_gradient("L").resize(size)).point(lambda v: v * 0.35)
    return Image.composite(Image.new("RGB", size, (255, 255, 255)), backdrop, light)


def _feathered_mask(size: tuple[int, int]) -> Image.Image:
    width, height = size
    inset = max(4, min(size) // 14)
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rounded_rectangle((inset, inset, width - inset, height - inset), radius=inset * 2, fill=255)
    return mask.filter(ImageFilter.GaussianBlur(inset / 1.5))


def _stamp(image: Image.Image) -> Image.Image:
    """The visible label: nobody may mistake this output for an AI's."""
    image = image.convert("RGBA")
    font = ImageFont.load_default(size=max(14, image.width // 48))
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    left, top, right, bottom = draw.textbbox((0, 0), LABEL, font=font)
    pad = max(6, image.width // 150)
    x, y = pad * 2, image.height - (bottom - top) - pad * 4
    draw.rectangle((x - pad, y - pad + top, x + right + pad, y + bottom + pad), fill=(0, 0, 0, 150))
    draw.text((x, y), LABEL, font=font, fill=(255, 255, 255, 235))
    return Image.alpha_composite(image, overlay).convert("RGB")


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90, optimize=True)
    return out.getvalue()


def compose_photography(images: list[Image.Image], style: str) -> bytes:
    top, bottom, tint = _palette(style)
    canvas = _backdrop(PORTRAIT_SIZE, top, bottom)
    if images:
        subject = images[0].convert("RGB")
        subject = ImageOps.contain(subject, (int(canvas.width * 0.82), int(canvas.height * 0.8)),
                                   Image.Resampling.LANCZOS)
        x = (canvas.width - subject.width) // 2
        y = canvas.height - subject.height - canvas.height // 14
        canvas.paste(subject, (x, y), _feathered_mask(subject.size))
    # Colour grade: a touch of contrast and saturation, then the palette's tint.
    graded = ImageEnhance.Contrast(canvas).enhance(1.08)
    graded = ImageEnhance.Color(graded).enhance(1.1)
    graded = Image.blend(graded, ImageChops.multiply(graded, Image.new("RGB", graded.size, tint)), 0.25)
    return _jpeg(_stamp(graded))


def _garment_layer(garment: Image.Image) -> Image.Image:
    """The garment with its background made transparent (product shots are on white)."""
    if garment.mode == "RGBA" and garment.getchannel("A").getextrema()[0] < 250:
        layer = garment
    else:
        rgb = garment.convert("RGB")
        lightest = ImageChops.darker(ImageChops.darker(rgb.getchannel("R"), rgb.getchannel("G")), rgb.getchannel("B"))
        alpha = lightest.point(lambda v: 0 if v > 232 else 255).filter(ImageFilter.GaussianBlur(1.5))
        layer = rgb.convert("RGBA")
        layer.putalpha(alpha)
    # Slightly translucent so the person's shape still reads through: a preview, not a render.
    alpha = layer.getchannel("A").point(lambda v: int(v * 0.88))
    layer = layer.copy()
    layer.putalpha(alpha)
    return layer


def compose_fitting(person: Image.Image, garments: list[Image.Image]) -> bytes:
    base = ImageOps.contain(person.convert("RGB"), (_MAX_FITTING_SIDE, _MAX_FITTING_SIDE), Image.Resampling.LANCZOS)
    base = ImageEnhance.Brightness(base).enhance(0.97).convert("RGBA")
    # Torso first, then legs, then cycling through the two for further garments.
    anchors = [0.22, 0.55]
    for index, garment in enumerate(garments):
        layer = _garment_layer(garment)
        layer = ImageOps.contain(layer, (int(base.width * 0.55), int(base.height * 0.42)), Image.Resampling.LANCZOS)
        x = (base.width - layer.width) // 2
        y = min(int(base.height * anchors[index % len(anchors)]), base.height - layer.height)
        shaped = Image.new("RGBA", base.size, (0, 0, 0, 0))
        shaped.paste(layer, (x, y))
        base = Image.alpha_composite(base, shaped)
    return _jpeg(_stamp(base))
