"""Upload decoding: every supported format and mode is converted deterministically; every bad input
gets its own 4xx reason, with the limit, before any pixel of an oversized image is decoded."""

from __future__ import annotations

import io
import struct
import zlib
from http import HTTPStatus

import numpy as np
import pytest
from PIL import Image, ImageFile

from models.images import (
    GREY_ROWS,
    ImageLimits,
    ImageRejectedError,
    bytes_per_pixel,
    decode_image,
    decoded_bytes,
    to_pixels,
)

LIMITS = ImageLimits(max_bytes=2_000_000, max_pixels=1_000_000)
RGB = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8))


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring ``width`` x ``height``, with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


ACCEPTED = {
    "png-rgb": encode(RGB, "PNG"),
    "png-rgba": encode(RGB.convert("RGBA"), "PNG"),
    "png-grey": encode(RGB.convert("L"), "PNG"),
    "png-grey-alpha": encode(RGB.convert("LA"), "PNG"),
    "png-palette": encode(RGB.convert("P"), "PNG"),
    "png-palette-transparency": encode(RGB.convert("P"), "PNG", transparency=0),
    "png-1bit": encode(RGB.convert("1"), "PNG"),
    "png-16bit-grey": encode(Image.fromarray(
        (np.arange(48 * 80).reshape(48, 80) * 17).astype(np.uint16)), "PNG"),
    "jpeg-rgb": encode(RGB, "JPEG", quality=90),
    "jpeg-grey": encode(RGB.convert("L"), "JPEG"),
    "jpeg-cmyk": encode(RGB.convert("CMYK"), "JPEG"),
    "webp-lossy": encode(RGB, "WEBP"),
    "webp-lossless-rgba": encode(RGB.convert("RGBA"), "WEBP", lossless=True),
    "tiny-1x1": encode(Image.new("RGB", (1, 1), (5, 6, 7)), "PNG"),
    "wide-3000x2": encode(Image.new("RGB", (3000, 2), (9, 9, 9)), "PNG"),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_every_supported_format_and_mode_becomes_model_input(name):
    decoded = decode_image(ACCEPTED[name], LIMITS)
    assert decoded.image.mode == "RGB"
    assert decoded.format in ("PNG", "JPEG", "WEBP")
    pixels = to_pixels(decoded.image, 64)
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    again = to_pixels(decode_image(ACCEPTED[name], LIMITS).image, 64)
    assert np.array_equal(pixels, again), "conversion must be deterministic"


def test_reported_mode_and_size_are_those_of_the_file():
    decoded = decode_image(ACCEPTED["png-grey-alpha"], LIMITS)
    assert (decoded.format, decoded.mode, decoded.width, decoded.height) == ("PNG", "LA", 80, 48)
    assert decoded.bytes == len(ACCEPTED["png-grey-alpha"])


def test_transparency_is_composited_onto_white_and_grey_is_replicated():
    clear = Image.new("RGBA", (4, 4), (200, 0, 0, 0))
    assert to_pixels(decode_image(encode(clear, "PNG"), LIMITS).image, 4).min() == 255
    grey = decode_image(ACCEPTED["png-grey"], LIMITS).image
    pixels = np.asarray(grey)
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2])


def test_16bit_grey_is_scaled_not_clipped():
    ramp = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    pixels = np.asarray(decode_image(encode(ramp, "PNG"), LIMITS).image)[0, :, 0]
    assert pixels.tolist() == [0, 128, 255]


def test_lossless_formats_give_identical_model_input():
    png = to_pixels(decode_image(encode(RGB, "PNG"), LIMITS).image, 64)
    webp = to_pixels(decode_image(encode(RGB, "WEBP", lossless=True), LIMITS).image, 64)
    assert np.array_equal(png, webp)


def zero_size_jpeg() -> bytes:
    data = bytearray(encode(Image.new("RGB", (8, 8)), "JPEG"))
    frame = data.index(b"\xff\xc0")
    data[frame + 5:frame + 9] = b"\0\0\0\0"  # height, width
    return bytes(data)


