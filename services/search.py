"""Per-sequence search state of the decode loop (services/decoding.py): greedy and beam bookkeeping.

A ``Sequence`` is one item of the loop: its model input, its search (``Greedy``: one row; ``Beam``:
k rows with their own scores, lengths and history, the arithmetic of the artifacts' own
``beam_search``), its deadline and its listener, which receives ``Token`` events and then exactly
one ``Done`` or ``Failed``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from services.errors import ServiceError


@dataclass(frozen=True)
class Vocabulary:
    """The decoder's special ids, and whether end-of-sequence is part of the output.

    The translator stops before EOS (it is neither output nor counted by ``max_length``); the
    captioner emits EOS as its last token and counts it.
    """

    bos_id: int
    eos_id: int
    pad_id: int
    eos_in_output: bool = False


@dataclass
class Hypothesis:
    """A finished sequence: output ids, their log-probabilities, the summed score (EOS's included),
    decoder steps run, why it ended (``eos`` or ``max_length``), and attention rows when asked."""

    tokens: list[int]
    token_logprobs: list[float]
    score: float
    steps: int
    reason: str
    attention: list[list[float]] | None = None


@dataclass(frozen=True)
class Token:
    """Event: a greedy sequence chose ``token`` (EOS included) at step ``index``."""

    index: int
    token: int
    logprob: float


@dataclass(frozen=True)
class Done:
    hypothesis: Hypothesis


@dataclass(frozen=True)
class Failed:
    error: ServiceError


class Greedy:
    """One row; the argmax at every step (the scheduler computes it for all rows at once)."""

    rows = 1

    def __init__(self, vocab: Vocabulary, limit: int, width: int, attention: bool = False):
        self.vocab, self.limit, self.width = vocab, max(1, limit), width
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.score = 0.0
        self.steps = 0
        self.attention: list[torch.Tensor] | None = [] if attention else None
        self.reason: str | None = None

    def advance(self, token: int, logprob: float, attention: torch.Tensor | None) -> None:
        """Shape: attention (W,) over the batch's padded memory width, W >= this source's width."""
        self.steps += 1
        self.score += logprob
        is_eos = token == self.vocab.eos_id
        if not is_eos or self.vocab.eos_in_output:
            self.tokens.append(token)
            self.logprobs.append(logprob)
            if self.attention is not None and attention is not None and not is_eos:
                self.attention.append(attention[: self.width])
        if is_eos:
            self.reason = "eos"
        elif self.steps >= self.limit:
            self.reason = "max_length"

    def result(self) -> Hypothesis:
        attention = None
        if self.attention is not None:
            attention = torch.stack(self.attention).cpu().tolist() if self.attention else []
        return Hypothesis(self.tokens, self.logprobs, self.score, self.steps, self.reason or "max_length",
                          attention)


class Beam:
    """``beam_size`` rows of one sequence with their own bookkeeping, the same arithmetic as the
    models' batched ``beam_search`` (models/translate.py, models/caption.py): a finished hypothesis
    keeps its slot and score and extends only with padding at no cost; the search ends when every
    slot has ended or at the length limit; the answer maximises ``score / ((5 + length) / 6) **
    length_penalty`` (GNMT; 0 ranks by raw score)."""

    def __init__(self, vocab: Vocabulary, beam_size: int, limit: int, width: int,
                 length_penalty: float = 0.0, attention: bool = False, vocab_size: int = 0):
        self.vocab, self.rows, self.limit, self.width = vocab, beam_size, max(1, limit), width
        self.length_penalty = length_penalty
        self.want_attention = attention
        self.scores = torch.full((beam_size,), float("-inf"))
        self.scores[0] = 0.0  # all slots start identical: keep one, so step one is not k copies
        self.finished = torch.zeros(beam_size, dtype=torch.bool)
        self.lengths = torch.zeros(beam_size, dtype=torch.long)
        self.history = torch.zeros(beam_size, 0, dtype=torch.long)  # (K, t)
        self.logprob_history = torch.zeros(beam_size, 0)  # (K, t)
        self.attention_history = torch.zeros(beam_size, 0, width)  # (K, t, S)
        self.pad_only: torch.Tensor | None = None
        self.steps = 0
        self.reason: str | None = None

    def advance(self, log_probs: torch.Tensor, attention: torch.Tensor | None) -> tuple[list[int], list[int]]:
        """One step. Returns each slot's parent slot (rows of the previous step) and its new token.

        Shape: log_probs (K, V); attention (K, W) or None.
        """
        beam, vocab = self.rows, log_probs.shape[1]
        log_probs = log_probs.cpu()  # the bookkeeping of one sequence is small: on the CPU
        attention = attention.cpu() if attention is not None and self.want_attention else None
        self.steps += 1
        if self.pad_only is None or self.pad_only.shape[0] != vocab:
            self.pad_only = torch.full((vocab,), float("-inf"), dtype=log_probs.dtype)
            self.pad_only[self.vocab.pad_id] = 0.0
        extended = torch.where(self.finished.unsqueeze(1), self.pad_only.unsqueeze(0), log_probs)  # (K, V)
        candidates = (self.scores.to(log_probs.dtype).unsqueeze(1) + extended).view(beam * vocab)
        top_scores, top_index = candidates.topk(beam)  # (K,)
        parent = torch.div(top_index, vocab, rounding_mode="floor")
        token = top_index % vocab
        was_finished = self.finished.index_select(0, parent)
        is_eos = token == self.vocab.eos_id
        grows = ~was_finished if self.vocab.eos_in_output else ~was_finished & ~is_eos
        self.lengths = self.lengths.index_select(0, parent) + grows.long()
        self.finished = was_finished | is_eos
        self.scores = top_scores
        step_logprob = log_probs.view(beam * vocab).index_select(0, top_index).masked_fill(was_finished, 0.0)
        self.history = torch.cat([self.history.index_select(0, parent), token.unsqueeze(1)], dim=1)
        self.logprob_history = torch.cat(
            [self.logprob_history.index_select(0, parent), step_logprob.unsqueeze(1)], dim=1)
        if self.want_attention and attention is not None:
            rows = attention[:, : self.width].index_select(0, parent).unsqueeze(1)  # (K, 1, S)
            self.attention_history = torch.cat([self.attention_history.index_select(0, parent), rows], dim=1)
        if bool(self.finished.all()):
            self.reason = "eos"
        elif self.steps >= self.limit:
            self.reason = "max_length"
        return parent.tolist(), token.tolist()

    def result(self) -> Hypothesis:
        norm = ((5.0 + self.lengths.to(self.scores.dtype)) / 6.0) ** self.length_penalty
        best = int((self.scores / norm).argmax())
        length = int(self.lengths[best])
        attention = None
        if self.want_attention:
            attention = self.attention_history[best, :length].tolist()
        return Hypothesis(self.history[best, :length].tolist(), self.logprob_history[best, :length].tolist(),
                          float(self.scores[best]), self.steps, self.reason or "max_length", attention)


class Sequence:
    """One item in the scheduler: its model input, its search, its deadline and its listener.

    ``width`` (from the search) is the source length its memory rows need; 0 means all of it.

    ``notify`` is called from the scheduler thread with ``Token`` (greedy sequences that ``stream``),
    then exactly one ``Done`` or ``Failed``. ``cancel`` may be called from any thread.
    """

    def __init__(self, input: Any, search: Greedy | Beam, deadline: float, stream: bool = False,
                 notify: Callable[[Token | Done | Failed], None] | None = None):
        self.input, self.search, self.deadline, self.stream = input, search, deadline, stream
        self.notify = notify or (lambda event: None)
        self.rows = search.rows
        self.width = search.width
        self.cancelled = False
        self.submitted = 0.0
        self.first_token_at: float | None = None
        self.outcome: str | None = None

    def cancel(self) -> None:
        self.cancelled = True


def result_of(event: Done | Failed) -> Hypothesis:
    """The hypothesis of a finished sequence; raises the error of a failed one."""
    if isinstance(event, Failed):
        raise event.error
    return event.hypothesis
