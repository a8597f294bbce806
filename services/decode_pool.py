"""A small bounded thread pool for CPU- and memory-heavy work off the event loop (image decoding).

``asyncio.to_thread`` uses the loop's default executor: up to cores + 4 threads per worker, each
free to decode an image at once, and an unbounded queue behind them. A decode holds a few times the
image's decoded size (models/images.py), so that pool multiplied the worst case by its thread count
(issue 13, finding 5). ``BoundedPool`` runs at most ``workers`` calls at once and lets ``queue``
more wait; one more is refused at once with 503 + Retry-After, before it costs anything. A call stays
counted until its thread has finished it, even when the request that asked for it has gone away.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from services.errors import ServiceError
from services.settings import SETTINGS

T = TypeVar("T")


class BoundedPool:
    """At most ``workers`` calls running and ``queue`` waiting; past that ``ServiceError`` 503."""

    def __init__(self, workers: int, queue: int, *, name: str, settings: str) -> None:
        self.workers, self.queue, self.name, self.settings = workers, queue, name, settings
        self.pending = 0  # submitted and not finished (running or waiting)
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None  # made on first use: after the worker forks

    def _release(self, _: Future) -> None:
        with self._lock:
            self.pending -= 1

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` in one of the pool's threads; 503 ``overloaded`` when the pool is full."""
        with self._lock:
            if self.pending >= self.workers + self.queue:
                raise ServiceError(
                    503, "overloaded",
                    f"{self.pending} {self.name} jobs are running or waiting in this worker; the limit is "
                    f"{self.workers} running and {self.queue} waiting ({self.settings}). Retry after "
                    f"{SETTINGS.http.retry_after_s} s.")
            self.pending += 1
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix=self.name)
        try:
            future = self._executor.submit(functools.partial(function, *args))
        except BaseException:
            with self._lock:
                self.pending -= 1
            raise
        future.add_done_callback(self._release)
        return await asyncio.wrap_future(future)
