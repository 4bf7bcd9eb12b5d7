"""prepare_image: what it accepts, how it normalises, and how it refuses."""

from __future__ import annotations

import io
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, JpegImagePlugin

from atelier.errors import BadImage
from atelier.images import DRAFT_TOLERANCE, PreparedImage, prepare_image, sniff
from tests.fakes import images as fake


def decode(prepared: PreparedImage) -> Image.Image:
    image = Image.open(io.BytesIO(prepared.data))
    image.load()
    return image


# ---- sniffing


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (fake.jpeg(), "image/jpeg"),
        (fake.png(), "image/png"),
        (fake.webp(), "image/webp"),
        (fake.gif(), "image/gif"),
        (fake.SVG, "image/svg+xml"),
        (b"  \n<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"),
        (fake.HTML, "text/html"),
        (b"\xef\xbb\xbf<html><body>hi</body></html>", "text/html"),
        (b'<?xml version="1.0"?><Error><Code>AccessDenied</Code></Error>', "application/xml"),
        (b'{"error": "not found"}', "application/json"),
        (b"%PDF-1.7\n", "application/pdf"),
        (b"\x00\x01\x02\x03garbage\xff\xfe", None),
        (b"", None),
    ],
)
def test_sniff_names_content_from_magic_bytes(data: bytes, expected: str | None) -> None:
    assert sniff(data) == expected


def test_sniff_ignores_what_the_name_or_header_would_say() -> None:
    # A PNG is a PNG whatever it is called; only bytes are looked at.
    assert sniff(fake.png()) == "image/png"
    assert sniff(b"Content-Type: image/jpeg\r\n\r\n") == "text/plain"


# ---- normalising


def test_exif_orientation_6_is_applied() -> None:
    prepared = prepare_image(fake.jpeg_with_orientation(400, 200, orientation=6))
    assert prepared.content_type == "image/jpeg"
    assert (prepared.width, prepared.height) == (200, 400)
    image = decode(prepared)
    assert image.size == (200, 400)
    # Rotated clockwise: the stored left half (red) is now on top, the right half (blue) below.
    top, bottom = image.getpixel((100, 50)), image.getpixel((100, 350))
    assert top[0] > 180 and top[2] < 80
    assert bottom[2] > 180 and bottom[0] < 80
    # The orientation is baked in; no EXIF is carried into the output.
    assert not image.getexif()


def test_twelve_megapixel_jpeg_is_bounded_to_max_side() -> None:
    prepared = prepare_image(fake.big_jpeg(4000, 3000))
    assert prepared.content_type == "image/jpeg"
    # Decoded by libjpeg at 1/2 scale: 2000 px, within DRAFT_TOLERANCE under 2048, no resampling.
    assert (prepared.width, prepared.height) == (2000, 1500)
    assert decode(prepared).size == (2000, 1500)


