"""Sentiment model service: batched, length-sorted, packed inference on one artifact.

The endpoint is a thin chain of pure helpers, ``encode -> collate -> predict -> split``, each testable
without a server. ``SentimentModel`` holds the loaded artifact; the entry service (``services/api.py``)
runs one in each of its workers and merges concurrent requests with BentoML's adaptive batcher there
(``services/inprocess.py``), and ``Sentiment`` serves it alone as a BentoML service.
"""

from __future__ import annotations

import logging
import time

import bentoml
import torch

import services.bentoml_compat  # noqa: F401 - patches BentoML: no URL fetches, less per-request overhead
from models.text import Vocab
from services.artifacts import load_stored_model
from services.batching import LengthGrouping, collate, run_in_groups, split
from services.lifecycle import ModelService, model_service_config
from services.metrics import INFERENCE_SECONDS
from services.schemas.common import ModelInfo
from services.schemas.sentiment import MAX_TOKENS, SentimentResult
from services.settings import SETTINGS

logger = logging.getLogger(__name__)
NAME = "sentiment"
WARMUP_LENGTHS = (1, 4, 16, 64, MAX_TOKENS)


def encode(vocab: Vocab, texts: list[str]) -> list[list[int]]:
    """Token ids per text. Texts were validated upstream to hold 1..MAX_TOKENS tokens."""
    encoded = [vocab.encode(text) for text in texts]
    for text, ids in zip(texts, encoded, strict=True):
        if not ids or len(ids) > MAX_TOKENS:
            raise ValueError(f"text of {len(ids)} tokens reached the model: {text[:40]!r}")
    return encoded


@torch.inference_mode()
def predict(model: torch.nn.Module, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Class probabilities, (B, C), on the CPU."""
    started = time.perf_counter()
    probabilities = torch.softmax(model(tokens, lengths), dim=-1).cpu()
    INFERENCE_SECONDS.labels(NAME).observe(time.perf_counter() - started)
    return probabilities


def to_results(probabilities: torch.Tensor, lengths: list[int], labels: list[str]) -> list[SentimentResult]:
    results = []
    for row, length in zip(probabilities.tolist(), lengths, strict=True):
        best = max(range(len(labels)), key=row.__getitem__)
        results.append(SentimentResult(
            label=labels[best], score=row[best],
            probabilities=dict(zip(labels, row, strict=True)), tokens=length,
        ))
    return results


def classify(model: torch.nn.Module, vocab: Vocab, labels: list[str], texts: list[str],
             device: str = "cpu", grouping: LengthGrouping | None = None) -> list[SentimentResult]:
    """The whole batched path: texts in, one result per text out, in order.

    With ``grouping``, the batch is split into length groups when that lowers padding cost
    (``services.batching.plan_groups``); results are the same either way.
    """
    if not texts:
        return []

    def run(sequences: list[list[int]]) -> list[SentimentResult]:
        tokens, lengths, order = collate(sequences, NAME, device)
        return split(to_results(predict(model, tokens, lengths), lengths.tolist(), labels), order)

    encoded = encode(vocab, texts)
    return run_in_groups(encoded, [len(ids) for ids in encoded], run, grouping)


def grouping_from_settings() -> LengthGrouping:
    return LengthGrouping(SETTINGS.sentiment_length_groups, SETTINGS.sentiment_group_step_tokens,
                          SETTINGS.sentiment_group_call_tokens)


class SentimentModel:
    """The verified sentiment artifact and its batched path.

    The entry service runs one in each worker (services/inprocess.py); ``Sentiment`` below serves it
    alone as a BentoML service.
    """

    def __init__(self, model: torch.jit.ScriptModule, metadata: dict, model_info: ModelInfo,
                 device: str) -> None:
        self.model, self.metadata, self.model_info, self.device = model, metadata, model_info, device
        self.vocab = Vocab(metadata["vocab"])
        self.labels = list(metadata["labels"])
        self.grouping = grouping_from_settings()

    @classmethod
    def load(cls, stored, device: str) -> SentimentModel:
        """Loads a model-store entry (checksum-verified) and warms it up."""
        runner = cls(*load_stored_model(stored, device), device)
        started = time.perf_counter()
        runner.warm_up()
        logger.info("sentiment %s warmed up on %s in %.2f s", runner.model_info.version, device,
                    time.perf_counter() - started)
        return runner

    def warm_up(self) -> None:
        """Runs every warm-up length at batch 1 and at the full batch."""
        word = self.vocab.itos[2]
        for length in WARMUP_LENGTHS:
            text = " ".join([word] * length)
            for batch_size in (1, SETTINGS.sentiment_max_batch_size):
                classify(self.model, self.vocab, self.labels, [text] * batch_size, self.device)

    def classify(self, texts: list[str]) -> list[SentimentResult]:
        return classify(self.model, self.vocab, self.labels, texts, self.device, self.grouping)


@bentoml.service(name=NAME, **model_service_config(workers=SETTINGS.sentiment_workers))
class Sentiment(ModelService):
    """The sentiment model alone, as its own BentoML service (``bentoml serve
    services.sentiment:Sentiment``): a batchable ``/classify`` for a dedicated deployment. The public
    API (services/api.py) runs the same ``SentimentModel`` inside its own workers instead."""

    name = NAME
    bento_model = bentoml.models.BentoModel(SETTINGS.sentiment_model)
    threads = SETTINGS.sentiment_threads

    def setup(self, model: torch.jit.ScriptModule, metadata: dict) -> None:
        self.runner = SentimentModel(model, metadata, self.model_info, self.device)

    def warm_up(self) -> None:
        self.runner.warm_up()

    @bentoml.api(
        batchable=SETTINGS.batching == "on",  # "off" only to measure what batching buys (load/bench.py)
        max_batch_size=SETTINGS.sentiment_max_batch_size,
        max_latency_ms=SETTINGS.sentiment_max_latency_ms,
    )
    def classify(self, texts: list[str]) -> list[SentimentResult]:
        return self.runner.classify(texts)
