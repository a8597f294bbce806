"""Sentiment model service: batched, length-sorted, packed inference on one artifact.

The endpoint is a thin chain of pure helpers, ``encode -> collate -> predict -> split``, each testable
without a server. ``SentimentModel`` holds the loaded artifact; the entry service (``services/api.py``)
runs one in each of its workers and merges concurrent requests with BentoML's adaptive batcher there
(``services/inprocess.py``), and ``Sentiment`` serves it alone as a BentoML service.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import bentoml
import torch

import services.bentoml_compat  # noqa: F401 - patches BentoML: no URL fetches, less per-request overhead
from models.text import Vocab
from services.artifacts import load_stored_model
from services.batching import LengthGrouping, collate, run_in_groups, split
from services.errors import ServiceError
from services.lifecycle import ModelService, model_service_config
from services.metrics import INFERENCE_SECONDS
from services.schemas.common import ModelInfo
from services.schemas.sentiment import SentimentResult
from services.settings import SETTINGS

logger = logging.getLogger(__name__)
NAME = "sentiment"
WARMUP_LENGTHS = (1, 4, 16, 64)  # and the artifact's max_tokens


def encode(vocab: Vocab, texts: list[str], max_tokens: int,
           field_of: Callable[[int], str] | None = None) -> list[list[int]]:
    """Token ids per text, each checked once against the model's limit: a text with no token or
    more than ``max_tokens`` is a 400 naming its field (``field_of(i)``, else ``texts[i]``; only
    built for an error)."""
    encoded = [vocab.encode(text) for text in texts]
    for index, ids in enumerate(encoded):
        if ids and len(ids) <= max_tokens:
            continue
        field = field_of(index) if field_of is not None else f"texts[{index}]"
        if not ids:
            raise ServiceError(400, "validation_error", f"{field}: the text holds no word or punctuation "
                               "token", field)
        if len(ids) > max_tokens:
            raise ServiceError(400, "validation_error", f"{field}: the text has {len(ids)} tokens; the "
                               f"limit is {max_tokens}. Split it into shorter texts; it is never truncated",
                               field)
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


def classify(model: torch.nn.Module, labels: list[str], encoded: list[list[int]], device: str = "cpu",
             grouping: LengthGrouping | None = None) -> list[SentimentResult]:
    """The whole batched path: token ids in (``encode``), one result per text out, in order.

    With ``grouping``, the batch is split into length groups when that lowers padding cost
    (``services.batching.plan_groups``); results are the same either way.
    """
    if not encoded:
        return []

    def run(sequences: list[list[int]]) -> list[SentimentResult]:
        tokens, lengths, order = collate(sequences, NAME, device)
        return split(to_results(predict(model, tokens, lengths), lengths.tolist(), labels), order)

    return run_in_groups(encoded, [len(ids) for ids in encoded], run, grouping)


def grouping_from_settings() -> LengthGrouping:
    return LengthGrouping(SETTINGS.sentiment.length_groups, SETTINGS.sentiment.group_step_tokens,
                          SETTINGS.sentiment.group_call_tokens)


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
        self.max_tokens = int(metadata["max_tokens"])  # the limit the model was trained and exported for
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
        for length in (*WARMUP_LENGTHS, self.max_tokens):
            for batch_size in (1, SETTINGS.sentiment.max_batch_size):
                self.classify([[2] * length] * batch_size)

    def encode(self, texts: list[str], field_of: Callable[[int], str] | None = None) -> list[list[int]]:
        return encode(self.vocab, texts, self.max_tokens, field_of)

    def classify(self, encoded: list[list[int]]) -> list[SentimentResult]:
        return classify(self.model, self.labels, encoded, self.device, self.grouping)


@bentoml.service(name=NAME, **model_service_config(workers=SETTINGS.sentiment.workers))
class Sentiment(ModelService):
    """The sentiment model alone, as its own BentoML service (``bentoml serve
    services.sentiment:Sentiment``): a batchable ``/classify`` for a dedicated deployment. The public
    API (services/api.py) runs the same ``SentimentModel`` inside its own workers instead."""

    name = NAME
    bento_model = bentoml.models.BentoModel(SETTINGS.sentiment.model)
    threads = SETTINGS.sentiment.threads

    def setup(self, model: torch.jit.ScriptModule, metadata: dict) -> None:
        self.runner = SentimentModel(model, metadata, self.model_info, self.device)

    def warm_up(self) -> None:
        self.runner.warm_up()

    @bentoml.api(
        batchable=SETTINGS.batching == "on",  # "off" only to measure what batching buys (load/bench.py)
        max_batch_size=SETTINGS.sentiment.max_batch_size,
        max_latency_ms=SETTINGS.sentiment.max_latency_ms,
    )
    def classify(self, texts: list[str]) -> list[SentimentResult]:
        return self.runner.classify(self.runner.encode(texts))