def zero_size_webp() -> bytes:
    data = bytearray(encode(Image.new("RGB", (8, 8)), "WEBP"))
    data[26:30] = b"\0\0\0\0"  # VP8 width, height
    return bytes(data)


REJECTED = {
    "not-an-image": (b"hello, plain text", HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "not a PNG, JPEG or WebP"),
    "gif": (encode(RGB, "GIF"), HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "not a PNG, JPEG or WebP"),
    "empty": (b"", HTTPStatus.BAD_REQUEST, "empty (0 bytes)"),
    "truncated-png": (ACCEPTED["png-rgb"][:300], HTTPStatus.BAD_REQUEST, "truncated"),
    "truncated-jpeg": (ACCEPTED["jpeg-rgb"][:400], HTTPStatus.BAD_REQUEST, "corrupt"),
    "truncated-webp": (ACCEPTED["webp-lossy"][:60], HTTPStatus.BAD_REQUEST, "corrupt"),
    "png-signature-then-junk": (b"\x89PNG\r\n\x1a\n" + b"junk" * 8, HTTPStatus.BAD_REQUEST, "corrupt"),
    "over-byte-limit": (b"\x89PNG" + b"\0" * LIMITS.max_bytes, HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"the limit is {LIMITS.max_bytes:,} bytes"),
    "over-pixel-limit": (encode(Image.new("L", (1001, 1000)), "PNG"), HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                         f"the limit is {LIMITS.max_pixels:,} pixels"),
    # A few hundred bytes declaring 50,000 x 50,000: refused from the header, never decoded.
    "decompression-bomb": (png_header_only(50_000, 50_000), HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"the limit is {LIMITS.max_pixels:,} pixels"),
    "bomb-under-pillow-guard": (png_header_only(5_000, 5_000), HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                "5000x5000 = 25,000,000 pixels"),
    "zero-width-png": (png_header_only(0, 10), HTTPStatus.BAD_REQUEST, "0x10 pixels; it needs at least 1x1"),
    "zero-size-jpeg": (zero_size_jpeg(), HTTPStatus.BAD_REQUEST, "0x0 pixels"),
    "zero-size-webp": (zero_size_webp(), HTTPStatus.BAD_REQUEST, "0x0 pixels"),
}


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_every_bad_input_is_rejected_with_its_reason(name):
    data, status, message = REJECTED[name]
    with pytest.raises(ImageRejectedError) as caught:
        decode_image(data, LIMITS)
    assert caught.value.status == status
    assert message in str(caught.value)


# Decode memory (issue 13, finding 5): a budget in bytes of the decoded image, by its stored mode.

def png_header(width: int, height: int, bit_depth: int = 8, colour_type: int = 0) -> bytes:
    """A PNG signature and IHDR declaring ``width`` x ``height`` at ``bit_depth`` (colour type 0: grey,
    2: RGB), with a tiny IDAT: decoding it would fail as truncated."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    """Fails the test if Pillow starts decoding pixels."""
    def refuse(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_16bit_4096_png_is_refused_from_its_header_before_decoding(no_pixel_decoding):
    """The probe's file: 4096 x 4096 16-bit grey, a few hundred bytes that declare 32 MiB of pixels."""
    limits = ImageLimits(max_bytes=1 << 20, max_pixels=4096 * 4096, max_decode_bytes=16 << 20)
    data = png_header(4096, 4096, bit_depth=16)
    assert len(data) < 1000
    with pytest.raises(ImageRejectedError) as caught:
        decode_image(data, limits, 64)
    assert caught.value.status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    assert "4096x4096 pixels of mode I;16 (2 bytes per pixel): decoding it takes 33,554,432 bytes" in str(
        caught.value)
    assert f"the limit is {16 << 20:,} bytes" in str(caught.value)


def test_bytes_per_pixel_follow_pillows_storage():
    assert [bytes_per_pixel(m) for m in ("1", "L", "P", "I;16", "I;16B", "LA", "RGB", "RGBA", "CMYK", "I",
                                         "F")] == [1, 1, 1, 2, 2, 4, 4, 4, 4, 4, 4]
    assert decoded_bytes("I;16", 4096, 4096) == 32 << 20


