"""The entry's in-process batcher and model holder (services/inprocess.py), without a server."""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.artifacts import ArtifactError
from services.errors import ServiceError
from services.inprocess import REGISTRY, Batcher, InProcessModel
from services.metrics import MODEL_LOAD_FAILED


class Recorder:
    """A batched function that squares its items and records each call's size and thread."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.threads: set[str] = set()

    def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(len(items))
        self.threads.add(threading.current_thread().name)
        return [x * x for x in items]


async def gather(batcher: Batcher, requests: list[list[int]]) -> list[list[int]]:
    return list(await asyncio.gather(*(batcher(items) for items in requests)))


def test_concurrent_requests_share_model_calls_and_keep_their_order():
    # gather() queues every request before the batcher's controller first runs, so they are merged
    # whatever the machine's speed: no timing is involved.
    record = Recorder()
    batcher = Batcher("test", record, max_batch_size=64, max_latency_ms=5000)
    requests = [[i] for i in range(40)] + [[100, 101, 102], [7, 8]]
    try:
        results = asyncio.run(gather(batcher, requests))
    finally:
        batcher.shutdown()
    assert results == [[x * x for x in items] for items in requests]
    assert sum(record.calls) == sum(len(items) for items in requests)  # nothing dropped or repeated
    assert len(record.calls) < len(requests)  # merged
    assert max(record.calls) <= 64
    assert record.threads == {"test-model_0"}  # one model thread, off the event loop


def test_batching_off_calls_the_model_once_per_request():
    record = Recorder()
    batcher = Batcher("test", record, max_batch_size=64, max_latency_ms=5000, batching=False)
    requests = [[i, i + 1] for i in range(10)]
    try:
        results = asyncio.run(gather(batcher, requests))
    finally:
        batcher.shutdown()
    assert results == [[x * x for x in items] for items in requests]
    assert record.calls == [2] * 10


def test_an_empty_request_never_reaches_the_model():
    record = Recorder()
    batcher = Batcher("test", record, max_batch_size=8, max_latency_ms=1000)
    try:
        assert asyncio.run(batcher([])) == []
    finally:
        batcher.shutdown()
    assert record.calls == []


def test_a_model_that_loses_items_fails_loudly():
    batcher = Batcher("test", lambda items: items[:-1], max_batch_size=8, max_latency_ms=1000,
                      batching=False)
    try:
        with pytest.raises(RuntimeError, match="1 results for 2 items"):
            asyncio.run(batcher([1, 2]))
    finally:
        batcher.shutdown()


def test_a_bad_artifact_keeps_only_that_model_out():
    def load():
        raise ArtifactError("model.pt: sha256 abc does not match the recorded def")

    model = InProcessModel("broken-test-model", load)
    assert REGISTRY["broken-test-model"] is model
    assert not model.ready
    with pytest.raises(ServiceError, match="broken-test-model is not loaded") as raised:
        model.get()
    assert (raised.value.status, raised.value.code) == (503, "model_unavailable")
    assert "sha256" not in raised.value.message and "sha256" in model.error  # the reason is logged only
    assert MODEL_LOAD_FAILED.labels("broken-test-model")._value.get() == 1

    healthy = InProcessModel("healthy-test-model", lambda: "weights")
    assert healthy.ready and healthy.get() == "weights"
    assert MODEL_LOAD_FAILED.labels("healthy-test-model")._value.get() == 0


def test_other_load_errors_are_not_hidden():
    def load():
        raise KeyError("vocab")

    with pytest.raises(KeyError):
        InProcessModel("buggy-test-model", load)
