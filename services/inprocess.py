"""Models the entry worker runs itself: BentoML's adaptive batcher without a second HTTP hop.

The short, stateless models (sentiment, forecast windows) cost far less to run than to forward: one
sequence of the sentiment BiLSTM takes ~0.3 ms at batch 64, while every hop through a BentoML
service costs ~0.8 ms of HTTP, routing and (de)serialisation on each side (load/RESULTS.md). So each
entry worker loads these artifacts and batches concurrent requests itself, with the same
``CorkDispatcher`` BentoML uses for a batchable API: the items of concurrent requests are merged into
one call of the model's batched function, which runs on one dedicated thread per model (torch
releases the GIL, so the event loop keeps parsing requests meanwhile). A request the batcher predicts
it cannot serve within ``max_latency_ms`` is shed with 503, as in BentoML.

The generative models (caption, translate) and the stateful forecast sessions stay in their own
services: their calls are long, and sessions must live in one process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from services.artifacts import ArtifactError
from services.bentoml_compat import (
    cork_dispatcher,
    exponential_buckets,
    metrics_histogram,
    service_metric_labels,
)
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


class Batcher(Generic[Item, Result]):
    """``await batcher(items)`` -> one result per item, in order; concurrent calls share model calls.

    ``func`` maps a list of items to a list of results of the same length and order (the batching
    contract of every model service). With ``batching`` off, each call runs ``func`` on its own items.
    """

    def __init__(self, name: str, func: Callable[[list[Item]], list[Result]], *, max_batch_size: int,
                 max_latency_ms: int, batching: bool = True, method_name: str = "batch",
                 histogram_max_batch_size: int | None = None) -> None:
        self.name, self.method_name = name, method_name
        self._func = func
        # One thread per model: the dispatcher runs one batch at a time, and torch's intra-op
        # threads are set per process (services/api.py).
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"{name}-model")
        self._histogram = batch_size_histogram(histogram_max_batch_size or max_batch_size)
        self._call: Callable[[list[Item]], Any]
        if batching:
            dispatcher = cork_dispatcher(max_latency_ms=max_latency_ms, max_batch_size=max_batch_size,
                                         fallback=self._shed, get_batch_size=len)
            self._call = dispatcher(self._run_merged)
            self._dispatcher = dispatcher
        else:
            self._call = self._run_alone
            self._dispatcher = None

    def _shed(self) -> Any:
        raise ServiceError.unavailable(f"The {self.name} batcher is overloaded: this request could not "
                                       f"be served within max_latency_ms; retry after "
                                       f"{SETTINGS.http.retry_after_s} s.")

    async def __call__(self, items: list[Item]) -> list[Result]:
        if not items:
            return []
        return await self._call(items)

    async def _run(self, items: list[Item]) -> list[Result]:
        results = await asyncio.get_running_loop().run_in_executor(self._executor, self._func, items)
        if len(results) != len(items):  # the batching contract: nothing dropped, nothing invented
            raise RuntimeError(f"{self.name}: {len(results)} results for {len(items)} items")
        return results

    async def _run_alone(self, items: list[Item]) -> list[Result]:
        self._observe(1)
        return await self._run(items)

    async def _run_merged(self, batches: Sequence[list[Item]]) -> list[list[Result]]:
        """The dispatcher's callback: one list per request in, one list of results per request out."""
        self._observe(len(batches))
        results = await self._run([item for batch in batches for item in batch])
        out, start = [], 0
        for batch in batches:
            out.append(results[start:start + len(batch)])
            start += len(batch)
        return out

    def _observe(self, requests: int) -> None:
        self._histogram.labels(runner_name=self.name, method_name=self.method_name,
                               **service_metric_labels()).observe(requests)

    def shutdown(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.shutdown()
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
