"""Untrusted image bytes -> the captioner's input, deterministically, or a 4xx reason with the limit.

Every check that can be made from the header is made before any pixel is decoded, so a decompression
bomb (a small file that declares a huge image) costs nothing. Conversion is a fixed chain, recorded in
the artifact metadata (``preprocess``), and shared by training (``training/coco.py``) and serving
(``services/caption.py``); it lives in ``models/`` because both import it and neither imports the other:

1. first frame only (animated WebP/PNG); EXIF orientation applied;
2. mode to RGB: 16/32-bit grey scaled by its full range, alpha composited onto white, palette
   expanded (with its transparency), CMYK/YCbCr/L/1 converted by Pillow;
3. resized to ``size x size`` with Pillow's bilinear filter (antialiased when shrinking), ignoring
   the aspect ratio, so no part of the picture is cropped away.

Memory is bounded before decoding too: ``ImageLimits.max_decode_bytes`` caps the bytes the decoded
image takes in the mode it is stored in (``decoded_bytes``: a 16-bit greyscale PNG of 4096 x 4096 is
32 MiB of pixels however few bytes its file has), and a JPEG is decoded by libjpeg's DCT scaling
(``Image.draft``) at the largest reduction (1/2, 1/4 or 1/8) that still covers twice the model's
input side, so a large photo never exists in memory at full size.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from http import HTTPStatus

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

FORMATS = ("PNG", "JPEG", "WEBP")
PREPROCESS = ("first frame; EXIF transpose; to RGB (alpha over white, 16-bit grey scaled); "
              "bilinear resize to size x size, aspect ratio not kept")
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently grey-filled
# 16/32-bit grey is scaled to 8 bits this many rows at a time: the float64 arithmetic of a 4096-wide
# image then needs 8 MiB, not 8 bytes per pixel of the whole image (issue 13, finding 5).
GREY_ROWS = 256


class ImageRejectedError(ValueError):
    """The bytes are not an acceptable image. ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int  # the file
    max_pixels: int  # width x height as the header declares it
    # Bytes of the image as decoded (after a JPEG's DCT scaling), in its stored mode; None: no bound
    # beyond max_pixels. The conversion to RGB then needs a few times this (to_rgb), never more.
    max_decode_bytes: int | None = None


def bytes_per_pixel(mode: str) -> int:
    """Bytes Pillow holds per pixel of an image in ``mode``.

    1 for ``1``, ``L`` and ``P``; 2 for 16-bit grey (``I;16*``); 4 for every other mode, RGB included:
    Pillow stores multi-band and 32-bit images in 32-bit pixels (``libImaging/Storage.c``).
    """
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


def decoded_bytes(mode: str, width: int, height: int) -> int:
    """Memory the decoded image takes: width x height x ``bytes_per_pixel(mode)``."""
    return width * height * bytes_per_pixel(mode)


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB; original size, or reduced by a JPEG's DCT scaling (``decode_image``)
    format: str
    mode: str  # the mode the file was stored in
    width: int  # as the file declares it
    height: int
    bytes: int


