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


class ImageRejectedError(ValueError):
    """The bytes are not an acceptable image. ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, original size
    format: str
    mode: str  # the mode the file was stored in
    width: int
    height: int
    bytes: int


def decode_image(data: bytes, limits: ImageLimits) -> DecodedImage:
    """Decodes and validates ``data``; raises ``ImageRejectedError`` with the reason and the limit."""
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
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255.0
        if mode == "F":
            top = max(float(pixels.max(initial=0)), 1.0)
        grey = np.clip(np.rint(pixels / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
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
