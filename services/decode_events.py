"""The event-loop side of the decode loop (services/decoding.py): awaiting results and streams.

The loop runs in its own thread; an endpoint awaits its sequences' results (``generate``) or iterates
their tokens (``stream``). Events reach each event loop through one mailbox per loop (``_Mailbox``):
one wake-up per burst of results and stream tokens, not one per event. Leaving early (a client that
went away) cancels the sequences: their rows leave the batch at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections import abc
from collections.abc import AsyncIterator, Callable
from typing import Any

from services.decoding import DecodeScheduler
from services.search import Done, Failed, Hypothesis, Sequence, Token, result_of

logger = logging.getLogger(__name__)


class _Mailbox:
    """Events from the decoder thread to one event loop, one wake-up per burst: every sequence that
    finishes or streams a token in a step posts here, and the loop is woken (a write to its self-pipe)
    only when nothing is already pending, instead of once per event."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[Callable[[Any], None], Any]] = []

    def post(self, callback: Callable[[Any], None], event: Any) -> None:
        with self.lock:
            self.pending.append((callback, event))
            if len(self.pending) > 1:  # a flush is already scheduled and will see this one
                return
        self.loop.call_soon_threadsafe(self.flush)

    def flush(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for callback, event in pending:
            try:
                callback(event)
            except Exception:  # one waiter's failure must not lose the others' events
                logger.exception("decoder event delivery failed")


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()
_mailboxes_lock = threading.Lock()


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    with _mailboxes_lock:
        box = _mailboxes.get(loop)
        if box is None:
            box = _mailboxes[loop] = _Mailbox(loop)
        return box


async def generate(scheduler: DecodeScheduler, sequences: abc.Sequence[Sequence]) -> list[Hypothesis]:
    """Submits every sequence and awaits all results; if the caller is cancelled (its client went
    away), the sequences are cancelled and leave the batch at the next step."""
    loop = asyncio.get_running_loop()
    box = _mailbox(loop)
    futures = [loop.create_future() for _ in sequences]

    for sequence, future in zip(sequences, futures, strict=True):
        def settle(event: Done | Failed, future: asyncio.Future = future) -> None:
            if not future.done():
                future.set_result(event)

        def notify(event, settle=settle):
            if isinstance(event, Done | Failed):
                box.post(settle, event)
        sequence.notify = notify
    scheduler.submit(sequences)
    try:
        return [result_of(event) for event in await asyncio.gather(*futures)]
    finally:
        for sequence in sequences:
            sequence.cancel()  # no-op for finished ones; frees the rows of the others


async def stream(scheduler: DecodeScheduler, sequence: Sequence) -> AsyncIterator[Token | Done]:
    """Yields ``Token`` events as the loop emits them, then ``Done``; raises a ``Failed`` error. Closing
    the iterator (a client that disconnected) cancels the sequence: its rows leave at the next step."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Token | Done | Failed] = asyncio.Queue()
    sequence.stream = True
    box = _mailbox(loop)
    sequence.notify = lambda event: box.post(events.put_nowait, event)
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

