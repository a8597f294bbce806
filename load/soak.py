"""Soak: half of peak load for 10 minutes, with the RSS of every process sampled over time. Not for CI.

    python -m load.soak [--minutes 10] [--fraction 0.5] [--every 15] [--peak REQ_PER_S]
                        [--url http://127.0.0.1:PORT --pid PID]

Starts ``bentoml serve`` on a free loopback port (or uses ``--url``/``--pid``), measures the peak as
``load.overload`` does (unless ``--peak`` is given), then sends ``fraction`` x peak requests per
second, open-loop, for ``minutes``. Every ``every`` seconds it records the RSS of each process (the
arbiter, the entry worker, each model service) and the statuses so far. Writes
``load/reports/soak.json`` and ``load/reports/soak_rss.csv`` (one row per sample, one column per
process), and prints the first and last samples and the growth of each process.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import time
from pathlib import Path
from typing import Any

from load.harness import REPORTS, Run, measure_peak, open_loop, sentiment_requests, write_report
from services.local_server import Server
from services.workers import rss_mib


async def soak(url: str, pid: int, minutes: float, fraction: float, every_s: float,
               peak: float | None) -> dict[str, Any]:
    make = sentiment_requests(seed=5)
    if peak is None:
        peak, _ = await measure_peak(url, make)
    rate = fraction * peak
    duration_s = minutes * 60
    print(f"peak {peak:.1f} req/s; soaking at {rate:.1f} req/s for {minutes:g} min", flush=True)
    run = Run()
    samples: list[dict[str, Any]] = [{"t_s": 0.0, "requests": 0, **rss_mib(pid)}]
    load = asyncio.create_task(open_loop(url, rate, duration_s, make, run=run))
    started = time.monotonic()
    while not load.done():
        await asyncio.wait({load}, timeout=every_s)
        sample = {"t_s": round(time.monotonic() - started, 1), "requests": len(run.outcomes), **rss_mib(pid)}
        samples.append(sample)
        print(json.dumps(sample), flush=True)
    await load
    processes = sorted({key for sample in samples for key in sample} - {"t_s", "requests"})
    growth = {name: round(samples[-1].get(name, 0) - samples[0].get(name, 0), 1) for name in processes}
    return {"url": url, "peak_rps": round(peak, 1), "rate_rps": round(rate, 1), "minutes": minutes,
            "summary": run.summary(), "rss_growth_mib": growth, "samples": samples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url")
    parser.add_argument("--pid", type=int)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--every", type=float, default=15.0)
    parser.add_argument("--peak", type=float)
    args = parser.parse_args(argv)
    server = None
    url, pid = args.url, args.pid
    if url is None:
        server = Server(Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))).start()
        url, pid = server.url, server.process.pid
    if pid is None:
        parser.error("--pid is needed with --url (RSS is read per process)")
    try:
        report = asyncio.run(soak(url, pid, args.minutes, args.fraction, args.every, args.peak))
    finally:
        if server is not None:
            server.stop()
    path = write_report("soak", report)
    columns = ["t_s", "requests", *sorted(report["rss_growth_mib"])]
    with open(REPORTS / "soak_rss.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(report["samples"])
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
