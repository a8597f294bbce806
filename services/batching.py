"""Length-aware collate and split, shared by every sequence model service.

The batching contract: ``list[item]`` in, a list of the same length and order out. Inside, items are
sorted longest first so the packed RNN runs without a permutation and padding stays minimal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch

from models.rnn import pad_sequences
from services.metrics import BATCH_PADDING_RATIO, INPUT_LENGTH_TOKENS

T = TypeVar("T")


def collate(
    sequences: Sequence[list[int]], model: str, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Sorts by length (longest first), pads, and records length and padding metrics.

    Returns:
        tokens (B, T), lengths (B,) on ``device``, and ``order``: row i of the batch is input
        ``order[i]``.
    """
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    tokens, lengths = pad_sequences([sequences[i] for i in order])
    for length in lengths.tolist():
        INPUT_LENGTH_TOKENS.labels(model).observe(length)
    BATCH_PADDING_RATIO.labels(model).observe(padding_ratio(lengths))
    return tokens.to(device), lengths.to(device), order


def padding_ratio(lengths: torch.Tensor) -> float:
    """Fraction of the padded (B, T) grid that is padding."""
    return 1.0 - float(lengths.sum()) / float(len(lengths) * int(lengths.max()))


def split(rows: Sequence[T], order: list[int]) -> list[T]:
    """Puts batch rows back in request order (inverse of ``collate``'s sort)."""
    assert len(rows) == len(order), f"{len(rows)} outputs for {len(order)} inputs"
    out: list[T | None] = [None] * len(order)
    for row, index in zip(rows, order, strict=True):
        out[index] = row
    return out  # type: ignore[return-value]
