"""Length-aware collate and split, shared by every sequence model service.

The batching contract: ``list[item]`` in, a list of the same length and order out. Inside, items are
sorted longest first so the packed RNN runs without a permutation and padding stays minimal.

RNN cost grows with the longest sequence of a batch: one long text makes every short text batched
with it pay for padding. ``plan_groups`` splits a merged batch into length groups (contiguous runs of
the length-sorted batch) when that lowers a modelled cost, and ``run_in_groups`` calls the model once
per group while keeping the list-in/list-out order contract. The cost of one model call on a group is

    size * max_len            padded positions computed (embedding, masks, pooling, unpacked RNNs)
    + step_tokens * max_len   the per-time-step cost of a call (one kernel launch per step)
    + call_tokens             the fixed cost of a call

all in units of one padded position; ``load/bench.py`` fits these terms on the served model. Because a
single group is always a candidate and the extra terms are never negative, a plan never computes
more padded positions than the whole batch would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from models.rnn import pad_sequences
from services.metrics import BATCH_PADDING_RATIO, INPUT_LENGTH_TOKENS, PADDING_TOKENS_TOTAL

T = TypeVar("T")
R = TypeVar("R")


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
    PADDING_TOKENS_TOTAL.labels(model).inc(len(lengths) * int(lengths.max()) - int(lengths.sum()))
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


@dataclass(frozen=True)
class LengthGrouping:
    """How a merged batch may be split into length groups (see the module docstring).

    Attributes:
        max_groups: most model calls per batch; 1 turns grouping off.
        step_tokens: cost of one time step of a call, in padded positions.
        call_tokens: fixed cost of one call, in padded positions.
    """

    max_groups: int = 4
    step_tokens: float = 0.0
    call_tokens: float = 0.0

    def __post_init__(self) -> None:
        if self.max_groups < 1 or self.step_tokens < 0 or self.call_tokens < 0:
            raise ValueError(f"invalid length grouping {self}: max_groups >= 1, costs >= 0")


def padded_positions(groups: Sequence[Sequence[int]]) -> int:
    """Positions a padded (size, max_len) grid holds, summed over groups of lengths."""
    return sum(len(group) * max(group) for group in groups if group)


def plan_groups(lengths: Sequence[int], grouping: LengthGrouping | None = None) -> list[list[int]]:
    """Partitions inputs into length groups of least modelled cost.

    The optimum over contiguous runs of the length-sorted batch, found by dynamic programming over
    the distinct lengths (at most a few hundred), so planning costs microseconds, not a model call.

    Returns:
        Groups of input indices: every index exactly once, each group longest first, groups longest
        first. One group holding every index when grouping is off or does not pay.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if grouping is None or grouping.max_groups == 1 or len(order) < 2:
        return [order] if order else []
    padding = len(order) * lengths[order[0]] - sum(lengths)
    if padding <= grouping.call_tokens:  # a second call would cost more than all the padding saved
        return [order]
    # Runs of equal length are never split: doing so can only add cost.
    distinct: list[int] = []  # lengths, longest first
    ends: list[int] = []  # ends[k]: items with length >= distinct[k]
    for position, index in enumerate(order):
        if distinct and lengths[index] == distinct[-1]:
            ends[-1] = position + 1
        else:
            distinct.append(lengths[index])
            ends.append(position + 1)
    count = len(distinct)
    groups_allowed = min(grouping.max_groups, count)
    inf = float("inf")
    # best[g][k]: least cost of the items in runs 0..k-1 split into g groups; cut[g][k] the start run.
    best = [[inf] * (count + 1) for _ in range(groups_allowed + 1)]
    cut = [[0] * (count + 1) for _ in range(groups_allowed + 1)]
    best[0][0] = 0.0
    starts = [0, *ends[:-1]]
    for g in range(1, groups_allowed + 1):
        for k in range(1, count + 1):
            end = ends[k - 1]
            row, least, least_first = best[g - 1], inf, 0
            for first in range(g - 1, k):  # the group holds runs first..k-1; its max is distinct[first]
                cost = row[first] + (end - starts[first] + grouping.step_tokens) * distinct[first]
                if cost < least:
                    least, least_first = cost, first
            best[g][k], cut[g][k] = least + grouping.call_tokens, least_first
    groups_used = min(range(1, groups_allowed + 1), key=lambda g: (best[g][count], g))
    groups: list[list[int]] = []
    k = count
    for g in range(groups_used, 0, -1):
        first = cut[g][k]
        groups.append(order[starts[first]:ends[k - 1]])
        k = first
    groups.reverse()
    return groups


def run_in_groups(items: Sequence[T], lengths: Sequence[int], run: Callable[[list[T]], Sequence[R]],
                  grouping: LengthGrouping | None = None) -> list[R]:
    """Calls ``run`` once per length group (``plan_groups``) and returns results in input order.

    ``run`` takes a list of items and returns one result per item, in order (the batching contract).
    """
    assert len(items) == len(lengths), f"{len(items)} items for {len(lengths)} lengths"
    out: list[R | None] = [None] * len(items)
    for indices in plan_groups(lengths, grouping):
        results = run([items[i] for i in indices])
        assert len(results) == len(indices), f"{len(results)} outputs for {len(indices)} inputs"
        for index, result in zip(indices, results, strict=True):
            out[index] = result
    return out  # type: ignore[return-value]