def decode_image(data: bytes, limits: ImageLimits, input_size: int | None = None) -> DecodedImage:
    """Decodes and validates ``data``; raises ``ImageRejectedError`` with the reason and the limit.

    With ``input_size`` (the model's input side), a JPEG is decoded at the largest DCT reduction (1/2,
    1/4, 1/8) that keeps both sides at least twice ``input_size``, so that the final antialiased resize
    still averages several decoded pixels per input pixel: the model's input then differs from a full
    decode's by a few levels (``test_jpeg_draft_matches_a_full_decode``; drafting to ``input_size``
    itself differed by up to 37 levels on sharp edges), for a fraction of the memory and time. Without
    ``input_size`` every image is decoded at full size.
    """
    size = len(data)
    if size == 0:
        raise ImageRejectedError("the image is empty (0 bytes); send a PNG, JPEG or WebP file")
    if size > limits.max_bytes:
        raise ImageRejectedError(f"the image is {size:,} bytes; the limit is {limits.max_bytes:,} bytes",
                            HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (Image.MAX_IMAGE_PIXELS, 89M) fires inside open(), before our check.
        raise ImageRejectedError(f"the image declares too many pixels ({exc}); the limit is "
                            f"{limits.max_pixels:,} pixels", HTTPStatus.REQUEST_ENTITY_TOO_LARGE) from exc
    except UnidentifiedImageError as exc:
        kind = sniff_format(data)
        if kind is None:
            raise ImageRejectedError(
                f"the {size:,} bytes are not a PNG, JPEG or WebP image; those are the formats accepted",
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE) from exc
        declared = declared_size(data, kind)
        if declared is not None and min(declared) <= 0:
            raise ImageRejectedError(f"the {kind} image is {declared[0]}x{declared[1]} pixels; "
                                "it needs at least 1x1") from exc
        raise ImageRejectedError(f"the file starts like a {kind} image but its header cannot be read; "
                            "the file is corrupt") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # a broken header
        kind = sniff_format(data)
        declared = declared_size(data, kind) if kind else None
        if declared is not None and min(declared) <= 0:
            raise ImageRejectedError(f"the {kind} image is {declared[0]}x{declared[1]} pixels; "
                                "it needs at least 1x1") from exc
        raise ImageRejectedError(f"the image header cannot be read ({exc}); the file is corrupt") from exc
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageRejectedError(f"the image is {width}x{height} pixels; it needs at least 1x1")
    if width * height > limits.max_pixels:
        raise ImageRejectedError(
            f"the image is {width}x{height} = {width * height:,} pixels; the limit is "
            f"{limits.max_pixels:,} pixels. Resize it before sending",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    if input_size is not None and image.format == "JPEG":
        # Changes image.size to the scaled size; decodes nothing yet.
        image.draft(image.mode, (2 * input_size, 2 * input_size))
    cost = decoded_bytes(image.mode, *image.size)
    if limits.max_decode_bytes is not None and cost > limits.max_decode_bytes:
        scaled = "" if image.size == (width, height) else f", decoded at {image.size[0]}x{image.size[1]}"
        raise ImageRejectedError(
            f"the image is {width}x{height} pixels of mode {image.mode}{scaled} "
            f"({bytes_per_pixel(image.mode)} bytes per pixel): decoding it takes {cost:,} bytes; the "
            f"limit is {limits.max_decode_bytes:,} bytes. Resize it before sending",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    stored_mode = image.mode
    try:
        image.seek(0)
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageRejectedError(f"the {image.format} image cannot be decoded ({exc}); "
                            "the file is truncated or corrupt") from exc
    return DecodedImage(image=to_rgb(image), format=str(image.format), mode=stored_mode,
                        width=width, height=height, bytes=size)


def sniff_format(data: bytes) -> str | None:
    """The accepted format whose signature ``data`` starts with, if any."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def declared_size(data: bytes, kind: str) -> tuple[int, int] | None:
    """(width, height) as written in the header, read without Pillow; None when not found.

    Pillow refuses to identify a file that declares a zero dimension, so this is how such a file
    gets its own message instead of "corrupt".
    """
    if kind == "PNG" and len(data) >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if kind == "JPEG":
        index = 2
        while index + 9 <= len(data):
            if data[index] != 0xFF:
                return None
            marker = data[index + 1]
            length = int.from_bytes(data[index + 2:index + 4], "big")
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
                height = int.from_bytes(data[index + 5:index + 7], "big")
                return int.from_bytes(data[index + 7:index + 9], "big"), height
            index += 2 + length
        return None
    if kind == "WEBP" and data[12:16] == b"VP8 " and len(data) >= 30:
        return (int.from_bytes(data[26:28], "little") & 0x3FFF,
                int.from_bytes(data[28:30], "little") & 0x3FFF)
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """Deterministic conversion of any Pillow mode to 8-bit RGB (see the module docstring)."""
    # A malformed EXIF block keeps the stored orientation.
    with contextlib.suppress(OSError, SyntaxError, ValueError, TypeError, KeyError):
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        # 16/32-bit grey: Pillow's convert("L") clips at 255; scale by the mode's full range instead.
        pixels = np.asarray(image)  # (H, W) in the stored type: no float64 copy of the whole image
        top = 65535.0 if mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255.0
        if mode == "F":
            top = max(float(pixels.max(initial=0)), 1.0)
        grey = np.empty(pixels.shape, dtype=np.uint8)
        for start in range(0, pixels.shape[0], GREY_ROWS):  # float64 work a band of rows at a time
            band = pixels[start:start + GREY_ROWS].astype(np.float64)
            grey[start:start + GREY_ROWS] = np.clip(np.rint(band / top * 255.0), 0, 255)
        return Image.fromarray(grey).convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("LA", "PA", "La", "RGBa") or (mode == "L" and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def to_pixels(image: Image.Image, size: int) -> np.ndarray:
    """RGB image -> (size, size, 3) uint8, bilinear, aspect ratio not kept."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    resized = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8).copy()