BUDGET_CASES = {
    "grey-8bit": (RGB.convert("L"), 1),
    "grey-16bit": (Image.fromarray((np.arange(48 * 80).reshape(48, 80) * 17).astype(np.uint16)), 2),
    "palette": (RGB.convert("P"), 1),
    "rgb": (RGB, 4),
    "rgba": (RGB.convert("RGBA"), 4),
}


@pytest.mark.parametrize("name", sorted(BUDGET_CASES))
def test_decode_budget_accepts_at_and_refuses_past_its_edge(name):
    image, per_pixel = BUDGET_CASES[name]
    data = encode(image, "PNG")
    cost = 80 * 48 * per_pixel
    at = ImageLimits(max_bytes=LIMITS.max_bytes, max_pixels=LIMITS.max_pixels, max_decode_bytes=cost)
    assert decode_image(data, at, 64).width == 80
    past = ImageLimits(max_bytes=LIMITS.max_bytes, max_pixels=LIMITS.max_pixels, max_decode_bytes=cost - 1)
    with pytest.raises(ImageRejectedError) as caught:
        decode_image(data, past, 64)
    assert caught.value.status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    assert f"decoding it takes {cost:,} bytes; the limit is {cost - 1:,} bytes" in str(caught.value)


def scene_jpeg(side: int, seed: int) -> bytes:
    from training.scenes import make_scene

    picture = Image.fromarray(make_scene(seed, "test_fresh").image)
    return encode(picture.resize((side, side), Image.Resampling.BICUBIC), "JPEG", quality=90)


@pytest.mark.parametrize(("side", "decoded_side"), [(256, 128), (512, 128), (1000, 250), (2048, 256)])
def test_jpeg_draft_matches_a_full_decode(side, decoded_side):
    """A large JPEG is decoded DCT-scaled to at least twice the model's side; its model input stays
    within a few levels of a full decode's."""
    limits = ImageLimits(max_bytes=LIMITS.max_bytes, max_pixels=side * side)
    for seed in range(3):
        data = scene_jpeg(side, seed)
        full = decode_image(data, limits)
        drafted = decode_image(data, limits, 64)
        assert full.image.size == (side, side) and drafted.image.size == (decoded_side, decoded_side)
        assert (drafted.width, drafted.height) == (side, side), "the reported size is the file's"
        difference = np.abs(to_pixels(full.image, 64).astype(int) - to_pixels(drafted.image, 64).astype(int))
        assert difference.mean() < 0.5 and difference.max() <= 8, (difference.mean(), difference.max())


def test_a_jpeg_counts_against_the_budget_at_its_drafted_size():
    data = scene_jpeg(2048, 0)
    limits = ImageLimits(max_bytes=LIMITS.max_bytes, max_pixels=2048 * 2048, max_decode_bytes=256 * 256 * 4)
    assert decode_image(data, limits, 64).image.size == (256, 256)
    with pytest.raises(ImageRejectedError) as caught:
        decode_image(data, limits)  # no input size: full decode, 16 MiB
    assert "2048x2048 pixels of mode RGB (4 bytes per pixel): decoding it takes 16,777,216 bytes" in str(
        caught.value)
    with pytest.raises(ImageRejectedError) as caught:
        decode_image(data, ImageLimits(LIMITS.max_bytes, 2048 * 2048, 256 * 256 * 4 - 1), 64)
    assert "decoded at 256x256" in str(caught.value)


def test_16bit_grey_scaling_in_bands_equals_the_whole_image_formula():
    rows = GREY_ROWS * 2 + 7  # crosses band edges
    values = np.random.default_rng(1).integers(0, 65536, (rows, 33), dtype=np.uint16)
    pixels = np.asarray(decode_image(encode(Image.fromarray(values), "PNG"), LIMITS).image)
    expected = np.clip(np.rint(values.astype(np.float64) / 65535.0 * 255.0), 0, 255).astype(np.uint8)
    assert np.array_equal(pixels[..., 0], expected) and np.array_equal(pixels[..., 2], expected)
