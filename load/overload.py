"""Overload: twice the peak load for 60 s, then check the service recovers and gives memory back.

    python -m load.overload [--duration 60] [--factor 2] [--url http://127.0.0.1:PORT]

1. Starts ``bentoml serve`` on a free loopback port (or uses ``--url`` and ``--pid``).
2. Measures the peak: well-formed answers per second from 32 closed-loop clients over 15 s.
3. Records the RSS of every process (arbiter, entry worker, each model service).
4. Sends ``factor`` x peak requests per second, open-loop, for ``duration`` s (sentiment traffic:
   real SST-2 sentences, 1 or 2-16 per request).
5. Measures the time from the end of the burst until three sequential requests answer normally
   (the bound is 10 s), then RSS right after the burst and after a settle period.

It prints and writes ``load/reports/overload.json``: the count of each status, latency, whether any
429/503 lacked ``Retry-After``, the recovery time and RSS before/after per process. Exit status 1 when
a 5xx other than 503, a client timeout (a hang past the service's timeout) or a slow recovery is seen.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from load.harness import Run, measure_peak, open_loop, sentiment_requests, time_to_normal, write_report
from services.local_server import Server
from services.workers import rss_mib

RECOVERY_BOUND_S = 10.0


async def overload(url: str, pid: int | None, duration_s: float, factor: float, settle_s: float,
                   peak: float | None = None, bursts: int = 1) -> dict[str, Any]:
    make = sentiment_requests(seed=1)
    report: dict[str, Any] = {"url": url, "duration_s": duration_s, "factor": factor}
    if peak is None:
        peak, peak_run = await measure_peak(url, make)
        report["peak_run"] = peak_run.summary()
    report["peak_rps"] = round(peak, 1)
    rate = factor * peak
    report["offered_rps"] = round(rate, 1)
    if pid is not None:
        report["rss_mib_before"] = rss_mib(pid)
    print(f"peak {peak:.1f} req/s; offering {rate:.1f} req/s for {duration_s:g} s", flush=True)

    for number in range(1, bursts + 1):
        # A second burst tells a high-water mark (RSS stays where the first left it) from a leak.
        suffix = "" if number == 1 else f"_{number}"
        done = asyncio.Event()
        run = Run()
        burst = asyncio.create_task(open_loop(url, rate, duration_s, make, run=run, sending_done=done))
        await done.wait()
        ended = time.monotonic()
        recovery = await time_to_normal(url, sentiment_requests(seed=2), limit_s=60)
        report["recovery_s" + suffix] = recovery
        report["recovery_measured_from"] = "the last request of the burst was sent"
        await burst
        report["drain_s" + suffix] = round(time.monotonic() - ended, 2)
        report["burst" + suffix] = run.summary()
        if pid is not None:
            report["rss_mib_after" + suffix] = rss_mib(pid)
            await asyncio.sleep(settle_s)
            report[f"rss_mib_after{suffix}_{settle_s:g}s"] = rss_mib(pid)

    statuses = report["burst"]["statuses"]
    bad = {status: count for status, count in statuses.items()
           if status not in ("200", "429", "503") and not status.startswith("4")}
    report["verdict"] = {
        "no_500_or_hang": not bad,
        "unexpected": bad,
        "retry_after_always_set": run.missing_retry_after == 0,
        "recovered_within_10s": recovery is not None and recovery <= RECOVERY_BOUND_S,
    }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an already running server (default: start one)")
    parser.add_argument("--pid", type=int, help="pid of that server's `bentoml serve`, for RSS")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--factor", type=float, default=2.0)
    parser.add_argument("--peak", type=float, help="skip the peak measurement and use this req/s")
    parser.add_argument("--settle", type=float, default=15.0, help="seconds before the last RSS sample")
    parser.add_argument("--bursts", type=int, default=1, help="bursts in a row (2 tells a leak from a peak)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    server = None
    url, pid = args.url, args.pid
    if url is None:
        home = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
        server = Server(home).start()
        url, pid = server.url, server.process.pid
    try:
        report = asyncio.run(overload(url, pid, args.duration, args.factor, args.settle, args.peak,
                                      args.bursts))
    finally:
        if server is not None:
            server.stop()
    path = write_report("overload", report, *([args.out] if args.out else []))
    print(json.dumps({k: v for k, v in report.items() if k != "peak_run"}, indent=2))
    print(f"report: {path}")
    return 0 if all(v for k, v in report["verdict"].items() if k != "unexpected") else 1


if __name__ == "__main__":
    raise SystemExit(main())
