"""Caption request and response schemas.

An image arrives as base64 in JSON (``/v1/caption``, ``/v1/caption/stream``) or as a multipart file
(``/v1/caption/upload``). The entry service decodes and converts it (``services/images.py``) and
sends the model service a ``CaptionItem``: raw RGB pixels at the model's size, base64-encoded, so
concurrent requests batch into one tensor.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from services.schemas.common import ModelInfo
from services.settings import SETTINGS

MAX_IMAGE_BYTES = SETTINGS.caption.max_image_bytes
MAX_IMAGE_PIXELS = SETTINGS.caption.max_image_pixels
MAX_DECODE_BYTES = SETTINGS.caption.max_decode_bytes
MAX_BEAM_SIZE = SETTINGS.caption.max_beam_size
MAX_LENGTH = SETTINGS.caption.max_length
# base64 grows 4/3; leave room for a data URL prefix and line breaks. Past this the string is
# refused before decoding; under it, the decoded byte count is checked against MAX_IMAGE_BYTES (413).
MAX_BASE64_CHARS = (MAX_IMAGE_BYTES + 2) // 3 * 4 + 4096
_DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)


def _example_png() -> str:
    """A 64x64 PNG: a large red circle at the top left and a small blue square in the centre."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), (60, 60, 60))
    draw = ImageDraw.Draw(image)
    draw.ellipse([2, 2, 20, 20], fill=(220, 40, 40))
    draw.rectangle([27, 27, 37, 37], fill=(50, 80, 230))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


EXAMPLE_IMAGE_BASE64 = _example_png()
CAPTION_EXAMPLE = {"image": EXAMPLE_IMAGE_BASE64, "beam_size": 3}


def decode_base64(text: str) -> bytes:
    """Strict base64 (whitespace and a ``data:image/...;base64,`` prefix allowed) -> bytes."""
    text = _DATA_URL.sub("", text.strip(), count=1)
    text = "".join(text.split())
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"image is not valid base64 ({exc}); send the file's bytes base64-encoded, "
                         "optionally as a data:image/...;base64, URL") from exc


def _check_base64(text: str) -> str:
    decode_base64(text)
    return text


BeamSize = Annotated[int, Field(ge=1, le=MAX_BEAM_SIZE, description=(
    f"Hypotheses kept by beam search, 1 to {MAX_BEAM_SIZE}; 1 decodes greedily."))]
MaxLength = Annotated[
    Annotated[int, Field(ge=1, le=MAX_LENGTH)] | None,
    Field(description=(f"Most tokens to generate, 1 to {MAX_LENGTH} (<eos> counts); default: the "
                       "model's own limit.")),
]


class CaptionRequest(BaseModel):
    """One image, base64-encoded, and decoding options. Unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": CAPTION_EXAMPLE})

    image: Annotated[str, Field(
        min_length=1, max_length=MAX_BASE64_CHARS,
        description=(f"A PNG, JPEG or WebP file, base64-encoded (a data URL is fine); at most "
                     f"{MAX_IMAGE_BYTES:,} bytes and {MAX_IMAGE_PIXELS:,} pixels, and at most "
                     f"{MAX_DECODE_BYTES:,} bytes once decoded. "
                     "Any size and mode; it is converted to the model's input deterministically."),
    ), AfterValidator(_check_base64)]
    beam_size: BeamSize = 1
    max_length: MaxLength = None

    def image_bytes(self) -> bytes:
        return decode_base64(self.image)


class StreamRequest(BaseModel):
    """One image, base64-encoded; streaming decodes greedily, word by word."""

    model_config = ConfigDict(extra="forbid",
                              json_schema_extra={"example": {"image": EXAMPLE_IMAGE_BASE64}})

    image: Annotated[str, Field(min_length=1, max_length=MAX_BASE64_CHARS,
                                description="As in /v1/caption."), AfterValidator(_check_base64)]
    max_length: MaxLength = None

    def image_bytes(self) -> bytes:
        return decode_base64(self.image)


class CaptionItem(BaseModel):
    """What the entry service sends the model service: pixels already converted to the model's input."""

    model_config = ConfigDict(extra="forbid")

    pixels: str = Field(description="Base64 of size*size*3 uint8 RGB bytes, row-major (H, W, C).")
    beam_size: BeamSize = 1
    max_length: Annotated[int, Field(ge=1, le=MAX_LENGTH)]


class TokenProbability(BaseModel):
    token: str = Field(description="A generated word.", examples=["circle"])
    probability: float = Field(ge=0, le=1, description="The decoder's probability of this word at "
                               "its step, given the words before it.")


class CaptionResult(BaseModel):
    caption: str = Field(description="The generated sentence (words joined by spaces).",
                         examples=["a large red circle at the top left and a small blue square "
                                   "in the centre"])
    tokens: list[TokenProbability] = Field(description="Each word with its probability, in order.")
    complete: bool = Field(description="True when the model ended the sentence (<eos>); false when "
                           "it was cut at max_length.")
    end_probability: float | None = Field(
        default=None, ge=0, le=1, description="Probability of the final <eos>, when emitted.")
    log_probability: float = Field(le=0, description="Sum of log-probabilities of every generated "
                                   "token, <eos> included: the beam's score.")
    steps: int = Field(ge=1, description="Decoder steps run for this caption.")


class ImageInfo(BaseModel):
    format: str = Field(description="PNG, JPEG or WEBP.", examples=["PNG"])
    mode: str = Field(description="Pillow mode of the file as stored (RGB, RGBA, L, P, ...).",
                      examples=["RGBA"])
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    bytes: int = Field(ge=1, description="File size.")


class CaptionResponse(CaptionResult):
    model: ModelInfo
    beam_size: int = Field(ge=1, description="Beam size used.")
    max_length: int = Field(ge=1, description="Length limit used.")
    image: ImageInfo


class CaptionSpec(BaseModel):
    """What the model takes: input size and normalisation, limits and defaults."""

    image_size: int = Field(description="Images are resized to image_size x image_size RGB.")
    mean: list[float] = Field(description="Per-channel mean subtracted after scaling to [0, 1].")
    std: list[float] = Field(description="Per-channel standard deviation divided by.")
    preprocess: str = Field(description="The conversion applied to every upload.")
    formats: list[str] = Field(description="Accepted file formats.")
    default_max_length: int
    max_length_limit: int
    max_beam_size: int
    max_image_bytes: int
    max_image_pixels: int
    max_decode_bytes: int = Field(MAX_DECODE_BYTES, description=(
        "Bytes the decoded image may take: width x height x bytes per pixel of its mode (1 for 8-bit "
        "grey or palette, 2 for 16-bit grey, 4 otherwise); a JPEG counts at its DCT-reduced size."))
    vocab_size: int


class StreamToken(BaseModel):
    """One line of the NDJSON stream: a word as soon as it is decoded, then a final summary."""

    index: int = Field(ge=0, description="Position of the word in the caption.")
    token: str
    probability: float = Field(ge=0, le=1)


class StreamEnd(BaseModel):
    done: bool = True
    caption: str
    complete: bool
    steps: int
    model_version: str
