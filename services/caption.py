"""Caption model service: batched greedy and beam decoding of preprocessed images.

The entry service (``services/api.py``) decodes, validates and converts each upload to raw RGB pixels
at the model's size (``prepare_image``); concurrent requests then arrive here as one list that
BentoML's adaptive batcher assembled. The work is a chain of pure helpers, testable without a server:
``to_batch -> decode (greedy or beam, per beam size) -> to_results``.

The model service decodes every image of every request and every stream as one sequence of a
shared decode loop (``services/decoding.py``, built by ``caption_scheduler``): each step runs the
artifact's ``step`` once for every active row, and a caption equals the one ``caption_images``
(the static path, kept as the reference) gives the image alone.
"""

from __future__ import annotations

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
from services.decode_events import generate, stream
from services.decode_pool import BoundedPool
from services.decoding import DecodeScheduler
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
from services.search import Beam, Done, Greedy, Hypothesis, Vocabulary
from services.search import Sequence as DecodeSequence
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
    return [caption_result(decoder, row[:length], scores[:length])
            for row, scores, length in zip(tokens.tolist(), logprobs.tolist(), lengths.tolist(), strict=True)]


def caption_result(decoder: Decoder, ids: list[int], scores: list[float]) -> CaptionResult:
    """One caption's ids (``<eos>`` last when emitted) and their log-probabilities -> its result."""
    complete = bool(ids) and ids[-1] == decoder.eos_id
    words = ids[:-1] if complete else ids
    return CaptionResult(
        caption=" ".join(decoder.vocab[i] for i in words),
        tokens=[{"token": decoder.vocab[i], "probability": math.exp(s)}
                for i, s in zip(words, scores, strict=False)],
        complete=complete,
        end_probability=math.exp(scores[-1]) if complete else None,
        log_probability=min(0.0, float(sum(scores))),
        steps=len(ids),
    )


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


def caption_scheduler(decoder: Decoder, *, max_rows: int, max_queue: int) -> DecodeScheduler:
    """The decode loop over the artifact's exported ``encode`` and ``step``; its memory (the spatial
    features and their keys) has one width, so nothing is padded or trimmed."""
    vocab = Vocabulary(bos_id=decoder.bos_id, eos_id=decoder.eos_id, pad_id=decoder.pad_id,
                       eos_in_output=True)

    def encode(images: list[torch.Tensor]):
        memory, keys, state = decoder.model.encode(torch.stack(images))  # (G, N, C), (G, N, A), (S*L, G, H)
        return (memory, keys), state, [int(memory.shape[1])] * len(images)

    def step(tokens: torch.Tensor, state: torch.Tensor, memory: tuple[torch.Tensor, ...]):
        log_probs, state = decoder.model.step(tokens, state, *memory)
        return log_probs, state, None

    return DecodeScheduler(NAME, encode, step, vocab, max_rows=max_rows, max_queue=max_queue,
                           device=decoder.device)


def caption_sequence(decoder: Decoder, scheduler: DecodeScheduler, item: CaptionItem,
                     deadline_s: float) -> DecodeSequence:
    """One item as a sequence of the loop: greedy, or a beam of ``beam_size`` rows ranked by raw
    log-probability, as the artifact's ``beam_search``; ``<eos>`` counts toward ``max_length``."""
    try:
        (image,) = to_batch(decoder, [item])  # (3, S, S)
    except ValueError as exc:
        raise ServiceError(400, "invalid_request", str(exc), "pixels") from exc
    if item.beam_size == 1:
        search = Greedy(scheduler.vocab, item.max_length, 0)
    else:
        search = Beam(scheduler.vocab, item.beam_size, item.max_length, 0, length_penalty=0.0)
    return DecodeSequence(image, search, time.monotonic() + deadline_s)


def scheduled_result(decoder: Decoder, hypothesis: Hypothesis, kind: str) -> CaptionResult:
    result = caption_result(decoder, hypothesis.tokens, hypothesis.token_logprobs)
    CAPTION_DECODE_STEPS.labels(NAME, kind).observe(result.steps)
    CAPTION_LENGTH_TOKENS.labels(NAME).observe(len(result.tokens))
    return result


@bentoml.service(name=NAME, **model_service_config(workers=SETTINGS.caption.workers))
class Caption(ModelService):
    name = NAME
    bento_model = bentoml.models.BentoModel(SETTINGS.caption.model)
    threads = SETTINGS.caption.threads
    cpu_nice = SETTINGS.caption.cpu_nice

    def setup(self, model: torch.jit.ScriptModule, metadata: dict) -> None:
        self.decoder = Decoder.from_metadata(model, metadata, self.device)
        self.scheduler = caption_scheduler(self.decoder, max_rows=SETTINGS.caption.max_active_rows,
                                           max_queue=SETTINGS.caption.max_queue).start()
        self.spec_info = CaptionSpec(
            image_size=self.decoder.image_size, mean=metadata["normalisation"]["mean"],
            std=metadata["normalisation"]["std"], preprocess=PREPROCESS, formats=list(FORMATS),
            default_max_length=min(int(metadata["max_length"]), MAX_LENGTH),
            max_length_limit=MAX_LENGTH, max_beam_size=MAX_BEAM_SIZE, max_image_bytes=MAX_IMAGE_BYTES,
            max_image_pixels=MAX_IMAGE_PIXELS, vocab_size=len(self.decoder.vocab),
        )

    def warm_up(self) -> None:
        """Greedy and beam rows joining a running batch, at the full length limit."""
        size = self.decoder.image_size
        pixels = encode_pixels(np.full((size, size, 3), 96, dtype=np.uint8))
        sequences = [caption_sequence(self.decoder, self.scheduler, CaptionItem(
            pixels=pixels, beam_size=beam_size, max_length=MAX_LENGTH), SETTINGS.caption.deadline_s)
            for beam_size in (1, 3) for _ in range(4)]
        self.scheduler.run(sequences)

    @bentoml.api
    async def caption(self, items: list[CaptionItem]) -> list[CaptionResult]:
        sequences = [caption_sequence(self.decoder, self.scheduler, item, SETTINGS.caption.deadline_s)
                     for item in items]
        started = time.perf_counter()
        hypotheses = await generate(self.scheduler, sequences)
        INFERENCE_SECONDS.labels(NAME).observe(time.perf_counter() - started)
        return [scheduled_result(self.decoder, hypothesis, "greedy" if item.beam_size == 1 else "beam")
                for item, hypothesis in zip(items, hypotheses, strict=True)]

    @bentoml.api
    async def stream(self, item: CaptionItem) -> AsyncGenerator[str, None]:
        """Server-sent events: one ``StreamToken`` per word as it is decoded, then a ``StreamEnd``.

        A row of the shared decode loop, greedy: closing the stream (a client that went away)
        frees the row at the next step."""
        item = item.model_copy(update={"beam_size": 1})
        sequence = caption_sequence(self.decoder, self.scheduler, item, SETTINGS.caption.deadline_s)
        words = 0
        async for event in stream(self.scheduler, sequence):
            if isinstance(event, Done):
                result = scheduled_result(self.decoder, event.hypothesis, "stream")
                yield sse(StreamEnd(caption=result.caption, complete=result.complete, steps=result.steps,
                                    model_version=self.model_info.version))
                return
            if event.token == self.decoder.eos_id:
                continue
            yield sse(StreamToken(index=words, token=self.decoder.vocab[event.token],
                                  probability=math.exp(event.logprob)))
            words += 1

    @bentoml.api
    def spec(self) -> CaptionSpec:
        return self.spec_info

