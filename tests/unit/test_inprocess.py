"""The entry's in-process batcher and model holder (services/inprocess.py), without a server."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

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


def test_a_failing_merged_call_fails_only_the_request_that_breaks_it():
    def square_unless_negative(items: list[int]) -> list[int]:
        if any(x < 0 for x in items):
            raise ValueError("negative")
        return [x * x for x in items]

    batcher = Batcher("test", square_unless_negative, max_batch_size=64, max_latency_ms=5000)

    async def run() -> list[object]:
        return list(await asyncio.gather(batcher([1, 2]), batcher([-1]), batcher([3]),
                                         return_exceptions=True))

    try:
        good, bad, other = asyncio.run(run())
    finally:
        batcher.shutdown()
    assert good == [1, 4] and other == [9]
    assert isinstance(bad, ValueError)


def test_a_request_whose_caller_left_never_reaches_the_model():
    record = Recorder()
    gate = threading.Event()

    def slow(items: list[int]) -> list[int]:
        gate.wait(10)
        return record(items)

    batcher = Batcher("test", slow, max_batch_size=64, max_latency_ms=5000)

    async def run() -> list[int]:
        first = asyncio.ensure_future(batcher([1]))  # runs alone, holding the model
        await asyncio.sleep(0)
        left = asyncio.ensure_future(batcher([2]))  # queued behind it, then its caller goes away
        stays = asyncio.ensure_future(batcher([3]))
        await asyncio.sleep(0)
        left.cancel()
        gate.set()
        return [*(await first), *(await stays)]

    try:
        assert asyncio.run(run()) == [1, 9]
    finally:
        batcher.shutdown()
    assert sum(record.calls) == 2  # items 1 and 3; the cancelled 2 was dropped before the model


def test_the_call_cost_fit_recovers_per_call_and_per_item_seconds():
    from services.inprocess import CallCost

    cost = CallCost(min_calls=20)
    assert cost.seconds(1, 10) == 0.0  # nothing measured: never shed
    cost.add(1, 5.0)  # one slow first call is not enough to shed on
    assert cost.seconds(1, 10) == 0.0
    cost = CallCost(min_calls=20)
    for items in [1, 8, 64, 3, 32, 64, 1, 16] * 5:
        cost.add(items, 0.002 + 0.0001 * items)
    per_call, per_item = cost.coefficients()
    assert per_call == pytest.approx(0.002, rel=1e-6) and per_item == pytest.approx(0.0001, rel=1e-6)
    assert cost.seconds(2, 128) == pytest.approx(2 * 0.002 + 128 * 0.0001, rel=1e-6)
    one_size = CallCost(min_calls=1)
    one_size.add(64, 0.0064)
    assert one_size.coefficients() == (0.0, pytest.approx(0.0001))


def test_requests_are_shed_only_when_the_queue_ahead_cannot_be_served_in_time():
    record = Recorder()
    gate = threading.Event()

    def slow(items: list[int]) -> list[int]:
        gate.wait(10)
        return record(items)

    batcher = Batcher("test", slow, max_batch_size=4, max_latency_ms=100)
    batcher.cost.min_calls = 1
    for _ in range(10):  # the measured speed: 10 ms per call of up to 4 items, whatever their number
        batcher.cost.add(4, 0.010)
        batcher.cost.add(1, 0.010)

    async def run() -> list[object]:
        # 10 ms per call of 4: 40 items (10 calls, 100 ms) fit the 100 ms bound, the 41st does not.
        requests = [asyncio.ensure_future(batcher([i])) for i in range(41)]
        await asyncio.sleep(0)
        gate.set()
        return list(await asyncio.gather(*requests, return_exceptions=True))

    try:
        answers = asyncio.run(run())
    finally:
        batcher.shutdown()
    shed = [a for a in answers if isinstance(a, ServiceError)]
    assert len(shed) == 1 and shed[0].status == 503 and "overloaded" in shed[0].message
    assert answers[-1] is shed[0]
    assert sum(record.calls) == 40


PROBE = """
import asyncio, os, sys, torch
from concurrent.futures import ThreadPoolExecutor
torch.set_num_threads(1)
from services.inprocess import Batcher

def tasks():
    return len(os.listdir("/proc/self/task"))

def model(items):
    a = torch.randn(512, 512)
    for _ in range(10):
        a @ a
    with torch.inference_mode():
        torch.nn.GRU(5, 32, batch_first=True)(torch.randn(64, 60, 5))
    return items

async def main():
    before = tasks()
    batcher = Batcher("probe", model, max_batch_size=4, max_latency_ms=1000)
    plain = ThreadPoolExecutor(1)  # a thread of its own as before, without the batcher's initializer
    if sys.argv[1] == "batcher":
        await batcher([1, 2])
    else:
        await asyncio.get_running_loop().run_in_executor(plain, model, [1, 2])
    print(tasks() - before)  # the model's thread itself, and any OpenMP team it started
    batcher.shutdown()
    plain.shutdown()

asyncio.run(main())
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or (os.cpu_count() or 1) < 2,
                    reason="counts a process's threads in /proc on a machine of 2 or more cores")
def test_the_model_thread_runs_torch_with_the_workers_thread_count_not_one_openmp_thread_per_core():
    """torch.set_num_threads in the main thread does not reach OpenMP's per-thread setting in a thread
    started later: its matmuls start a team of one thread per core, which spins between calls. The
    batcher's thread is pinned to the worker's count, so it starts no such team."""
    import subprocess
    import sys

    def new_threads(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[2])
        return int(done.stdout.split()[-1])

    assert new_threads("batcher") < new_threads("plain")
