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
   memory never outgrows what its rows need.

The model is reached only through two callbacks, so the loop serves any recurrent decoder:
``encode(inputs) -> (memory, state, widths)`` and ``step(tokens, state, memory) -> (log_probs, state,
attention or None)``. ``memory`` is a tuple of tensors with rows on dim 0 and the source position on
dim 1, padded with zeros; the model must ignore zero padding (the translator masks it; the
captioner's memory has one width). ``state`` is ``models.rnn.StatefulRNN``'s one tensor (S*L, B, H).

Rows never interact in a step (the models' batched-equals-alone property), so a sequence decodes
exactly as it would alone, whoever shares its steps (tests/unit/test_decoding.py proves it).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections import abc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from services.errors import ServiceError
from services.metrics import (
    DECODER_ACTIVE_ROWS,
    DECODER_QUEUE_LENGTH,
    DECODER_RETIRED_ROWS_TOTAL,
    DECODER_STEP_SECONDS,
    DECODER_TIME_TO_FIRST_TOKEN_SECONDS,
    DECODER_TOKENS_PER_STEP,
)
from services.search import Done, Failed, Greedy, Hypothesis, Sequence, Token, Vocabulary

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


def _pad_width(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pads dim 1 to ``width``. Shape: (R, W, ...) -> (R, width, ...)."""
    extra = width - tensor.shape[1]
    if extra <= 0:
        return tensor
    return torch.cat([tensor, tensor.new_zeros((tensor.shape[0], extra, *tensor.shape[2:]))], dim=1)


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
            self.thread = threading.Thread(target=self._run, name=f"rnnserve-{self.name}-decoder",
                                           daemon=True)
            self.thread.start()
        return self

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def _run(self) -> None:
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
        now = self.clock()
        self._purge(now)
        self._admit()
        batch = self.batch
        if not batch.sequences:
            self._rows_gauge.set(0)
            return 0
        started = time.perf_counter()
        log_probs, state, attention = self.step_fn(batch.previous, batch.state, batch.memory)
        best_scores, best = log_probs.max(dim=1)  # (R,): every greedy row's choice in one call
        best_ids, best_logprobs = best.tolist(), best_scores.tolist()
        rows = batch.rows
        keep: list[int] = []
        next_tokens: list[int] = []
        kept: list[Sequence] = []
        reordered = False
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
        batch.sequences = kept
        if not kept:
            self.batch = Batch()
        else:
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            if reordered or retired:
                state = state.index_select(1, index)
            if retired:  # rows of one sequence share its memory: the parent index selects it too
                width = _active_width(kept, batch.memory)
                batch.memory = tuple(m[:, :width].index_select(0, index) for m in batch.memory)
            batch.state = state
            batch.previous = torch.tensor(next_tokens, dtype=torch.long, device=self.device)
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
        self.batch = Batch(kept, tuple(m[:, :width].index_select(0, index) for m in batch.memory),
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

    def _admit(self) -> None:
        """FIFO: the head waits until its rows fit, so a beam is never overtaken by later greedy rows."""
        admitted: list[Sequence] = []
        with self.lock:
            rows = self.batch.rows
            while self.queue and (rows + self.queue[0].rows <= self.max_rows or rows == 0):
                sequence = self.queue.popleft()
                admitted.append(sequence)
                rows += sequence.rows
            if admitted:
                self._queue_gauge.set(len(self.queue))
        if not admitted:
            return
        try:
            memory, state, _ = self.encode_fn([s.input for s in admitted])  # (G, W, ...), (S, G, H)
        except Exception:
            logger.exception("%s encoder failed for %d sequences", self.name, len(admitted))
            for sequence in admitted:
                self._finish(sequence, "error", Failed(ServiceError.internal()))
            return
        if any(s.rows > 1 for s in admitted):  # a beam of k: k rows sharing one encoding
            index = torch.tensor([g for g, s in enumerate(admitted) for _ in range(s.rows)], dtype=torch.long,
                                 device=self.device)
            memory = tuple(m.index_select(0, index) for m in memory)
            state = state.index_select(1, index)
        previous = torch.full((state.shape[1],), self.vocab.bos_id, dtype=torch.long, device=self.device)
        batch = self.batch
        if not batch.sequences:
            self.batch = Batch(admitted, tuple(memory), state, previous)
            return
        width = max(batch.memory[0].shape[1], memory[0].shape[1]) if memory else 0
        batch.memory = tuple(torch.cat([_pad_width(old, width), _pad_width(new, width)], dim=0)
                             for old, new in zip(batch.memory, memory, strict=True))
        batch.state = torch.cat([batch.state, state], dim=1)
        batch.previous = torch.cat([batch.previous, previous])
        batch.sequences = batch.sequences + admitted

    def _finish(self, sequence: Sequence, reason: str, event: Done | Failed | None) -> None:
        sequence.outcome = reason
        self.retired[reason] += sequence.rows
        DECODER_RETIRED_ROWS_TOTAL.labels(self.name, reason).inc(sequence.rows)
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
        return [_unwrap(results[i]) for i in range(len(sequences))]


def _unwrap(event: Done | Failed) -> Hypothesis:
    if isinstance(event, Failed):
        raise event.error
    return event.hypothesis


async def generate(scheduler: DecodeScheduler, sequences: abc.Sequence[Sequence]) -> list[Hypothesis]:
    """Submits every sequence and awaits all results; if the caller is cancelled (its client went
    away), the sequences are cancelled and leave the batch at the next step."""
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in sequences]

    def settle(future: asyncio.Future, event: Done | Failed) -> None:
        if not future.done():
            future.set_result(event)

    for sequence, future in zip(sequences, futures, strict=True):
        def notify(event, future=future):
            if isinstance(event, Done | Failed):
                loop.call_soon_threadsafe(settle, future, event)
        sequence.notify = notify
    scheduler.submit(sequences)
    try:
        return [_unwrap(event) for event in await asyncio.gather(*futures)]
    finally:
        for sequence in sequences:
            sequence.cancel()  # no-op for finished ones; frees the rows of the others


async def stream(scheduler: DecodeScheduler, sequence: Sequence) -> AsyncIterator[Token | Done]:
    """Yields ``Token`` events as the loop emits them, then ``Done``; raises a ``Failed`` error. Closing
    the iterator (a client that disconnected) cancels the sequence: its rows leave at the next step."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Token | Done | Failed] = asyncio.Queue()
    sequence.stream = True
    sequence.notify = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
    scheduler.submit([sequence])
    try:
        while True:
            event = await events.get()
            if isinstance(event, Failed):
                raise event.error
            yield event
            if isinstance(event, Done):
                return
    finally:
        sequence.cancel()

