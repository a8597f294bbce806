"""The one load generator of the benchmark and the reliability scripts (bench, overload, soak, faults).

Traffic only ever goes to 127.0.0.1. One sender (``send``) records every answer as an ``Outcome`` in a
``Run``; two drivers use it. ``open_loop`` sends on a fixed schedule, whether or not earlier requests
have answered, so a slow server meets the full offered load instead of slowing the client down (what
an overload test and the benchmark's half-peak point need). ``closed_loop`` runs N clients that each
send the next request when the last one answers (peak throughput). It uses aiohttp (a BentoML
dependency), which costs less client CPU per request than httpx on this shared machine. The server's
processes (pids, memory, CPU) are read through ``services/workers.py``.
"""

from __future__ import annotations

import asyncio
import collections
import csv
import functools
import itertools
import json
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from services.local_server import ROOT

REPORTS = ROOT / "load" / "reports"
DEV = ROOT / "training" / "data" / "sst2" / "glue_dev.tsv"
# Client-side limit, well past the service's own timeout (RNNSERVE_TIMEOUT_S, 30 s): a request that
# reaches it means the service hung past its documented bound.
CLIENT_TIMEOUT_S = 60.0


def sentences() -> list[str]:
    """Real SST-2 dev sentences (the sentiment model's held-out set)."""
    with open(DEV, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        return [row[0].strip() for row in reader]


@dataclass(frozen=True)
class Request:
    path: str
    body: dict[str, Any]
    # Whether a 200's JSON answer is well-formed; None: any 200 is, and the body is not parsed (the
    # benchmark, where parsing would add client CPU to the measurement).
    check: Callable[[dict[str, Any]], bool] | None = None


def cycle_requests(path: str, bodies: Sequence[dict[str, Any]]) -> Callable[[], Request]:
    """``bodies`` in order, round and round, to ``path``, with no check of the answers beyond 200."""
    ring = itertools.cycle(bodies)
    return lambda: Request(path, next(ring))


def sentiment_requests(seed: int = 0) -> Callable[[], Request]:
    """Sentiment traffic like the Locust user: 4 of 5 requests one text, else 2-16 texts."""
    rng = random.Random(seed)
    texts = sentences()

    def make() -> Request:
        if rng.random() < 0.8:
            batch = [rng.choice(texts)]
            body: dict[str, Any] = {"text": batch[0]}
        else:
            batch = rng.sample(texts, rng.randint(2, 16))
            body = {"texts": batch}
        return Request("/v1/sentiment", body, functools.partial(has_results, len(batch)))

    return make


def translate_sentences() -> list[str]:
    """Held-out English sentences of the translation test split (split by hash of the English side)."""
    from training.train_translate import TrainTranslateConfig, read_pairs, split_of

    config = TrainTranslateConfig()
    return sorted({e for e, _ in read_pairs(config.data_path, config.member)
                   if split_of(e, config.test_per_mille, config.dev_per_mille) == "test"})


def translate_requests(seed: int = 0) -> Callable[[], Request]:
    """Translation traffic (greedy, one held-out test sentence per request)."""
    english = translate_sentences()
    rng = random.Random(seed)

    def make() -> Request:
        return Request("/v1/translate", {"text": rng.choice(english), "beam_size": 1},
                       lambda answer: len(answer.get("results", [])) == 1
                       and bool(answer["results"][0].get("translation")))

    return make


# The traffic that reaches each process, for the fault scenarios: the entry worker (rnnserve) runs
# the sentiment model itself; translate is a model service behind it.
TRAFFIC: dict[str, Callable[[int], Callable[[], Request]]] = {
    "rnnserve": sentiment_requests, "translate": translate_requests}


def has_results(count: int, answer: dict[str, Any]) -> bool:
    results = answer.get("results", [])
    return len(results) == count and all(r.get("label") in ("negative", "positive") for r in results)


@dataclass
class Outcome:
    sent_at: float  # seconds since the run started
    latency_s: float
    status: str  # "200", "503", ... or the client error's name ("ClientTimeout", "ConnectionRefused")
    ok: bool  # 200 and a well-formed answer


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    missing_retry_after: int = 0
    error_codes: collections.Counter = field(default_factory=collections.Counter)

    def counts(self) -> dict[str, int]:
        return dict(sorted(collections.Counter(o.status for o in self.outcomes).items()))

    def summary(self) -> dict[str, Any]:
        latencies = sorted(o.latency_s for o in self.outcomes)
        ok = [o.latency_s for o in self.outcomes if o.ok]

        def pct(values: list[float], q: float) -> float | None:
            return round(values[min(len(values) - 1, int(q * len(values)))], 3) if values else None

        return {"requests": len(self.outcomes), "statuses": self.counts(),
                "ok": len(ok), "malformed_200": sum(o.status == "200" and not o.ok for o in self.outcomes),
                "retryable_without_retry_after": self.missing_retry_after,
                "error_codes": dict(sorted(self.error_codes.items())),
                "latency_s": {"p50": pct(latencies, 0.5), "p99": pct(latencies, 0.99),
                              "max": round(latencies[-1], 3) if latencies else None},
                "ok_latency_s": {"p50": pct(sorted(ok), 0.5), "p99": pct(sorted(ok), 0.99),
                                 "mean": round(statistics.fmean(ok), 3) if ok else None}}


def session(limit: int = 4096) -> aiohttp.ClientSession:
    # Reuse a kept-alive connection only while it has been idle well under the server's keep-alive
    # timeout (uvicorn: 5 s). aiohttp's default (15 s) lets the client send on a connection the
    # server is closing at that moment, which fails as ServerDisconnectedError: a client-side race,
    # seen about once per 200 requests in the SIGKILL test, not a server failure.
    connector = aiohttp.TCPConnector(limit=limit, force_close=False, keepalive_timeout=3.0)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S))


