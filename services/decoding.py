"""Iteration-level scheduling for recurrent decoders: requests join and leave the running batch at
every decoder step (Orca, Yu et al., OSDI 2022; the loop of TGI's ``router/src/infer`` batching task
and vLLM's scheduler, done here for an RNN encoder-decoder instead of a transformer's KV cache).

One thread owns the model. Each iteration of ``DecodeScheduler.iterate``:

1. **retire** sequences whose client went away (``cancel``) or whose deadline passed, before any work;
2. **admit** waiting sequences in FIFO order while their rows fit under ``max_rows``, encode them in
   one batched call, and join their rows to the running batch (a beam of k is k rows);
3. **step**: one decoder step for every active row (one model call);
4. **advance**: each sequence picks its tokens (greedy: the row's argmax; beam: top-k over its k
   rows, with its own scores, lengths and history), emits them, and finishes at end-of-sequence or at
   its own length limit;
5. **gather**: reorder the recurrent state by parent row (beams), drop the rows of finished
   sequences at once, and trim the padded encoder memory to the longest source still active, so the
   memory never outgrows what its rows need. The waiting sequences that now fit are admitted in the
   same gather: the memory is copied once per iteration, not once to drop rows and again to add them.

Callers on an event loop wait for results and stream tokens through ``services/decode_events.py``.

The model is reached only through two callbacks, so the loop serves any recurrent decoder:
``encode(inputs) -> (memory, state, widths)`` and ``step(tokens, state, memory) -> (log_probs, state,
attention or None)``. ``memory`` is a tuple of tensors with rows on dim 0 and the source position on
dim 1, padded with zeros; the model must ignore zero padding (the translator masks it; the
captioner's memory has one width). ``state`` is ``models.rnn.StatefulRNN``'s one tensor (S*L, B, H).

Rows never interact in a step (the models' batched-equals-alone property), so a sequence decodes
exactly as it would alone, whoever shares its steps (tests/unit/test_decoding.py proves it).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from services.errors import ServiceError
from services.inprocess import pin_torch_threads
from services.metrics import (
    DECODER_ACTIVE_ROWS,
    DECODER_QUEUE_LENGTH,
    DECODER_RETIRED_ROWS_TOTAL,
    DECODER_STEP_SECONDS,
    DECODER_TIME_TO_FIRST_TOKEN_SECONDS,
    DECODER_TOKENS_PER_STEP,
)
from services.search import Done, Failed, Greedy, Hypothesis, Sequence, Token, Vocabulary, result_of

logger = logging.getLogger(__name__)

Memory = tuple[torch.Tensor, ...]
EncodeFn = Callable[[list[Any]], tuple[Memory, torch.Tensor, list[int]]]
StepFn = Callable[[torch.Tensor, torch.Tensor, Memory],
                  tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
REASONS = ("eos", "max_length", "cancelled", "deadline", "error")


@dataclass
class Batch:
    """The running batch: rows of active sequences, contiguous per sequence, in admission order."""

    sequences: list[Sequence] = field(default_factory=list)
    memory: Memory = ()
    state: torch.Tensor | None = None
    previous: torch.Tensor | None = None  # (R,) the token each row feeds to the next step

    @property
    def rows(self) -> int:
        return 0 if self.previous is None else int(self.previous.shape[0])


def _active_width(sequences: list[Sequence], memory: Memory) -> int:
    """The memory width the active sequences need: their longest source (0 = the whole width)."""
    widths = [s.width for s in sequences]
    return memory[0].shape[1] if 0 in widths or not memory else max(widths)


def _assemble(old: torch.Tensor, keep: torch.Tensor | None, new: torch.Tensor | None,
              width: int) -> torch.Tensor:
    """Rows ``keep`` of ``old`` (all of them when None), then every row of ``new``, trimmed or zero-padded
    on dim 1 to ``width``, written once into one new tensor (a retire and an admission in one copy,
    not an ``index_select`` and then a ``cat``). Shape: (R, W, ...), (R',), (G, Wn, ...) -> (R'+G,
    width, ...)."""
    kept = old.shape[0] if keep is None else keep.shape[0]
    added = 0 if new is None else new.shape[0]
    out = old.new_empty((kept + added, width, *old.shape[2:]))
    head, source = out[:kept], old[:, :width]
    shared = source.shape[1]
    if shared == width and keep is not None:
        torch.index_select(source, 0, keep, out=head)  # head is contiguous: one copy, no temporary
    else:
        head[:, :shared].copy_(source if keep is None else source.index_select(0, keep))
        head[:, shared:].zero_()
    if new is not None:
        tail, shared = out[kept:], min(new.shape[1], width)
        tail[:, :shared].copy_(new[:, :shared])
        tail[:, shared:].zero_()
    return out


class DecodeScheduler:
    """FIFO queue -> running batch -> one decoder step per iteration, for one model.

    ``submit`` (any thread) queues sequences or raises 503 past ``max_queue``; ``start`` runs
    ``iterate`` in a daemon thread whenever there is work; tests call ``iterate`` directly to choose
    arrival steps. ``max_rows`` caps the rows stepped together; a sequence wider than the cap still
    runs, alone.
    """

    def __init__(self, name: str, encode: EncodeFn, step: StepFn, vocab: Vocabulary, *, max_rows: int,
                 max_queue: int, device: str = "cpu", clock: Callable[[], float] = time.monotonic):
        self.name, self.encode_fn, self.step_fn, self.vocab = name, encode, step, vocab
        self.device = torch.device(device)
        self.max_rows, self.max_queue, self.clock = max_rows, max_queue, clock
        self.queue: collections.deque[Sequence] = collections.deque()
        self.batch = Batch()
        self.lock = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.steps = 0
        self.retired: collections.Counter[str] = collections.Counter()  # rows, by reason
        self._queue_gauge = DECODER_QUEUE_LENGTH.labels(name)
        self._rows_gauge = DECODER_ACTIVE_ROWS.labels(name)
        self._step_seconds = DECODER_STEP_SECONDS.labels(name)
        self._tokens_per_step = DECODER_TOKENS_PER_STEP.labels(name)
        self._first_token = DECODER_TIME_TO_FIRST_TOKEN_SECONDS.labels(name)
        self._retired_rows = {reason: DECODER_RETIRED_ROWS_TOTAL.labels(name, reason) for reason in REASONS}

    # -- entry points ------------------------------------------------------------------------------
    def submit(self, sequences: abc.Sequence[Sequence]) -> None:
        """Queues every sequence, or none: 503 ``overloaded`` when the queue cannot take them all."""
        with self.lock:
            if self.stopping:
                raise ServiceError.unavailable(f"The {self.name} decoder is shutting down; retry.",
                                               "unavailable")
            if len(self.queue) + len(sequences) > self.max_queue:
                raise ServiceError.unavailable(
                    f"The {self.name} decoder queue holds {len(self.queue)} items and its limit is "
                    f"{self.max_queue} (RNNSERVE_{self.name.upper()}_MAX_QUEUE); retry after the "
                    "Retry-After seconds.", "overloaded")
            now = self.clock()
            for sequence in sequences:
                sequence.submitted = now
                self.queue.append(sequence)
            self._queue_gauge.set(len(self.queue))
            self.lock.notify()

    @property
    def active_rows(self) -> int:
        return self.batch.rows

    @property
    def busy(self) -> bool:
        return bool(self.queue) or bool(self.batch.sequences)

    def start(self) -> DecodeScheduler:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, args=(torch.get_num_threads(),),
                                           name=f"rnnserve-{self.name}-decoder", daemon=True)
            self.thread.start()
        return self

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def _run(self, threads: int) -> None:
        pin_torch_threads(threads)  # the service's torch threads in this thread too (services/inprocess.py)
        with torch.inference_mode():  # thread-local: entered once, in the thread that steps
            while True:
                with self.lock:
                    while not self.busy and not self.stopping:
                        self.lock.wait()
                    if self.stopping:
                        return
                try:
                    self.iterate()
                except Exception:  # a bug: fail what is running, keep the loop alive for the next ones
                    logger.exception("%s decoder iteration failed", self.name)
                    self._fail_all()

    # -- one iteration -----------------------------------------------------------------------------
    @torch.inference_mode()
    def iterate(self) -> int:
        """Retire, admit, step, advance, gather. Returns the rows stepped (0 when idle)."""
        started = time.perf_counter()  # the iteration's wall time, admissions' encoder calls included
        now = self.clock()
        self._purge(now)
        self._admit()
        batch = self.batch
        if not batch.sequences:
            self._rows_gauge.set(0)
            return 0
        log_probs, state, attention = self.step_fn(batch.previous, batch.state, batch.memory)
        best_scores, best = log_probs.max(dim=1)  # (R,): every greedy row's choice in one call
        best_ids, best_logprobs = best.tolist(), best_scores.tolist()
        rows = batch.rows
        keep: list[int] = []
        next_tokens: list[int] = []
        kept: list[Sequence] = []
        reordered = beams = False
        offset = 0
        now = self.clock()
        for sequence in batch.sequences:
            search = sequence.search
            if isinstance(search, Greedy):
                token = best_ids[offset]
                wanted = search.attention is not None and attention is not None
                row_attention = attention[offset] if wanted else None
                search.advance(token, best_logprobs[offset], row_attention)
                parents, tokens = [offset], [token]
                if sequence.stream:
                    sequence.notify(Token(search.steps - 1, token, best_logprobs[offset]))
            else:
                span = slice(offset, offset + sequence.rows)
                local, tokens = search.advance(log_probs[span],
                                               attention[span] if attention is not None else None)
                parents = [offset + p for p in local]
                reordered = reordered or local != list(range(sequence.rows))
                beams = True
            if sequence.first_token_at is None:
                sequence.first_token_at = now
                self._first_token.observe(now - sequence.submitted)
            if search.reason is not None:
                self._finish(sequence, search.reason, Done(search.result()))
            else:
                keep.extend(parents)
                next_tokens.extend(tokens)
                kept.append(sequence)
            offset += sequence.rows
        self.steps += 1
        retired = len(kept) < len(batch.sequences)
        if not retired and not reordered:  # every row goes on as it is: nothing to gather
            batch.sequences, batch.state = kept, state
            batch.previous = (torch.tensor(next_tokens, dtype=torch.long, device=self.device) if beams
                              else best)
        else:
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            previous = (torch.tensor(next_tokens, dtype=torch.long, device=self.device) if beams
                        else best.index_select(0, index))
            if retired:  # the rows that left make room: the waiting join in the same gather
                self._regather(kept, index, state.index_select(1, index), previous)
            else:  # beams reordered their rows; rows of one sequence share its memory
                batch.state, batch.previous = state.index_select(1, index), previous
        self._step_seconds.observe(time.perf_counter() - started)
        self._tokens_per_step.observe(rows)
        self._rows_gauge.set(self.batch.rows)
        return rows

    def _purge(self, now: float) -> None:
        """Drops cancelled and expired sequences, queued or running, before any work is spent on them."""
        with self.lock:
            if any(s.cancelled or now >= s.deadline for s in self.queue):
                waiting = collections.deque()
                for sequence in self.queue:
                    if sequence.cancelled or now >= sequence.deadline:
                        self._drop(sequence, now)
                    else:
                        waiting.append(sequence)
                self.queue = waiting
                self._queue_gauge.set(len(self.queue))
        batch = self.batch
        if not any(s.cancelled or now >= s.deadline for s in batch.sequences):
            return
        keep: list[int] = []
        kept: list[Sequence] = []
        offset = 0
        for sequence in batch.sequences:
            if sequence.cancelled or now >= sequence.deadline:
                self._drop(sequence, now)
            else:
                keep.extend(range(offset, offset + sequence.rows))
                kept.append(sequence)
            offset += sequence.rows
        if not kept:
            self.batch = Batch()
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        width = _active_width(kept, batch.memory)
        self.batch = Batch(kept, tuple(_assemble(m, index, None, width) for m in batch.memory),
                           batch.state.index_select(1, index), batch.previous.index_select(0, index))

    def _drop(self, sequence: Sequence, now: float) -> None:
        if sequence.cancelled:
            self._finish(sequence, "cancelled", None)
        else:
            waited = now - sequence.submitted
            self._finish(sequence, "deadline", Failed(ServiceError.unavailable(
                f"The {self.name} request passed its deadline after {waited:.1f} s "
                f"(RNNSERVE_{self.name.upper()}_DEADLINE_S) and was stopped; retry when the service is "
                "less busy.", "timeout")))

    def _take(self, rows: int) -> list[Sequence]:
        """FIFO: the head waits until its rows fit, so a beam is never overtaken by later greedy rows.
        Everything waiting that fits is taken at once (one encoder call for all of it)."""
        admitted: list[Sequence] = []
        if not self.queue:  # unlocked peek: a sequence queued just after is taken at the next step
            return admitted
        with self.lock:
            while self.queue and (rows + self.queue[0].rows <= self.max_rows or rows == 0):
                sequence = self.queue.popleft()
                admitted.append(sequence)
                rows += sequence.rows
            if admitted:
                self._queue_gauge.set(len(self.queue))
        return admitted

    def _encode(self, admitted: list[Sequence]) -> tuple[Memory, torch.Tensor, torch.Tensor] | None:
        """Encodes the admitted sequences in one call: (memory, state, previous) with a beam of k as k
        rows; None (each failed with a 500) when the encoder raised."""
        try:
            memory, state, _ = self.encode_fn([s.input for s in admitted])  # (G, W, ...), (S, G, H)
        except Exception:
            logger.exception("%s encoder failed for %d sequences", self.name, len(admitted))
            for sequence in admitted:
                self._finish(sequence, "error", Failed(ServiceError.internal()))
            return None
        if any(s.rows > 1 for s in admitted):  # a beam of k: k rows sharing one encoding
            index = torch.tensor([g for g, s in enumerate(admitted) for _ in range(s.rows)], dtype=torch.long,
                                 device=self.device)
            memory = tuple(m.index_select(0, index) for m in memory)
            state = state.index_select(1, index)
        previous = torch.full((state.shape[1],), self.vocab.bos_id, dtype=torch.long, device=self.device)
        return tuple(memory), state, previous

    def _admit(self) -> None:
        """Joins what is waiting to the running batch (at the start of an iteration)."""
        admitted = self._take(self.batch.rows)
        if not admitted:
            return
        encoded = self._encode(admitted)
        if encoded is None:
            return
        memory, state, previous = encoded
        batch = self.batch
        if not batch.sequences:
            self.batch = Batch(admitted, memory, state, previous)
            return
        width = max(batch.memory[0].shape[1], memory[0].shape[1]) if memory else 0
        batch.memory = tuple(_assemble(old, None, new, width)
                             for old, new in zip(batch.memory, memory, strict=True))
        batch.state = torch.cat([batch.state, state], dim=1)
        batch.previous = torch.cat([batch.previous, previous])
        batch.sequences = batch.sequences + admitted

    def _regather(self, kept: list[Sequence], index: torch.Tensor, state: torch.Tensor,
                  previous: torch.Tensor) -> None:
        """After rows retired: the memory rows ``index`` of the sequences that stay (``state`` and
        ``previous`` already gathered) and, in the same copy, whatever waits and now fits. The memory
        is trimmed to the longest source still active."""
        batch = self.batch
        admitted = self._take(int(index.shape[0]))
        encoded = self._encode(admitted) if admitted else None
        if not kept and encoded is None:
            self.batch = Batch()
            return
        if encoded is None:
            admitted, new_memory = [], (None,) * len(batch.memory)
        else:
            new_memory, new_state, new_previous = encoded
            state = torch.cat([state, new_state], dim=1)
            previous = torch.cat([previous, new_previous])
        sequences = kept + admitted
        width = _active_width(sequences, batch.memory)
        if encoded is not None and new_memory:
            width = max(width if kept else 0, new_memory[0].shape[1])
        self.batch = Batch(sequences, tuple(_assemble(old, index, new, width)
                                            for old, new in zip(batch.memory, new_memory, strict=True)),
                           state, previous)

    def _finish(self, sequence: Sequence, reason: str, event: Done | Failed | None) -> None:
        sequence.outcome = reason
        self.retired[reason] += sequence.rows
        counter = self._retired_rows.get(reason) or DECODER_RETIRED_ROWS_TOTAL.labels(self.name, reason)
        counter.inc(sequence.rows)
        if event is not None:
            try:
                sequence.notify(event)
            except Exception:  # a listener's failure must not stop the loop for the others
                logger.exception("%s listener failed", self.name)

    def _fail_all(self) -> None:
        for sequence in self.batch.sequences:
            self._finish(sequence, "error", Failed(ServiceError.internal()))
        self.batch = Batch()
        self._rows_gauge.set(0)

    # -- waiting for results -----------------------------------------------------------------------
    def run(self, sequences: abc.Sequence[Sequence], timeout_s: float = 60.0) -> list[Hypothesis]:
        """Blocking: submits and waits (for warm-up and scripts; the loop must be running)."""
        done = threading.Event()
        results: dict[int, Done | Failed] = {}
        for index, sequence in enumerate(sequences):
            def notify(event, index=index):
                if isinstance(event, Done | Failed):
                    results[index] = event
                    if len(results) == len(sequences):
                        done.set()
            sequence.notify = notify
        self.submit(sequences)
        if not done.wait(timeout_s):
            for sequence in sequences:
                sequence.cancel()
            raise TimeoutError(f"{self.name}: {len(sequences)} sequences not done in {timeout_s} s")
        return [result_of(results[i]) for i in range(len(sequences))]