def test_very_large_jpeg_decodes_at_reduced_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        calls.append((size, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    prepared = prepare_image(fake.jpeg(4200, 1050), max_side=1024)
    assert (prepared.width, prepared.height) == (1024, 256)
    # draft asked for at least the output size less DRAFT_TOLERANCE and libjpeg decoded at 1/4 scale.
    assert calls == [((973, 244), (1050, 263))]


def test_small_image_keeps_its_size_and_is_reencoded() -> None:
    source = fake.jpeg(64, 48)
    prepared = prepare_image(source)
    assert (prepared.width, prepared.height) == (64, 48)
    assert prepared.content_type == "image/jpeg"
    assert decode(prepared).mode == "RGB"


def test_png_with_alpha_stays_png_with_alpha() -> None:
    prepared = prepare_image(fake.png_with_alpha(300, 100), max_side=150)
    assert prepared.content_type == "image/png"
    assert (prepared.width, prepared.height) == (150, 50)
    image = decode(prepared)
    assert image.format == "PNG" and image.mode == "RGBA"
    assert image.getpixel((10, 25))[3] == 255
    assert image.getpixel((140, 25))[3] == 0


def test_palette_png_with_transparent_index_keeps_transparency() -> None:
    prepared = prepare_image(fake.palette_png_with_transparency())
    assert prepared.content_type == "image/png"
    image = decode(prepared)
    assert image.mode == "RGBA"
    assert image.getpixel((0, 0))[3] == 255  # the drawn half
    assert image.getpixel((31, 31))[3] == 0  # the transparent index


def test_opaque_png_becomes_jpeg() -> None:
    prepared = prepare_image(fake.png(64, 48))
    assert prepared.content_type == "image/jpeg"
    assert decode(prepared).format == "JPEG"


def test_cmyk_jpeg_is_converted_to_rgb() -> None:
    prepared = prepare_image(fake.cmyk_jpeg())
    image = decode(prepared)
    assert prepared.content_type == "image/jpeg"
    assert image.mode == "RGB"
    red, green, blue = image.getpixel((40, 30))
    assert red > 200 and green < 100 and blue < 100  # C=0, M=Y=200: a red


def test_sixteen_bit_grey_png_is_scaled_not_clipped() -> None:
    prepared = prepare_image(fake.png_16bit_grey(value=32768))
    value = decode(prepared).getpixel((5, 5))
    assert all(120 <= channel <= 136 for channel in value)


def test_webp_is_accepted() -> None:
    prepared = prepare_image(fake.webp(300, 200), max_side=150)
    assert prepared.content_type == "image/jpeg"
    assert (prepared.width, prepared.height) == (150, 100)


# ---- refusing


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = fake.bomb_png(100_000)
    assert len(bomb) < 1000
    started = time.perf_counter()
    with pytest.raises(BadImage) as caught:
        prepare_image(bomb)
    assert time.perf_counter() - started < 0.5
    assert "10000000000 pixels" in caught.value.message
    assert caught.value.retryable is False


def test_image_over_the_pixel_limit_is_refused_with_its_pixel_count() -> None:
    with pytest.raises(BadImage) as caught:
        prepare_image(fake.png_declaring(8000, 8000), max_pixels=50_000_000)
    assert "64000000 pixels" in caught.value.message
    assert "50000000" in caught.value.message


def test_pixel_limit_is_the_callers_not_pillows() -> None:
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(BadImage, match="10000 pixels"):
        prepare_image(fake.png(100, 100), max_pixels=5_000)
    assert prepare_image(fake.png(100, 100), max_pixels=10_000).width == 100
    assert Image.MAX_IMAGE_PIXELS == before  # the global stays untouched for other callers


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (fake.HTML, "HTML document, not an image"),
        (fake.SVG, "SVG image: only JPEG, PNG and WebP images are accepted"),
        (fake.gif(), "GIF image: only JPEG, PNG and WebP images are accepted"),
        (b'{"error": "expired"}', "JSON document, not an image"),
        (b"\x00\x01\x02\x03\x04garbage", "not a recognised image"),
        (fake.truncated(fake.jpeg(400, 300)), "truncated or corrupt image"),
        (fake.truncated(fake.png(400, 300)), "truncated or corrupt image"),
        (fake.truncated(fake.webp(400, 300)), "truncated or corrupt image"),
        (fake.jpeg()[:3], "truncated or corrupt image"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "truncated or corrupt image"),
        (b"RIFF\0\0\0\0WEBPVP8 garbage", "truncated or corrupt image"),
    ],
    ids=["empty", "html", "svg", "gif", "json", "junk", "trunc-jpeg", "trunc-png", "trunc-webp",
         "jpeg-magic-only", "png-signature-only", "webp-garbage"],
)
def test_refusals_are_bad_image_with_a_clear_message(data: bytes, message: str) -> None:
    with pytest.raises(BadImage) as caught:
        prepare_image(data)
    assert message in caught.value.message
    assert caught.value.retryable is False