async def send(http: aiohttp.ClientSession, url: str, request: Request, run: Run) -> Outcome:
    sent = time.monotonic()
    try:
        async with http.post(url + request.path, json=request.body) as response:
            payload = await response.read()
            status = str(response.status)
            ok = False
            if response.status == 200:
                try:
                    ok = request.check is None or request.check(json.loads(payload))
                except ValueError:
                    ok = False
            else:
                if response.status in (429, 503) and "Retry-After" not in response.headers:
                    run.missing_retry_after += 1
                try:
                    run.error_codes[f"{status} {json.loads(payload)['error']['code']}"] += 1
                except (ValueError, KeyError, TypeError):
                    run.error_codes[f"{status} unshaped"] += 1
    except TimeoutError:
        status, ok = "ClientTimeout", False
    except aiohttp.ClientConnectorError:
        status, ok = "ConnectionRefused", False
    except aiohttp.ClientError as exc:
        status, ok = type(exc).__name__, False
    outcome = Outcome(sent - run.started, time.monotonic() - sent, status, ok)
    run.outcomes.append(outcome)
    return outcome


async def open_loop(url: str, rate: float, duration_s: float, make: Callable[[], Request],
                    run: Run | None = None, sending_done: asyncio.Event | None = None) -> Run:
    """Sends ``rate`` requests per second for ``duration_s``, on schedule, and waits for every answer.

    ``sending_done`` is set when the last request has been sent (answers may still be pending).
    """
    run = run or Run()
    tasks: set[asyncio.Task] = set()
    async with session() as http:
        start = time.monotonic()
        sent = 0
        while (elapsed := time.monotonic() - start) < duration_s:
            due = int(elapsed * rate) + 1
            for _ in range(due - sent):
                task = asyncio.create_task(send(http, url, make(), run))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            sent = due
            await asyncio.sleep(min(0.01, 1 / rate))
        if sending_done is not None:
            sending_done.set()
        if tasks:
            await asyncio.gather(*tasks)
    return run


async def closed_loop(url: str, concurrency: int, duration_s: float, make: Callable[[], Request]) -> Run:
    """``concurrency`` clients, each sending its next request when the last one answers."""
    run = Run()
    async with session(concurrency) as http:
        stop = time.monotonic() + duration_s

        async def client() -> None:
            while time.monotonic() < stop:
                await send(http, url, make(), run)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return run


async def measure_peak(url: str, make: Callable[[], Request], concurrency: int = 32,
                       duration_s: float = 15.0) -> tuple[float, Run]:
    """Peak throughput: well-formed 200s per second with ``concurrency`` closed-loop clients."""
    run = await closed_loop(url, concurrency, duration_s, make)
    return sum(o.ok for o in run.outcomes) / duration_s, run


async def time_to_normal(url: str, make: Callable[[], Request], limit_s: float = 60.0,
                         needed: int = 3) -> float | None:
    """Seconds until the first of ``needed`` consecutive sequential requests answers normally.

    None when that does not happen within ``limit_s``.
    """
    start = time.monotonic()
    streak, streak_start = 0, 0.0
    run = Run()
    async with session(4) as http:
        while time.monotonic() - start < limit_s:
            outcome = await send(http, url, make(), run)
            if outcome.ok:
                if streak == 0:
                    streak_start = time.monotonic() - start
                streak += 1
                if streak >= needed:
                    return round(streak_start, 3)
            else:
                streak = 0
                await asyncio.sleep(0.1)
    return None


def write_report(name: str, report: dict[str, Any], out: Path = REPORTS) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
