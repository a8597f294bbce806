"""Caption model service: batched greedy and beam decoding of preprocessed images.

The entry service (``services/api.py``) decodes, validates and converts each upload to raw RGB pixels
at the model's size (``prepare_image``); concurrent requests then arrive here as one list that
BentoML's adaptive batcher assembled. The work is a chain of pure helpers, testable without a server:
``to_batch -> decode (greedy or beam, per beam size) -> to_results``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import bentoml
import numpy as np
import torch

from models.images import (
    FORMATS,
    PREPROCESS,
    DecodedImage,
    ImageLimits,
    ImageRejectedError,
    decode_image,
    to_pixels,
)
from services.decode_pool import BoundedPool
from services.errors import ServiceError
from services.lifecycle import ModelService, model_service_config
from services.metrics import (
    CAPTION_DECODE_STEPS,
    CAPTION_IMAGE_BYTES,
    CAPTION_LENGTH_TOKENS,
    CAPTION_REJECTED_IMAGES_TOTAL,
    INFERENCE_SECONDS,
)
from services.schemas.caption import (
    MAX_BEAM_SIZE,
    MAX_DECODE_BYTES,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_LENGTH,
    CaptionItem,
    CaptionResponse,
    CaptionResult,
    CaptionSpec,
    ImageInfo,
    StreamEnd,
    StreamToken,
)
from services.schemas.common import ModelInfo
from services.settings import SETTINGS

logger = logging.getLogger(__name__)
NAME = "caption"
LIMITS = ImageLimits(max_bytes=MAX_IMAGE_BYTES, max_pixels=MAX_IMAGE_PIXELS,
                     max_decode_bytes=MAX_DECODE_BYTES)
# The entry worker's image decodes: a few at once, a bounded queue, 503 past it (services/decode_pool.py).
DECODE_POOL = BoundedPool(SETTINGS.caption.decode_workers, SETTINGS.caption.decode_queue, name="image-decode",
                          settings="RNNSERVE_CAPTION_DECODE_WORKERS, RNNSERVE_CAPTION_DECODE_QUEUE")


@dataclass(frozen=True)
class Decoder:
    """Everything decoding needs from the artifact, next to the scripted module."""

    model: torch.jit.ScriptModule
    vocab: list[str]
    image_size: int
    mean: torch.Tensor  # (1, 3, 1, 1)
    std: torch.Tensor  # (1, 3, 1, 1)
    eos_id: int
    pad_id: int
    bos_id: int
    device: str = "cpu"

    @classmethod
    def from_metadata(cls, model: torch.jit.ScriptModule, metadata: dict, device: str = "cpu") -> Decoder:
        norm = metadata["normalisation"]
        ids = metadata["special_ids"]
        return cls(model=model, vocab=list(metadata["vocab"]), image_size=int(metadata["image_size"]),
                   mean=torch.tensor(norm["mean"], dtype=torch.float32).view(1, 3, 1, 1),
                   std=torch.tensor(norm["std"], dtype=torch.float32).view(1, 3, 1, 1),
                   eos_id=int(ids["eos"]), pad_id=int(ids["pad"]), bos_id=int(ids["bos"]), device=device)


def prepare_image(data: bytes, image_size: int,
                  limits: ImageLimits = LIMITS) -> tuple[DecodedImage, np.ndarray]:
    """Upload bytes -> (what was decoded, (S, S, 3) uint8 pixels). Raises ``ImageRejectedError``.

    A JPEG is decoded DCT-reduced to no less than twice ``image_size`` (``decode_image``).
    """
    decoded = decode_image(data, limits, image_size)
    return decoded, to_pixels(decoded.image, image_size)


IMAGE_ERROR_CODES = {400: "invalid_image", 413: "image_too_large", 415: "unsupported_image_format"}


def rejected(exc: ImageRejectedError) -> ServiceError:
    """The error for a refused image (400, 413 or 415), counted by status."""
    status = int(exc.status)
    CAPTION_REJECTED_IMAGES_TOTAL.labels(NAME, str(status)).inc()
    return ServiceError(status, IMAGE_ERROR_CODES.get(status, "invalid_image"), str(exc), "image")


def read_upload(path: Path, limits: ImageLimits = LIMITS) -> bytes:
    """A multipart upload's bytes, refusing an oversized file before reading it."""
    size = path.stat().st_size
    if size > limits.max_bytes:
        CAPTION_IMAGE_BYTES.labels(NAME).observe(size)
        raise rejected(ImageRejectedError(
            f"the image is {size:,} bytes; the limit is {limits.max_bytes:,} bytes",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE))
    return path.read_bytes()


