"""Translation decoding before and after iteration-level batching, in one run on one machine.

    python -m load.bench_decoding --before /tmp/rnnserve-before [--seconds 15]

``--before`` is a checkout of the earlier code (``git archive <commit> | tar -x -C DIR``); its server
is started from there, this tree's from here, one after the other, with the same model store.

1. **Ceiling**: the artifact's own static greedy decode (``services.translate.decode_batch``) in this
   process on test-split sentences at batch 64, one intra-op thread: sequences/s and tokens/s.
2. Per tree, ``bentoml serve services.api:Api`` on loopback:
   - ``/v1/translate`` greedy, closed loop at 16 and 64 clients: requests/s, generated tokens/s
     (the server's ``rnnserve_translate_generated_tokens_total``), p50/p99;
   - ``/v1/translate/stream``, 64 concurrent closed-loop streams: streams/s, tokens/s (the ``done``
     events' ``output_tokens``), time to first event p50/p99.

Results are printed as a Markdown table and written to ``load/reports/bench_decoding.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import torch

from load.bench import REPORTS, machine, scrape, translate_paths
from load.harness import closed_loop, cycle_requests, translate_sentences
from services.local_server import Server


class TreeServer(Server):
    """``Server``, launched from another checkout of the code (``root``)."""

    def __init__(self, home: Path, root: Path) -> None:
        super().__init__(home)
        self.root = root

    def launch(self) -> TreeServer:
        log = open(self.log_path, "w")  # noqa: SIM115 - kept open for the process's lifetime
        env = {**self.env, "PYTHONPATH": str(self.root)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", self.target, "--host", "127.0.0.1",
             "--port", str(self.port)],
            cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values) or [float("nan")]
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ceiling(seconds: float) -> dict:
    paths, _, _ = translate_paths()
    run, encoded = paths["model"]
    rng = random.Random(0)
    batches = [rng.sample(encoded, 64) for _ in range(50)]
    run(batches[0])  # warm
    sequences = tokens = 0
    started = time.perf_counter()
    index = 0
    while time.perf_counter() - started < seconds:
        _, lengths, *_ = run(batches[index % len(batches)])
        sequences += 64
        tokens += int(lengths.sum())
        index += 1
    elapsed = time.perf_counter() - started
    return {"sequences_per_s": sequences / elapsed, "tokens_per_s": tokens / elapsed}


def generated_tokens(samples: dict, decoder: str) -> float:
    return sum(value for (name, labels), value in samples.items()
               if name == "rnnserve_translate_generated_tokens_total"
               and dict(labels).get("decoder") == decoder)


def translate_load(url: str, clients: int, seconds: float) -> dict:
    bodies = [{"text": text, "beam_size": 1} for text in translate_sentences()]
    make = cycle_requests("/v1/translate", bodies)
    asyncio.run(closed_loop(url, min(clients, 4), 1.0, make))
    before = scrape(url)
    started = time.monotonic()
    run = asyncio.run(closed_loop(url, clients, seconds, make))
    elapsed = time.monotonic() - started
    tokens = generated_tokens(scrape(url), "greedy") - generated_tokens(before, "greedy")
    ok = [o.latency_s for o in run.outcomes if o.ok]
    return {"clients": clients, "rps": len(ok) / elapsed, "tokens_per_s": tokens / elapsed,
            "p50_ms": 1000 * statistics.median(ok or [float("nan")]), "p99_ms": 1000 * pct(ok, 0.99),
            "failures": len(run.outcomes) - len(ok)}


async def stream_load(url: str, clients: int, seconds: float) -> dict:
    texts = translate_sentences()
    rng = random.Random(1)
    first_event: list[float] = []
    tokens = streams = failures = 0
    deadline = time.monotonic() + seconds

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal tokens, streams, failures
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                body = {"text": rng.choice(texts)}
                async with http.post(f"{url}/v1/translate/stream", json=body) as response:
                    if response.status != 200:
                        failures += 1
                        await response.read()
                        continue
                    first = None
                    buffer = b""
                    async for chunk in response.content.iter_any():
                        if first is None:
                            first = time.monotonic() - started
                        buffer += chunk
                    frames = [f for f in buffer.decode().split("\n\n") if f.startswith("data: ")]
                    done = json.loads(frames[-1][len("data: "):])
                    first_event.append(first)
                    tokens += done["output_tokens"]
                    streams += 1
            except aiohttp.ClientError:
                failures += 1

    connector = aiohttp.TCPConnector(limit=clients + 8)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:
        started = time.monotonic()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.monotonic() - started
    return {"clients": clients, "streams_per_s": streams / elapsed, "tokens_per_s": tokens / elapsed,
            "ttft_p50_ms": 1000 * statistics.median(first_event or [float("nan")]),
            "ttft_p99_ms": 1000 * pct(first_event, 0.99), "failures": failures}


def bench_tree(label: str, root: Path, home: Path, args: argparse.Namespace) -> dict:
    print(f"== {label}: {root}", flush=True)
    server = TreeServer(home, root).start()
    try:
        result = {"translate": [translate_load(server.url, c, args.seconds) for c in args.clients]}
        for row in result["translate"]:
            print(f"  translate {row}", flush=True)
        result["streams"] = asyncio.run(stream_load(server.url, args.streams, args.seconds))
        print(f"  streams {result['streams']}", flush=True)
        return result
    finally:
        server.stop()


def markdown(report: dict) -> str:
    ceiling_row = report["ceiling"]
    lines = [f"Machine: {report['machine']}. In-process ceiling (static greedy, batch 64): "
             f"{ceiling_row['sequences_per_s']:.0f} sequences/s, "
             f"{ceiling_row['tokens_per_s']:.0f} tokens/s.", "",
             "| code | load | requests/s | tokens/s | tokens/s / ceiling | p50 ms | p99 ms | failures |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label in ("before", "after"):
        for row in report[label]["translate"]:
            lines.append(f"| {label} | /v1/translate greedy, {row['clients']} clients | {row['rps']:.1f} | "
                         f"{row['tokens_per_s']:.0f} | "
                         f"{row['tokens_per_s'] / ceiling_row['tokens_per_s']:.2f} | "
                         f"{row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['failures']} |")
    lines += ["", "| code | streams | streams/s | tokens/s | first event p50 ms | first event p99 ms "
              "| failures |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for label in ("before", "after"):
        row = report[label]["streams"]
        lines.append(f"| {label} | {row['clients']} concurrent | {row['streams_per_s']:.1f} | "
                     f"{row['tokens_per_s']:.0f} | {row['ttft_p50_ms']:.0f} | {row['ttft_p99_ms']:.0f} | "
                     f"{row['failures']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="checkout of the earlier code")
    parser.add_argument("--seconds", type=float, default=15.0, help="per load point")
    parser.add_argument("--clients", type=int, nargs="*", default=[16, 64])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--out", type=Path, default=REPORTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    home = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
    report = {"machine": machine(), "ceiling": ceiling(args.seconds)}
    print(f"ceiling {report['ceiling']}", flush=True)
    report["before"] = bench_tree("before", args.before.resolve(), home, args)
    report["after"] = bench_tree("after", Path(__file__).resolve().parent.parent, home, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_decoding.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (args.out / "bench_decoding.md").write_text(table)
    print("\n" + table)
    return report


if __name__ == "__main__":
    main()
