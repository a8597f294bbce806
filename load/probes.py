"""The outside probe's measurements of issue 13, repeated against a server this script starts.

    python -m load.probes [--streams 50] [--paths 2000] [--docs-clients 8]

1. Dropped streams: ``--streams`` clients open /v1/translate/stream and hang up after 50 ms; the
   translate worker's CPU seconds meanwhile, and the latency of one short stream sent during it.
2. Unknown paths: ``--paths`` random paths, then the size of /metrics and the time of one scrape.
3. /docs.json: ``--docs-clients`` clients fetching it in a loop while sentiment's p50 is measured.

Traffic goes to 127.0.0.1 only, bounded in count and time. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
from pathlib import Path

import aiohttp

from services.local_server import Server
from services.workers import cpu_seconds_by_service

LONG = "I think that the weather will be good tomorrow, and we will go to the beach with friends. " * 5


async def short_stream_seconds(session: aiohttp.ClientSession, url: str) -> float:
    started = time.perf_counter()
    async with session.post(f"{url}/v1/translate/stream", json={"text": "Hello."}) as response:
        await response.read()
    return time.perf_counter() - started


async def dropped_streams(url: str, pid: int, streams: int) -> dict:
    before = cpu_seconds_by_service(pid).get("translate", 0.0)
    async with aiohttp.ClientSession() as session:
        alone = await short_stream_seconds(session, url)

        async def drop() -> None:
            try:
                async with asyncio.timeout(0.05):
                    async with session.post(f"{url}/v1/translate/stream", json={"text": LONG[:480]}) as r:
                        await r.read()
            except TimeoutError:
                pass

        await asyncio.gather(*(drop() for _ in range(streams)))
        during = await short_stream_seconds(session, url)
    await asyncio.sleep(3)  # whatever the translate worker still does for the dropped streams
    cpu = cpu_seconds_by_service(pid).get("translate", 0.0) - before
    return {"streams": streams, "translate_cpu_s": round(cpu, 2), "short_stream_s_alone": round(alone, 3),
            "short_stream_s_after_drops": round(during, 3)}


async def unknown_paths(url: str, paths: int) -> dict:
    async with aiohttp.ClientSession() as session:
        before = len(await (await session.get(f"{url}/metrics")).read())
        for _ in range(paths):
            async with session.post(f"{url}/probe-{secrets.token_hex(8)}", json={}) as response:
                await response.read()
        started = time.perf_counter()
        after = len(await (await session.get(f"{url}/metrics")).read())
        return {"paths": paths, "metrics_bytes_before": before, "metrics_bytes_after": after,
                "scrape_s": round(time.perf_counter() - started, 3)}


async def docs_under_load(url: str, clients: int, seconds: float = 10.0) -> dict:
    async with aiohttp.ClientSession() as session:
        async def sentiment_p50(duration: float) -> float:
            times, end = [], time.monotonic() + duration
            while time.monotonic() < end:
                started = time.perf_counter()
                async with session.post(f"{url}/v1/sentiment", json={"text": "A fine film."}) as r:
                    await r.read()
                times.append(time.perf_counter() - started)
            return statistics.median(times)

        quiet = await sentiment_p50(seconds / 2)
        stop = asyncio.Event()

        async def fetch_docs() -> int:
            count = 0
            while not stop.is_set():
                async with session.get(f"{url}/docs.json") as response:
                    await response.read()
                count += 1
            return count

        fetchers = [asyncio.create_task(fetch_docs()) for _ in range(clients)]
        loaded = await sentiment_p50(seconds)
        stop.set()
        fetched = sum(await asyncio.gather(*fetchers))
    return {"docs_clients": clients, "docs_fetched": fetched,
            "sentiment_p50_ms_quiet": round(quiet * 1000, 1),
            "sentiment_p50_ms_with_docs": round(loaded * 1000, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--paths", type=int, default=2000)
    parser.add_argument("--docs-clients", type=int, default=8)
    args = parser.parse_args(argv)
    import os

    server = Server(Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))).start()
    try:
        probes = {"dropped streams": lambda: dropped_streams(server.url, server.process.pid, args.streams),
                  "unknown paths": lambda: unknown_paths(server.url, args.paths),
                  "docs.json": lambda: docs_under_load(server.url, args.docs_clients)}
        for name, probe in probes.items():
            print(f"{name}: {asyncio.run(probe())}", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
