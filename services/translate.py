"""Translation model service (English -> Spanish): iteration-level batched greedy and beam decoding.

Every text of every request, and every stream, is a sequence of one decode loop
(``services/decoding.py``): at each step the loop admits waiting texts (their encoder runs batched),
runs one ``decode_step`` of the artifact for every active row, and retires finished rows at once. A
text decodes exactly as it would alone; a stream costs one row of a shared step per token, not a
loop of its own. What is specific to translation lives here: the tokenizers, the limits that
depend on them (source tokens, decoder work, attention cells: SECURITY.md), the byte-level delta
rule of the stream, and the answer's shape.

``translate`` (the module function) is the static path: one padded batch per option group through
the artifact's own ``greedy``/``beam_search``. It is the reference a scheduled text must equal
(tests/unit/test_translate_decoding.py) and the in-process ceiling of load/bench.py.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import bentoml
import torch
from tokenizers import Tokenizer

from models.rnn import pad_sequences
from services.batching import collate, split
from services.decode_events import generate as generate_all
from services.decode_events import stream as stream_sequence
from services.decoding import DecodeScheduler
from services.errors import ServiceError
from services.lifecycle import ModelService, model_service_config
from services.metrics import (
    INFERENCE_SECONDS,
    INPUT_LENGTH_TOKENS,
    TRANSLATE_BEAM_SIZE,
    TRANSLATE_DECODE_STEPS,
    TRANSLATE_GENERATED_TOKENS_TOTAL,
    TRANSLATE_OUTPUT_TOKENS,
    TRANSLATE_TOKENS_PER_SECOND,
)
from services.schemas.translate import MAX_LENGTH, TranslateItem, Translation
from services.search import Beam, Done, Greedy, Hypothesis, Sequence, Vocabulary
from services.settings import SETTINGS

logger = logging.getLogger(__name__)
NAME = "translate"
BOS_ID, EOS_ID, PAD_ID = 2, 3, 0  # models.translate's special ids; checked against the artifact at load
DEFAULT_MAX_SOURCE_TOKENS = 128  # for an artifact that does not record max_input_tokens


class Codec:
    """The artifact's source and target subword tokenizers (byte-level BPE: exact round trip)."""

    def __init__(self, metadata: dict):
        self.source = Tokenizer.from_str(metadata["src_tokenizer"])
        self.target = Tokenizer.from_str(metadata["tgt_tokenizer"])
        specials = list(metadata["special_tokens"])
        if specials.index("<s>") != BOS_ID or specials.index("</s>") != EOS_ID:
            raise ValueError(f"artifact special tokens {specials} do not match BOS={BOS_ID}, EOS={EOS_ID}")

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Source ids per text; never empty (any non-blank text has at least one byte)."""
        if len(texts) == 1:  # one text (most requests, every stream): no batch thread pool to wake
            encoded = [self.source.encode(texts[0]).ids]
        else:
            encoded = [encoding.ids for encoding in self.source.encode_batch(texts)]
        for text, ids in zip(texts, encoded, strict=True):
            if not ids:
                raise ValueError(f"text {text[:40]!r} produced no tokens; it must not be blank")
        return encoded

    def decode(self, ids: list[int]) -> str:
        return self.target.decode(ids, skip_special_tokens=True)

    def source_pieces(self, ids: list[int]) -> list[str]:
        return [self.source.decode([i], skip_special_tokens=False) for i in ids]

    def target_pieces(self, ids: list[int]) -> list[str]:
        return [self.target.decode([i], skip_special_tokens=False) for i in ids]


# -- limits that depend on the tokenizer (issue 13, findings 4 and 6) ------------------------------


@dataclass(frozen=True)
class Limits:
    """Per-request bounds checked after tokenizing, before any decoding (SECURITY.md)."""

    max_source_tokens: int
    max_request_work: int
    max_attention_cells: int

    @classmethod
    def from_settings(cls, metadata: dict) -> Limits:
        trained = int(metadata.get("max_input_tokens", DEFAULT_MAX_SOURCE_TOKENS))
        return cls(max_source_tokens=SETTINGS.translate.max_source_tokens or trained,
                   max_request_work=SETTINGS.translate.max_request_work,
                   max_attention_cells=SETTINGS.translate.max_attention_cells)


def check_limits(items: list[TranslateItem], encoded: list[list[int]], limits: Limits,
                 max_output_length: int) -> None:
    """A 400 naming the limit and the field: source tokens per text (``texts[i]``), decoder work per
    request (source tokens x beam size, summed), attention cells per request (``return_attention``)."""
    work = cells = 0
    for item, ids in zip(items, encoded, strict=True):
        if len(ids) > limits.max_source_tokens:
            raise ServiceError(
                400, "validation_error",
                f"{item.field}: the text has {len(ids):,} subword tokens; the limit is "
                f"{limits.max_source_tokens:,} (RNNSERVE_TRANSLATE_MAX_SOURCE_TOKENS). Split it into "
                "shorter texts; it is never truncated", item.field)
        work += len(ids) * item.beam_size
        if work > limits.max_request_work:
            raise ServiceError(
                400, "validation_error",
                f"{item.field}: the request needs more than {limits.max_request_work:,} units of decoder "
                f"work by this text ({work:,} = source tokens x beam_size summed over the texts; "
                "RNNSERVE_TRANSLATE_MAX_REQUEST_WORK). Send fewer or shorter texts or a smaller beam_size",
                item.field)
        if item.return_attention:
            cells += min(item.max_length, max_output_length) * len(ids)
    if cells > limits.max_attention_cells:
        raise ServiceError(
            400, "validation_error",
            f"return_attention could return {cells:,} attention cells (max_length x source tokens "
            f"summed over the texts); the limit is {limits.max_attention_cells:,} "
            "(RNNSERVE_TRANSLATE_MAX_ATTENTION_CELLS). Lower max_length, send fewer or shorter texts, "
            "or leave return_attention off", "return_attention")


# -- the static path: the reference and the in-process ceiling ---------------------------------------


def group_by_options(items: list[TranslateItem]) -> dict[tuple[int, int, float], list[int]]:
    """Item indices per decoding setup; items in one group can share a padded batch."""
    groups: dict[tuple[int, int, float], list[int]] = {}
    for index, item in enumerate(items):
        key = (item.beam_size, item.max_length, item.length_penalty if item.beam_size > 1 else 0.0)
        groups.setdefault(key, []).append(index)
    return groups


@torch.inference_mode()
def decode_batch(model, tokens: torch.Tensor, lengths: torch.Tensor, beam_size: int, max_length: int,
                 length_penalty: float, return_attention: bool):
    """One batched greedy or beam decode; returns CPU tensors (tokens, lengths, scores, steps, attn)."""
    if beam_size == 1:
        out = model.greedy(tokens, lengths, max_length, return_attention)
    else:
        out = model.beam_search(tokens, lengths, beam_size, max_length, length_penalty, return_attention)
    return tuple(t.cpu() for t in out)


def translate(model, codec: Codec, items: list[TranslateItem], device: str = "cpu") -> list[Translation]:
    """Static batching: items in (each with its options), one translation per item out, in order."""
    if not items:
        return []
    encoded = codec.encode([item.text for item in items])
    results: list[Translation | None] = [None] * len(items)
    for (beam_size, max_length, length_penalty), indices in group_by_options(items).items():
        want_attention = any(items[i].return_attention for i in indices)
        tokens, lengths, order = collate([encoded[i] for i in indices], NAME, device)
        out, out_lengths, scores, steps, attention = decode_batch(
            model, tokens, lengths, beam_size, max_length, length_penalty, want_attention)
        rows = []
        for row in range(len(indices)):
            item = items[indices[order[row]]]
            source_ids = encoded[indices[order[row]]]
            ids = out[row, : int(out_lengths[row])].tolist()
            result = Translation(
                translation=codec.decode(ids), input_tokens=len(source_ids), output_tokens=len(ids),
                decode_steps=int(steps), beam_size=beam_size, score=float(scores[row]),
                truncated=len(ids) >= min(max_length, model.max_output_length),
            )
            if item.return_attention:
                result.source_pieces = codec.source_pieces(source_ids)
                result.output_pieces = codec.target_pieces(ids)
                result.attention = attention[row, : len(ids), : len(source_ids)].tolist()
            rows.append(result)
        for index, result in zip(indices, split(rows, order), strict=True):
            results[index] = result
    return results  # type: ignore[return-value]


# -- the scheduled path ------------------------------------------------------------------------------


class TranslateDecoder:
    """The artifact behind a decode scheduler: one loop per process steps every text and stream."""

    def __init__(self, model: torch.jit.ScriptModule, codec: Codec, limits: Limits, *, max_rows: int,
                 max_queue: int, deadline_s: float, device: str = "cpu", start: bool = True):
        self.model, self.codec, self.limits, self.device = model, codec, limits, device
        self.deadline_s = deadline_s
        self.max_output_length = int(model.max_output_length)
        self.vocab = Vocabulary(bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, eos_in_output=False)
        self.scheduler = DecodeScheduler(NAME, self._encode, self._step, self.vocab, max_rows=max_rows,
                                         max_queue=max_queue, device=device)
        if start:
            self.scheduler.start()

    def _encode(self, inputs: list[list[int]]):
        """Shape: ids of G texts -> memory, keys (G, S, .), mask (G, S), state (1, G, Hd), widths."""
        tokens, lengths = pad_sequences(inputs, PAD_ID)  # (G, S), (G,)
        memory, keys, mask, state = self.model.encode(tokens.to(self.device), lengths.to(self.device))
        return (memory, keys, mask), state, lengths.tolist()

    def _step(self, tokens: torch.Tensor, state: torch.Tensor, memory: tuple[torch.Tensor, ...]):
        return self.model.decode_step(tokens, state, *memory)

    def limit(self, max_length: int) -> int:
        return max(1, min(max_length, self.max_output_length))

    def prepare(self, items: list[TranslateItem]) -> list[list[int]]:
        """Tokenizes and checks every limit: a 400 before anything is queued."""
        encoded = self.codec.encode([item.text for item in items])
        check_limits(items, encoded, self.limits, self.max_output_length)
        for ids in encoded:
            INPUT_LENGTH_TOKENS.labels(NAME).observe(len(ids))
        return encoded

    def sequence(self, item: TranslateItem, ids: list[int], now: float | None = None) -> Sequence:
        limit = self.limit(item.max_length)
        if item.beam_size == 1:
            search = Greedy(self.vocab, limit, len(ids), item.return_attention)
        else:
            search = Beam(self.vocab, item.beam_size, limit, len(ids), item.length_penalty,
                          item.return_attention)
        deadline = (time.monotonic() if now is None else now) + self.deadline_s
        return Sequence(ids, search, deadline)

    def answer(self, item: TranslateItem, ids: list[int], hypothesis: Hypothesis) -> Translation:
        output = hypothesis.tokens
        result = Translation(
            translation=self.codec.decode(output), input_tokens=len(ids), output_tokens=len(output),
            decode_steps=hypothesis.steps, beam_size=item.beam_size, score=hypothesis.score,
            truncated=len(output) >= self.limit(item.max_length))
        if item.return_attention:
            result.source_pieces = self.codec.source_pieces(ids)
            result.output_pieces = self.codec.target_pieces(output)
            result.attention = hypothesis.attention
        decoder = "greedy" if item.beam_size == 1 else "beam"
        TRANSLATE_OUTPUT_TOKENS.labels(NAME, decoder).observe(len(output))
        TRANSLATE_DECODE_STEPS.labels(NAME, decoder).observe(hypothesis.steps)
        TRANSLATE_BEAM_SIZE.labels(NAME).observe(item.beam_size)
        TRANSLATE_GENERATED_TOKENS_TOTAL.labels(NAME, decoder).inc(len(output))
        return result

    async def translate(self, items: list[TranslateItem]) -> list[Translation]:
        """Every item as its own sequence of the shared loop; answers in order."""
        if not items:
            return []
        encoded = self.prepare(items)
        sequences = [self.sequence(item, ids) for item, ids in zip(items, encoded, strict=True)]
        started = time.perf_counter()
        hypotheses = await generate_all(self.scheduler, sequences)
        INFERENCE_SECONDS.labels(NAME).observe(time.perf_counter() - started)
        return [self.answer(item, ids, hypothesis)
                for item, ids, hypothesis in zip(items, encoded, hypotheses, strict=True)]

    async def stream(self, text: str, max_length: int) -> AsyncIterator[dict]:
        """Greedy decoding as events: ``{"delta": ...}`` as text completes, then one ``done`` event.

        The deltas concatenate to exactly the final ``translation``, which equals the greedy answer
        of ``translate``. Byte-level subwords can end inside a multi-byte character (``ñ`` is two
        bytes), so a delta is sent only once the decoded prefix is printable and extends what was
        already sent.
        """
        item = TranslateItem(text=text, beam_size=1, max_length=max_length)
        (ids,) = self.prepare([item])
        sequence = self.sequence(item, ids)
        started = time.perf_counter()
        output: list[int] = []
        sent = ""
        async for event in stream_sequence(self.scheduler, sequence):
            if isinstance(event, Done):
                hypothesis = event.hypothesis
                break
            if event.token == EOS_ID:
                continue
            output.append(event.token)
            prefix = self.codec.decode(output)
            if prefix.startswith(sent) and not prefix.endswith("\ufffd") and len(prefix) > len(sent):
                yield {"delta": prefix[len(sent):], "token": event.token}
                sent = prefix
        seconds = time.perf_counter() - started
        result = self.answer(item, ids, hypothesis)
        translation = result.translation
        if not translation.startswith(sent):  # cannot happen with byte-level BPE; never send wrong text
            raise RuntimeError(f"streamed prefix {sent!r} is not a prefix of {translation!r}")
        if len(translation) > len(sent):
            yield {"delta": translation[len(sent):], "token": None}
        TRANSLATE_TOKENS_PER_SECOND.labels(NAME, "stream").observe(result.output_tokens / max(seconds, 1e-9))
        yield {"done": True, "translation": translation, "input_tokens": result.input_tokens,
               "output_tokens": result.output_tokens, "decode_steps": result.decode_steps, "beam_size": 1,
               "score": result.score, "truncated": result.truncated}


def sse_frame(event: dict) -> str:
    """One server-sent event. ASCII-only JSON, so a frame survives any split into byte chunks."""
    return f"data: {json.dumps(event, ensure_ascii=True)}\n\n"


@bentoml.service(name=NAME, **model_service_config(workers=SETTINGS.translate.workers))
class Translate(ModelService):
    name = NAME
    bento_model = bentoml.models.BentoModel(SETTINGS.translate.model)
    threads = SETTINGS.translate.threads
    cpu_nice = SETTINGS.translate.cpu_nice

    def setup(self, model: torch.jit.ScriptModule, metadata: dict) -> None:
        settings = SETTINGS.translate
        self.decoder = TranslateDecoder(model, Codec(metadata), Limits.from_settings(metadata),
                                     max_rows=settings.max_active_rows, max_queue=settings.max_queue,
                                     deadline_s=settings.deadline_s, device=self.device)
        if int(metadata["max_output_length"]) < MAX_LENGTH:
            logger.warning("artifact caps output at %s tokens, below RNNSERVE_TRANSLATE_MAX_LENGTH=%s",
                           metadata["max_output_length"], MAX_LENGTH)

    def warm_up(self) -> None:
        """Greedy and beam rows joining a running batch, at short and at the longest allowed source."""
        decoder = self.decoder
        longest = max(1, min(decoder.limits.max_source_tokens,
                             decoder.limits.max_request_work // 4 // 4))
        sources = [[5] * 3, [5] * longest]
        sequences = [decoder.sequence(TranslateItem(text="warm-up", beam_size=beam, max_length=8), ids)
                     for ids in sources for beam in (1, 4) for _ in range(4)]
        decoder.scheduler.run(sequences)

    @bentoml.api
    async def translate(self, items: list[TranslateItem]) -> list[Translation]:
        return await self.decoder.translate(items)

    @bentoml.api
    async def stream(self, text: str, max_length: int = MAX_LENGTH) -> AsyncGenerator[str, None]:
        """Server-sent event frames of a greedy translation (see ``TranslateDecoder.stream``)."""
        async for event in self.decoder.stream(text, max_length):
            yield sse_frame(event)
