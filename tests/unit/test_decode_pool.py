"""The entry's image-decode pool: a few threads, a bounded queue, 503 + the settings' names past it."""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.caption import DECODE_POOL
from services.decode_pool import BoundedPool
from services.errors import ServiceError, error_response
from services.settings import SETTINGS


def blocking(started: threading.Event, release: threading.Event, value: int) -> int:
    started.set()
    assert release.wait(10), "the test never released the job"
    return value


async def wait_for(condition, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_runs_at_most_workers_at_once_and_refuses_past_the_queue():
    async def scenario():
        pool = BoundedPool(1, 2, name="image-decode", settings="RNNSERVE_CAPTION_DECODE_WORKERS, "
                                                               "RNNSERVE_CAPTION_DECODE_QUEUE")
        release = threading.Event()
        events = [threading.Event() for _ in range(3)]
        jobs = [asyncio.create_task(pool.run(blocking, events[i], release, i)) for i in range(3)]
        await wait_for(lambda: events[0].is_set())
        await asyncio.sleep(0.05)
        assert not events[1].is_set(), "a second job ran beside the first with one worker"
        assert pool.pending == 3  # one running, two waiting: the queue is full
        with pytest.raises(ServiceError) as caught:
            await pool.run(blocking, threading.Event(), release, 99)
        error = caught.value
        assert (error.status, error.code) == (503, "overloaded")
        assert "3 image-decode jobs" in str(error) and "1 running and 2 waiting" in str(error)
        assert "RNNSERVE_CAPTION_DECODE_QUEUE" in str(error)
        retry_after = (b"retry-after", str(SETTINGS.http.retry_after_s).encode())
        assert retry_after in error_response(error).raw_headers
        release.set()
        assert await asyncio.gather(*jobs) == [0, 1, 2]
        assert pool.pending == 0
        assert await pool.run(int, "7") == 7, "the pool takes work again once it has drained"

    asyncio.run(scenario())


def test_queue_zero_refuses_a_second_job_while_one_runs():
    async def scenario():
        pool = BoundedPool(1, 0, name="image-decode", settings="S")
        release, started = threading.Event(), threading.Event()
        first = asyncio.create_task(pool.run(blocking, started, release, 1))
        await wait_for(started.is_set)
        with pytest.raises(ServiceError):
            await pool.run(int, "2")
        release.set()
        assert await first == 1

    asyncio.run(scenario())


def test_an_abandoned_request_keeps_its_slot_until_its_thread_finishes():
    """A client that hangs up does not free the decode it started: the thread still holds the memory."""
    async def scenario():
        pool = BoundedPool(1, 0, name="image-decode", settings="S")
        release, started = threading.Event(), threading.Event()
        task = asyncio.create_task(pool.run(blocking, started, release, 1))
        await wait_for(started.is_set)
        task.cancel()
        await asyncio.sleep(0.05)
        assert pool.pending == 1
        with pytest.raises(ServiceError):
            await pool.run(int, "2")
        release.set()
        await wait_for(lambda: pool.pending == 0)
        assert await pool.run(int, "3") == 3

    asyncio.run(scenario())


def test_the_entry_pool_follows_the_settings():
    assert (DECODE_POOL.workers, DECODE_POOL.queue) == (SETTINGS.caption.decode_workers,
                                                        SETTINGS.caption.decode_queue)