# ---- a property: whatever the size, the output fits the bound and keeps the shape


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(min_value=1, max_value=1500),
    height=st.integers(min_value=1, max_value=1500),
    max_side=st.integers(min_value=64, max_value=700),
    as_png=st.booleans(),
)
def test_output_always_within_bounds(width: int, height: int, max_side: int, as_png: bool) -> None:
    data = fake.png(width, height) if as_png else fake.jpeg(width, height)
    prepared = prepare_image(data, max_side=max_side)
    assert 1 <= prepared.width <= max_side and 1 <= prepared.height <= max_side
    assert decode(prepared).size == (prepared.width, prepared.height)
    if max(width, height) <= max_side:
        assert (prepared.width, prepared.height) == (width, height)  # never enlarged
    elif as_png:
        assert max(prepared.width, prepared.height) == max_side
    else:
        # A JPEG may come out of libjpeg's reduced-scale decode up to DRAFT_TOLERANCE under the bound.
        assert max_side * (1 - DRAFT_TOLERANCE) - 1 <= max(prepared.width, prepared.height) <= max_side
    if max(width, height) > max_side:
        # The aspect ratio survives up to rounding to whole pixels, unless the short side would
        # fall under one pixel (then it is kept at one: an image cannot be thinner).
        if min(width, height) * max_side / max(width, height) >= 1:
            ratio_error = abs(prepared.width / prepared.height - width / height)
            assert ratio_error <= (width / height) * (2 / min(prepared.width, prepared.height)) + 1e-9


# ---- metadata (issue 10 #7): only the colour profile survives


SECRET = "SECRET-lat-48.8566-lon-2.3522"


def _source_image(mode: str) -> Image.Image:
    if mode == "RGBA":
        image = Image.new("RGBA", (64, 48), (200, 30, 30, 255))
        image.paste((0, 0, 0, 0), (32, 0, 64, 48))  # really transparent: the output stays PNG
        return image
    return Image.new("RGB", (64, 48), (30, 120, 200))


def _srgb_icc() -> bytes:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def test_a_jpeg_comment_does_not_survive() -> None:
    out = io.BytesIO()
    _source_image("RGB").save(out, "JPEG", comment=SECRET.encode(), icc_profile=_srgb_icc())
    assert SECRET.encode() in out.getvalue() and b"\xff\xfe" in out.getvalue()  # a COM segment
    prepared = prepare_image(out.getvalue())
    assert SECRET.encode() not in prepared.data
    assert b"\xff\xfe" not in prepared.data[: prepared.data.find(b"\xff\xda")]  # no COM before the scan
    assert "comment" not in decode(prepared).info
    assert decode(prepared).info.get("icc_profile") == _srgb_icc()  # the colour profile is kept


@pytest.mark.parametrize("mode", ["RGB", "RGBA"], ids=["opaque-becomes-jpeg", "transparent-stays-png"])
def test_png_text_chunks_do_not_survive(mode: str) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("comment", SECRET + "-tEXt")  # "comment" is what a JPEG encoder would pick up
    info.add_text("Description", SECRET + "-zTXt", zip=True)
    info.add_itxt("Author", SECRET + "-iTXt", lang="en", tkey="Autor")
    info.add_itxt("XML:com.adobe.xmp", f"<x:xmpmeta>{SECRET}-xmp</x:xmpmeta>")
    out = io.BytesIO()
    _source_image(mode).save(out, "PNG", pnginfo=info, icc_profile=_srgb_icc())
    source = out.getvalue()
    assert all(chunk in source for chunk in (b"tEXt", b"zTXt", b"iTXt"))

    prepared = prepare_image(source)
    assert prepared.content_type == ("image/png" if mode == "RGBA" else "image/jpeg")
    assert b"SECRET" not in prepared.data
    assert all(chunk not in prepared.data for chunk in (b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"\xff\xfe"))
    image = decode(prepared)
    assert not {"comment", "Description", "Author", "XML:com.adobe.xmp", "xmp"} & set(image.info)
    assert image.info.get("icc_profile") == _srgb_icc()