async def prepare_item(data: bytes, spec: CaptionSpec, beam_size: int, max_length: int | None,
                       pool: BoundedPool = DECODE_POOL) -> tuple[DecodedImage, CaptionItem]:
    """Entry side: decode and convert off the event loop in ``pool`` (a few threads and a bounded
    queue: 503 past it), then build the model service's item."""
    CAPTION_IMAGE_BYTES.labels(NAME).observe(len(data))
    try:
        decoded, pixels = await pool.run(prepare_image, data, spec.image_size)
    except ImageRejectedError as exc:
        raise rejected(exc) from exc
    item = CaptionItem(pixels=encode_pixels(pixels), beam_size=beam_size,
                       max_length=max_length or spec.default_max_length)
    return decoded, item


def caption_response(result: CaptionResult, decoded: DecodedImage, item: CaptionItem,
                     model: ModelInfo) -> CaptionResponse:
    image = ImageInfo(format=decoded.format, mode=decoded.mode, width=decoded.width,
                      height=decoded.height, bytes=decoded.bytes)
    return CaptionResponse(**result.model_dump(), model=model, beam_size=item.beam_size,
                           max_length=item.max_length, image=image)


def sse(event: StreamToken | StreamEnd) -> str:
    """One server-sent event (text/event-stream): a ``data:`` line holding the JSON, then a blank line."""
    return f"data: {event.model_dump_json()}\n\n"


def encode_pixels(pixels: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).decode()


def to_batch(decoder: Decoder, items: Sequence[CaptionItem]) -> torch.Tensor:
    """Items -> normalised images (B, 3, S, S) on the decoder's device."""
    size = decoder.image_size
    rows = []
    for item in items:
        raw = base64.b64decode(item.pixels, validate=True)
        if len(raw) != size * size * 3:
            raise ValueError(f"pixels hold {len(raw)} bytes; this model takes {size}x{size}x3 = "
                             f"{size * size * 3}")
        rows.append(np.frombuffer(raw, dtype=np.uint8).reshape(size, size, 3))
    pixels = torch.from_numpy(np.stack(rows)).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, S, S)
    return ((pixels - decoder.mean) / decoder.std).to(decoder.device)


def to_results(decoder: Decoder, tokens: torch.Tensor, logprobs: torch.Tensor,
               lengths: torch.Tensor) -> list[CaptionResult]:
    """Decoded id rows -> results: words, their probabilities, whether <eos> ended the caption."""
    results = []
    for row, scores, length in zip(tokens.tolist(), logprobs.tolist(), lengths.tolist(), strict=True):
        ids, scores = row[:length], scores[:length]
        complete = bool(ids) and ids[-1] == decoder.eos_id
        words = ids[:-1] if complete else ids
        results.append(CaptionResult(
            caption=" ".join(decoder.vocab[i] for i in words),
            tokens=[{"token": decoder.vocab[i], "probability": math.exp(s)}
                    for i, s in zip(words, scores, strict=False)],
            complete=complete,
            end_probability=math.exp(scores[-1]) if complete else None,
            log_probability=min(0.0, float(sum(scores))),
            steps=length,
        ))
    return results


@torch.inference_mode()
def caption_images(decoder: Decoder, items: Sequence[CaptionItem]) -> list[CaptionResult]:
    """The whole batched path: one result per item, in order.

    Items are grouped by beam size (greedy for 1); within a group each row keeps its own
    ``max_length``, enforced inside the decoder, so batching never changes a caption.
    """
    if not items:
        return []
    images = to_batch(decoder, items)
    results: list[CaptionResult | None] = [None] * len(items)
    for beam_size in sorted({item.beam_size for item in items}):
        index = [i for i, item in enumerate(items) if item.beam_size == beam_size]
        limits = torch.tensor([items[i].max_length for i in index], dtype=torch.long,
                              device=decoder.device)
        started = time.perf_counter()
        if beam_size == 1:
            tokens, logprobs, lengths = decoder.model.greedy(images[index], limits)
        else:
            tokens, logprobs, lengths = decoder.model.beam_search(images[index], limits, beam_size)
        INFERENCE_SECONDS.labels(NAME).observe(time.perf_counter() - started)
        kind = "greedy" if beam_size == 1 else "beam"
        for i, result in zip(index, to_results(decoder, tokens.cpu(), logprobs.cpu(), lengths.cpu()),
                             strict=True):
            CAPTION_DECODE_STEPS.labels(NAME, kind).observe(result.steps)
            CAPTION_LENGTH_TOKENS.labels(NAME).observe(len(result.tokens))
            results[i] = result
    return results  # type: ignore[return-value]


