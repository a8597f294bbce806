"""Models the entry worker runs itself, batched, without a second HTTP hop.

The short, stateless models (sentiment, forecast windows) cost far less to run than to forward
through another BentoML service (load/RESULTS.md). So each entry worker loads these artifacts
(``InProcessModel``) and batches concurrent requests itself (``Batcher``): the items of concurrent
requests are merged into one call of the model's batched function, on one dedicated thread per model.

The generative models (caption, translate) and the stateful forecast sessions stay in their own
services: their calls are long, and sessions must live in one process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from services.artifacts import ArtifactError
from services.bentoml_compat import exponential_buckets, metrics_histogram, service_metric_labels
from services.errors import ServiceError
from services.metrics import MODEL_LOAD_FAILED
from services.settings import SETTINGS

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")
Model = TypeVar("Model")

# Every in-process model of this worker, by name: readiness and /readyz read them.
REGISTRY: dict[str, InProcessModel[Any]] = {}


_HISTOGRAM: list[Any] = []


def batch_size_histogram(max_batch_size: int) -> Any:
    """BentoML's own ``bentoml_service_adaptive_batch_size`` histogram (requests merged per call), so
    dashboards and load/bench.py read one metric wherever the batching runs.

    A process can register the name once: the first batcher's ``max_batch_size`` sets the buckets
    (the entry passes the largest of its batchers'), later ones share it.
    """
    if not _HISTOGRAM:
        _HISTOGRAM.append(metrics_histogram(
            namespace="bentoml_service", name="adaptive_batch_size",
            documentation="Service adaptive batch size",
            labelnames=["runner_name", "worker_index", "method_name", "service_version", "service_name"],
            buckets=exponential_buckets(1, 2, max_batch_size),
        ))
    return _HISTOGRAM[0]


class CallCost:
    """A model call's measured cost, ``seconds = per_call + per_item * items``: a least-squares fit
    over recent calls (older ones weigh less, so a change of load or machine is followed). Until calls
    of different sizes have been seen, all of the time counts per item."""

    def __init__(self, decay: float = 0.98, min_calls: int = 20) -> None:
        self.decay, self.min_calls, self.calls = decay, min_calls, 0
        self.n = self.s = self.ss = self.t = self.st = 0.0  # weighted sums: 1, size, size^2, time, size*time

    def add(self, items: int, seconds: float) -> None:
        d = self.decay
        self.calls += 1
        self.n, self.s, self.ss = d * self.n + 1, d * self.s + items, d * self.ss + items * items
        self.t, self.st = d * self.t + seconds, d * self.st + items * seconds

    def coefficients(self) -> tuple[float, float]:
        """(seconds per call, seconds per item), both >= 0; (0, 0) until ``min_calls`` calls are
        measured (the first calls of a worker are slow and would make it shed for nothing)."""
        if self.calls < self.min_calls or self.s == 0:
            return 0.0, 0.0
        spread = self.n * self.ss - self.s * self.s
        if spread <= 1e-9 * self.n * self.ss:
            return 0.0, self.t / self.s
        per_item = max(0.0, (self.n * self.st - self.s * self.t) / spread)
        per_call = max(0.0, (self.t - per_item * self.s) / self.n)
        return per_call, per_item

    def seconds(self, calls: int, items: int) -> float:
        per_call, per_item = self.coefficients()
        return calls * per_call + items * per_item


@dataclass
class _Request(Generic[Item, Result]):
    items: list[Item]
    future: asyncio.Future[list[Result]]


def pin_torch_threads(threads: int) -> None:
    """Gives the calling thread the worker's torch thread count. ``torch.set_num_threads`` in the main
    thread does not reach OpenMP's per-thread setting in a thread started later, whose kernels then
    ran with one OpenMP thread per core that spun between calls: the entry at one forecast client used
    1.8 cores, 0.9 with this (load/RESULTS.md)."""
    torch.set_num_threads(threads)


class Batcher(Generic[Item, Result]):
    """``await batcher(items)`` -> one result per item, in order; concurrent calls share model calls.

    ``func`` maps a list of items to a list of results of the same length and order (the batching
    contract of every model service); it runs on one dedicated thread (torch releases the GIL, so the
    event loop keeps parsing requests meanwhile). One loop per batcher, in stages:

    collect (every request waiting, FIFO, up to ``max_batch_size`` items) -> predict (one ``func``
    call) -> check (as many results as items) -> split (each request its own results).

    The loop never waits to fill a batch: when the model is free it runs what is there, and while it
    runs, arriving requests queue for the next call, so batches grow exactly as fast as load does
    (continuous batching, as in TGI's router and LitServe's loops). A request is shed with 503 only
    when the queue ahead of it cannot be served within ``max_latency_ms`` at the measured speed of the
    model; a request whose caller went away (disconnect, deadline) is dropped before the model sees
    it. If a merged call fails, each request is run alone, so that one bad request fails alone.
    """

    def __init__(self, name: str, func: Callable[[list[Item]], list[Result]], *, max_batch_size: int,
                 max_latency_ms: int, batching: bool = True, method_name: str = "batch",
                 histogram_max_batch_size: int | None = None) -> None:
        self.name, self.method_name, self._func = name, method_name, func
        self.max_batch_size, self.max_latency_s = max_batch_size, max_latency_ms / 1000
        self.batching = batching
        self._executor = ThreadPoolExecutor(1, f"{name}-model", pin_torch_threads, (torch.get_num_threads(),))
        self._histogram = batch_size_histogram(histogram_max_batch_size or max_batch_size)
        self._queue: deque[_Request[Item, Result]] = deque()
        self._queued_items = 0
        self._running_items = 0
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self.cost = CallCost()  # the model's measured speed, for the wait prediction

    async def __call__(self, items: list[Item]) -> list[Result]:
        if not items:
            return []
        if not self.batching:
            self._observe(1)
            return await self._run(items)
        if (wait_s := self.predicted_wait_s(len(items))) > self.max_latency_s:
            raise ServiceError.unavailable(
                f"The {self.name} model is overloaded: {self._queued_items + self._running_items} items "
                f"are ahead of this request (about {wait_s * 1000:.0f} ms; the bound is "
                f"{self.max_latency_s * 1000:.0f} ms). Retry after {SETTINGS.http.retry_after_s} s.")
        loop = asyncio.get_running_loop()
        request = _Request(items, loop.create_future())
        self._queue.append(request)
        self._queued_items += len(items)
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = loop.create_task(self._batch_loop(), name=f"{self.name}-batcher")
        self._wakeup.set()
        return await request.future

    def predicted_wait_s(self, items: int) -> float:
        """Seconds until a request of ``items`` items would be answered, at the model's measured speed
        (0 before the first call has been measured)."""
        ahead = self._queued_items + self._running_items + items
        if ahead <= self.max_batch_size:  # it fits the next call: shedding it would save nothing
            return 0.0
        calls = -(-ahead // self.max_batch_size)
        return self.cost.seconds(calls, ahead)

    async def _batch_loop(self) -> None:
        assert self._wakeup is not None
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch = self._collect()
                if batch:
                    await self._serve(batch)

    def _collect(self) -> list[_Request[Item, Result]]:
        """Waiting requests, oldest first, up to max_batch_size items (a larger request runs alone)."""
        batch: list[_Request[Item, Result]] = []
        size = 0
        while self._queue:
            request = self._queue[0]
            if batch and size + len(request.items) > self.max_batch_size:
                break
            self._queue.popleft()
            self._queued_items -= len(request.items)
            if request.future.done():  # cancelled: its caller went away
                continue
            batch.append(request)
            size += len(request.items)
        return batch

    async def _serve(self, batch: list[_Request[Item, Result]]) -> None:
        items = [item for request in batch for item in request.items]
        self._running_items = len(items)
        self._observe(len(batch))
        started = time.perf_counter()
        try:
            results = await self._run(items)
        except Exception as exc:
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(exc)
            else:
                logger.warning("%s: a merged call of %d requests failed; running them one by one",
                               self.name, len(batch))
                for request in batch:
                    await self._serve([request])
            return
        finally:
            self._running_items = 0
        self.cost.add(len(items), time.perf_counter() - started)
        start = 0
        for request in batch:
            if not request.future.done():
                request.future.set_result(results[start:start + len(request.items)])
            start += len(request.items)

    async def _run(self, items: list[Item]) -> list[Result]:
        results = await asyncio.get_running_loop().run_in_executor(self._executor, self._func, items)
        if len(results) != len(items):  # the batching contract: nothing dropped, nothing invented
            raise RuntimeError(f"{self.name}: {len(results)} results for {len(items)} items")
        return results

    def _observe(self, requests: int) -> None:
        self._histogram.labels(runner_name=self.name, method_name=self.method_name,
                               **service_metric_labels()).observe(requests)

    def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


class InProcessModel(Generic[Model]):
    """A model loaded in this worker, or the reason it is not: a bad artifact keeps only this model
    out (not ready, its endpoint answers 503), like a model service that failed to load."""

    def __init__(self, name: str, load: Callable[[], Model]) -> None:
        self.name = name
        self.model: Model | None = None
        self.error: str | None = None
        started = time.perf_counter()
        try:
            self.model = load()
        except ArtifactError as exc:
            self.error = str(exc)
            MODEL_LOAD_FAILED.labels(name).set(1)
            logger.error("MODEL NOT LOADED: %s: %s. This worker stays up: /readyz is not ready and the "
                         "model's endpoints answer 503; the other models keep serving. Re-register a "
                         "good artifact and restart. (%.2f s)", name, str(exc).rstrip("."),
                         time.perf_counter() - started)
        else:
            MODEL_LOAD_FAILED.labels(name).set(0)
        REGISTRY[name] = self

    @property
    def ready(self) -> bool:
        return self.model is not None

    def get(self) -> Model:
        """The loaded model; 503 when its artifact failed to load."""
        if self.model is None:
            raise ServiceError.unavailable(f"Model {self.name} is not loaded (its artifact failed the checks "
                                           "at start; the log says why); /readyz names the models that "
                                           "are not ready.")
        return self.model
