"""Translation model service (English -> Spanish): batched greedy/beam decoding and greedy streaming.

``translate`` is batchable: BentoML merges the items of concurrent requests into one list. Items keep
their own options, so inside a batch they are grouped by ``(beam_size, max_length, length_penalty)``
and each group is decoded as one padded batch (``encode -> collate -> decode -> split``); a mixed
batch is answered exactly as if each item had come alone.

``stream`` is not batched: each stream runs its own greedy decode loop (one ``decode_step`` per token)
in a worker thread, and yields a server-sent event as soon as a token completes a printable piece of
text. Concurrent streams share the CPU but not a batch.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Generator, Iterator

import bentoml
import torch
from tokenizers import Tokenizer

from services.batching import collate, split
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
from services.schemas.translate import MAX_LENGTH, MAX_TEXT_CHARS, TranslateItem, Translation
from services.settings import SETTINGS

logger = logging.getLogger(__name__)
NAME = "translate"
BOS_ID, EOS_ID = 2, 3  # models.translate's special ids; checked against the artifact at load


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
    """The whole batched path: items in (each with its options), one translation per item out, in order."""
    if not items:
        return []
    encoded = codec.encode([item.text for item in items])
    results: list[Translation | None] = [None] * len(items)
    for (beam_size, max_length, length_penalty), indices in group_by_options(items).items():
        want_attention = any(items[i].return_attention for i in indices)
        tokens, lengths, order = collate([encoded[i] for i in indices], NAME, device)
        started = time.perf_counter()
        out, out_lengths, scores, steps, attention = decode_batch(
            model, tokens, lengths, beam_size, max_length, length_penalty, want_attention)
        seconds = time.perf_counter() - started
        INFERENCE_SECONDS.labels(NAME).observe(seconds)
        decoder = "greedy" if beam_size == 1 else "beam"
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
            TRANSLATE_OUTPUT_TOKENS.labels(NAME, decoder).observe(len(ids))
            TRANSLATE_DECODE_STEPS.labels(NAME, decoder).observe(int(steps))
            TRANSLATE_BEAM_SIZE.labels(NAME).observe(beam_size)
        generated = int(out_lengths.sum())
        TRANSLATE_GENERATED_TOKENS_TOTAL.labels(NAME, decoder).inc(generated)
        TRANSLATE_TOKENS_PER_SECOND.labels(NAME, decoder).observe(generated / max(seconds, 1e-9))
        for index, result in zip(indices, split(rows, order), strict=True):
            results[index] = result
    return results  # type: ignore[return-value]


@torch.inference_mode()
def stream_tokens(model, codec: Codec, text: str, max_length: int, device: str = "cpu") -> Iterator[dict]:
    """Greedy decoding one token at a time; yields ``{"delta": ...}`` events, then one ``done`` event.

    BentoML advances the generator with ``next`` in whichever worker thread is free, and inference
    mode is thread-local: the decorator (unlike a ``with`` block around the loop) re-enters it on
    every resumption, so a step never runs outside it.

    The deltas concatenate to exactly the final ``translation``. Byte-level subwords can end inside a
    multi-byte character (``ñ`` is two bytes), so a delta is sent only once the decoded prefix is
    printable and extends what was already sent.
    """
    (source_ids,) = codec.encode([text])
    INPUT_LENGTH_TOKENS.labels(NAME).observe(len(source_ids))
    limit = min(max_length, int(model.max_output_length))
    started = time.perf_counter()
    ids: list[int] = []
    sent = ""
    score = 0.0
    steps = 0
    src = torch.tensor([source_ids], dtype=torch.long, device=device)
    lengths = torch.tensor([len(source_ids)], dtype=torch.long, device=device)
    memory, keys, mask, state = model.encode(src, lengths)
    previous = torch.tensor([BOS_ID], dtype=torch.long, device=device)
    while len(ids) < limit:
        log_probs, state, _ = model.decode_step(previous, state, memory, keys, mask)
        steps += 1
        best_score, best = log_probs.max(dim=1)
        token = int(best)
        score += float(best_score)
        if token == EOS_ID:
            break
        ids.append(token)
        previous = best
        prefix = codec.decode(ids)
        if prefix.startswith(sent) and not prefix.endswith("\ufffd") and len(prefix) > len(sent):
            yield {"delta": prefix[len(sent):], "token": token}
            sent = prefix
    seconds = time.perf_counter() - started
    translation = codec.decode(ids)
    if not translation.startswith(sent):  # cannot happen with byte-level BPE; never send wrong text
        raise RuntimeError(f"streamed prefix {sent!r} is not a prefix of {translation!r}")
    if len(translation) > len(sent):
        yield {"delta": translation[len(sent):], "token": None}
    TRANSLATE_OUTPUT_TOKENS.labels(NAME, "stream").observe(len(ids))
    TRANSLATE_DECODE_STEPS.labels(NAME, "stream").observe(steps)
    TRANSLATE_BEAM_SIZE.labels(NAME).observe(1)
    TRANSLATE_GENERATED_TOKENS_TOTAL.labels(NAME, "stream").inc(len(ids))
    TRANSLATE_TOKENS_PER_SECOND.labels(NAME, "stream").observe(len(ids) / max(seconds, 1e-9))
    yield {"done": True, "translation": translation, "input_tokens": len(source_ids),
           "output_tokens": len(ids), "decode_steps": steps, "beam_size": 1, "score": score,
           "truncated": len(ids) >= limit}


def sse_frame(event: dict) -> str:
    """One server-sent event. ASCII-only JSON, so a frame survives any split into byte chunks."""
    return f"data: {json.dumps(event, ensure_ascii=True)}\n\n"


@bentoml.service(name=NAME, **model_service_config(workers=SETTINGS.translate.workers))
class Translate(ModelService):
    name = NAME
    bento_model = bentoml.models.BentoModel(SETTINGS.translate.model)
    threads = SETTINGS.translate.threads

    def setup(self, model: torch.jit.ScriptModule, metadata: dict) -> None:
        self.model, self.codec = model, Codec(metadata)
        if int(metadata["max_output_length"]) < MAX_LENGTH:
            logger.warning("artifact caps output at %s tokens, below RNNSERVE_TRANSLATE_MAX_LENGTH=%s",
                           metadata["max_output_length"], MAX_LENGTH)

    def warm_up(self) -> None:
        """Greedy and beam decodes at short and maximal input length, batch 1 and full."""
        short, long = "Hello.", ("I think so. " * (MAX_TEXT_CHARS // 12))[:MAX_TEXT_CHARS].strip()
        for text in (short, long):
            for beam_size in (1, 4):
                for batch_size in (1, SETTINGS.translate.max_batch_size):
                    item = TranslateItem(text=text, beam_size=beam_size, max_length=8)
                    translate(self.model, self.codec, [item] * batch_size, self.device)
        for _ in stream_tokens(self.model, self.codec, short, 8, self.device):
            pass

    @bentoml.api(
        batchable=True,
        max_batch_size=SETTINGS.translate.max_batch_size,
        max_latency_ms=SETTINGS.translate.max_latency_ms,
    )
    def translate(self, items: list[TranslateItem]) -> list[Translation]:
        return translate(self.model, self.codec, items, self.device)

    @bentoml.api
    def stream(self, text: str, max_length: int = MAX_LENGTH) -> Generator[str, None, None]:
        """Server-sent event frames of a greedy translation (see ``stream_tokens``)."""
        for event in stream_tokens(self.model, self.codec, text, max_length, self.device):
            yield sse_frame(event)