@torch.inference_mode()
def stream_steps(decoder: Decoder, item: CaptionItem):
    """Greedy decoding one step at a time: yields (word id, log-probability) until <eos> or the limit.

    Uses the exported ``encode`` and ``step`` methods, so it makes the same choices as ``greedy``.
    """
    images = to_batch(decoder, [item])
    memory, keys, state = decoder.model.encode(images)
    current = torch.full((1,), decoder.bos_id, dtype=torch.long, device=decoder.device)
    for _ in range(item.max_length):
        logprobs, state = decoder.model.step(current, state, memory, keys)
        best_logprob, best = logprobs.max(dim=1)
        yield int(best), float(best_logprob)
        if int(best) == decoder.eos_id:
            return
        current = best


@bentoml.service(name=NAME, **model_service_config(workers=SETTINGS.caption.workers))
class Caption(ModelService):
    name = NAME
    bento_model = bentoml.models.BentoModel(SETTINGS.caption.model)
    threads = SETTINGS.caption.threads

    def setup(self, model: torch.jit.ScriptModule, metadata: dict) -> None:
        self.decoder = Decoder.from_metadata(model, metadata, self.device)
        self.spec_info = CaptionSpec(
            image_size=self.decoder.image_size, mean=metadata["normalisation"]["mean"],
            std=metadata["normalisation"]["std"], preprocess=PREPROCESS, formats=list(FORMATS),
            default_max_length=min(int(metadata["max_length"]), MAX_LENGTH),
            max_length_limit=MAX_LENGTH, max_beam_size=MAX_BEAM_SIZE, max_image_bytes=MAX_IMAGE_BYTES,
            max_image_pixels=MAX_IMAGE_PIXELS, vocab_size=len(self.decoder.vocab),
        )

    def warm_up(self) -> None:
        """Greedy and beam decoding at batch 1 and at the full batch, at the full length limit."""
        size = self.decoder.image_size
        pixels = encode_pixels(np.full((size, size, 3), 96, dtype=np.uint8))
        for beam_size in (1, 3):
            for batch_size in (1, SETTINGS.caption.max_batch_size):
                items = [CaptionItem(pixels=pixels, beam_size=beam_size, max_length=MAX_LENGTH)] * batch_size
                caption_images(self.decoder, items)

    @bentoml.api(
        batchable=True,
        max_batch_size=SETTINGS.caption.max_batch_size,
        max_latency_ms=SETTINGS.caption.max_latency_ms,
    )
    def caption(self, items: list[CaptionItem]) -> list[CaptionResult]:
        return caption_images(self.decoder, items)

    @bentoml.api
    async def stream(self, item: CaptionItem) -> AsyncGenerator[str, None]:
        """Server-sent events: one ``StreamToken`` per word as it is decoded, then a ``StreamEnd``."""
        words: list[str] = []
        steps, complete = 0, False
        generator = stream_steps(self.decoder, item)
        while True:
            step = await asyncio.to_thread(next, generator, None)
            if step is None:
                break
            token_id, logprob = step
            steps += 1
            if token_id == self.decoder.eos_id:
                complete = True
                break
            words.append(self.decoder.vocab[token_id])
            line = StreamToken(index=len(words) - 1, token=words[-1], probability=math.exp(logprob))
            yield sse(line)
        CAPTION_DECODE_STEPS.labels(NAME, "stream").observe(steps)
        CAPTION_LENGTH_TOKENS.labels(NAME).observe(len(words))
        end = StreamEnd(caption=" ".join(words), complete=complete, steps=steps,
                        model_version=self.model_info.version)
        yield sse(end)

    @bentoml.api
    def spec(self) -> CaptionSpec:
        return self.spec_info

