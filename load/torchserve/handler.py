"""TorchServe handler for the sentiment artifact, for the comparison of issue 15 (README.md here).

It runs this project's own path on TorchServe's batches: tokenize (``models.text.Vocab``) -> collate
(``services.batching.collate``: sort, pad, the same metrics) -> forward + softmax on the TorchScript
artifact (``models.artifact.load_artifact``) -> rows back in request order (``services.batching.split``),
one intra-op thread per worker as the project's services run. The body is the project's JSON
(``{"text": ...}``) and the answer ``{"label", "score"}``. TorchServe's Python worker finds the
repository through ``RNNSERVE_REPO``; it needs torch and prometheus_client, not BentoML.
"""

from __future__ import annotations

import json
import os
import sys

import torch

REPO = os.environ.get("RNNSERVE_REPO", "")
if REPO and REPO not in sys.path:
    sys.path.insert(0, REPO)

from models.artifact import load_artifact  # noqa: E402 - after the sys.path line above
from models.text import Vocab  # noqa: E402
from services.batching import collate, split  # noqa: E402

NAME = "sentiment"


class SentimentHandler:
    def __init__(self) -> None:
        self.model = None

    def initialize(self, context) -> None:
        torch.set_num_threads(1)
        self.model, metadata = load_artifact(context.system_properties["model_dir"])
        self.vocab, self.labels = Vocab(metadata["vocab"]), list(metadata["labels"])
        self.max_tokens = int(metadata["max_tokens"])

    @staticmethod
    def text_of(row: dict) -> str:
        body = row.get("body", row.get("data"))
        if isinstance(body, (bytes, bytearray, str)):  # a dict when TorchServe parsed the JSON itself
            body = json.loads(body)
        return body["text"]

    @torch.inference_mode()
    def handle(self, data: list[dict], context) -> list[dict]:
        encoded = [self.vocab.encode(self.text_of(row)) for row in data]
        valid = [i for i, ids in enumerate(encoded) if 0 < len(ids) <= self.max_tokens]
        out: list[dict] = [{"error": f"the text has no token or more than {self.max_tokens}"}] * len(data)
        if valid:
            tokens, lengths, order = collate([encoded[i] for i in valid], NAME)
            probabilities = torch.softmax(self.model(tokens, lengths), dim=-1)  # (B, C)
            scores, classes = probabilities.max(dim=-1)
            rows = [{"label": self.labels[c], "score": s} for c, s in zip(classes.tolist(), scores.tolist(),
                                                                         strict=True)]
            for index, row in zip(valid, split(rows, order), strict=True):
                out[index] = row
        return out


_service = SentimentHandler()


def handle(data: list[dict] | None, context) -> list[dict] | None:
    if _service.model is None:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
