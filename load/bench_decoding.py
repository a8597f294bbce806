"""Translation and captioning before and after iteration-level decoding, in one run on one machine.

    python -m load.bench_decoding --before /tmp/rnnserve-before [--seconds 8]
    make bench-decoding ARGS="--before /tmp/rnnserve-before"

``--before`` is a checkout of the earlier code (``git archive eda1527 | tar -x -C DIR``: static
batching by BentoML, one decode loop per stream); its server is started from there, this tree's from
here, one after the other, with the same model store and the same inputs (issue 16, "Measured").

1. **Ceilings** (in this process, one intra-op thread): the artifact's own static decode of random
   batches of 64 held-out inputs, greedy and beam 4, for each model: sequences/s and generated
   tokens/s. Static batching runs every row until the batch's longest one ends.
   - translate: ``services.translate.decode_batch`` on test-split sentences, default options;
   - caption: ``services.caption.to_batch`` + the artifact's ``greedy``/``beam_search`` on the
     procedural test scenes of load/caption_locust.py (every size, format and mode), already decoded
     to the model's pixels, at the default ``max_length``.
2. Per tree, ``bentoml serve services.api:Api`` on loopback, closed-loop aiohttp clients:
   - **requests**: ``/v1/translate`` and ``/v1/caption`` (base64 image), greedy and beam 4, at 1,
     16, 64 and 256 clients: requests/s, generated tokens/s (the server's own counters:
     ``rnnserve_translate_generated_tokens_total``, ``rnnserve_caption_decode_steps_sum``, the same
     tokens the ceiling counts), p50/p99, and tokens/s over the ceiling of this run;
   - **streams**: ``/v1/translate/stream`` and ``/v1/caption/stream``, 64 and 256 concurrent
     streams: streams/s, tokens/s (the final event's ``output_tokens`` or ``steps``), time to first
     token p50/p99 (send to the first event that carries text), inter-token p99 (between consecutive
     text events of one stream, as the client receives them).

Prints Markdown tables and writes ``load/reports/bench_decoding.json`` and ``.md``. A full run at the
default 8 s per point takes about 9 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import codecs
import io
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import torch

from load.bench import REPORTS, artifact_dir, machine, scrape
from load.harness import closed_loop, cycle_requests, translate_sentences
from services.local_server import Server

BATCH = 64  # the static ceiling's batch size
BEAM = 4
CLIENTS = (1, 16, 64, 256)
STREAMS = (64, 256)
MODELS = ("translate", "caption")
# load/caption_locust.py's test scenes: (format, save options, Pillow mode, side). Repeated here, not
# imported: importing that module imports Locust, which monkey-patches the standard library.
CAPTION_VARIANTS = [
    ("PNG", {}, "RGB", 64), ("PNG", {}, "RGBA", 128), ("PNG", {}, "P", 96),
    ("JPEG", {"quality": 90}, "RGB", 256), ("JPEG", {"quality": 80}, "L", 512),
    ("WEBP", {"lossless": True}, "RGB", 64), ("WEBP", {"quality": 85}, "RGB", 200),
]
CAPTION_SCENES = 8


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


# Pure helpers (tests/unit/test_bench_decoding.py) -----------------------------------------------------


def pct(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 1]); NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def gaps(times: list[float]) -> list[float]:
    """Time between consecutive events of one stream."""
    return [later - earlier for earlier, later in itertools.pairwise(times)]


class FrameReader:
    """Server-sent event frames out of byte chunks that need not align with them; each frame is
    stamped with the arrival time of the chunk that completed it."""

    def __init__(self) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")()  # a chunk may end inside a character
        self.buffer = ""
        self.frames: list[tuple[float, str]] = []

    def feed(self, chunk: bytes, at: float) -> None:
        self.buffer += self.decoder.decode(chunk)
        *complete, self.buffer = self.buffer.split("\n\n")
        self.frames.extend((at, frame[len("data: "):]) for frame in complete if frame.startswith("data: "))


@dataclass(frozen=True)
class StreamRecord:
    """One finished stream as the client saw it: seconds from sending to each text event, and the
    tokens the final event reports."""

    text_events: list[float]
    tokens: int


def stream_record(frames: list[tuple[float, str]], started: float, tokens_key: str) -> StreamRecord:
    """Frames of one stream -> its record. The last frame is the summary (``"done"``); the others
    carry text. Raises ``ValueError`` when the stream did not end with a summary."""
    if not frames:
        raise ValueError("the stream sent no event")
    done = json.loads(frames[-1][1])
    if not done.get("done"):
        raise ValueError(f"the stream did not end with a summary: {frames[-1][1][:120]}")
    return StreamRecord([at - started for at, _ in frames[:-1]], int(done[tokens_key]))


def stream_row(streams: int, elapsed: float, records: list[StreamRecord], failures: Counter) -> dict:
    """The streams table's row: rates over ``elapsed`` and the client-side latencies."""
    first = [r.text_events[0] for r in records if r.text_events]
    between = [gap for r in records for gap in gaps(r.text_events)]
    return {"streams": streams, "seconds": round(elapsed, 2), "completed": len(records),
            "streams_per_s": len(records) / elapsed, "tokens_per_s": sum(r.tokens for r in records) / elapsed,
            "ttft_p50_ms": 1000 * median(first), "ttft_p99_ms": 1000 * pct(first, 0.99),
            "inter_token_p99_ms": 1000 * pct(between, 0.99), "failures": dict(failures)}


def ratio(value: float, ceiling: float) -> float:
    return value / ceiling if ceiling else float("nan")


def failures_text(failures: dict[str, int]) -> str:
    return ", ".join(f"{count} x {status}" for status, count in sorted(failures.items())) or "0"


def requests_table(report: dict, model: str) -> list[str]:
    ceilings = report["ceiling"][model]
    lines = ["| code | decoder | clients | requests/s | tokens/s | tokens/s / ceiling | p50 ms | p99 ms "
             "| failures |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for decoder in ("greedy", "beam"):
        for label in ("before", "after"):
            for row in report.get(label, {}).get(model, {}).get("requests", {}).get(decoder, []):
                share = ratio(row["tokens_per_s"], ceilings[decoder]["tokens_per_s"])
                lines.append(
                    f"| {label} | {decoder_name(decoder)} | {row['clients']} | {row['rps']:.1f} | "
                    f"{row['tokens_per_s']:.0f} | {share:.2f} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} | "
                    f"{failures_text(row['failures'])} |")
    return lines


def streams_table(report: dict, model: str) -> list[str]:
    lines = ["| code | streams | streams/s | tokens/s | first token p50 ms | first token p99 ms "
             "| inter-token p99 ms | failures |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label in ("before", "after"):
        for row in report.get(label, {}).get(model, {}).get("streams", []):
            lines.append(f"| {label} | {row['streams']} concurrent | {row['streams_per_s']:.1f} | "
                         f"{row['tokens_per_s']:.0f} | {row['ttft_p50_ms']:.0f} | {row['ttft_p99_ms']:.0f} | "
                         f"{row['inter_token_p99_ms']:.0f} | {failures_text(row['failures'])} |")
    return lines


def decoder_name(decoder: str) -> str:
    return "greedy" if decoder == "greedy" else f"beam {BEAM}"


def find(rows: list[dict], key: str, value: int) -> dict | None:
    return next((row for row in rows if row[key] == value), None)


def targets(report: dict) -> list[str]:
    """Issue 16's targets, read off this run: greedy translate at 64 clients over the ceiling, and 64
    translate streams' tokens/s against the code before (5x) with first-token p99 under 300 ms."""
    lines = []
    after = report.get("after", {}).get("translate", {})
    before = report.get("before", {}).get("translate", {})
    greedy = find(after.get("requests", {}).get("greedy", []), "clients", 64)
    if greedy is not None:
        value = ratio(greedy["tokens_per_s"], report["ceiling"]["translate"]["greedy"]["tokens_per_s"])
        lines.append(f"- greedy /v1/translate at 64 clients: {value:.2f}x the static ceiling "
                     f"(target >= 1.0): {'met' if value >= 1.0 else 'not met'}")
    now, then = find(after.get("streams", []), "streams", 64), find(before.get("streams", []), "streams", 64)
    if now is not None and then is not None:
        gain = ratio(now["tokens_per_s"], then["tokens_per_s"])
        lines.append(f"- 64 translate streams: {gain:.1f}x the tokens/s of the code before (target >= 5): "
                     f"{'met' if gain >= 5 else 'not met'}; first token p99 {now['ttft_p99_ms']:.0f} ms "
                     f"(target < 300): {'met' if now['ttft_p99_ms'] < 300 else 'not met'}")
    return lines


def markdown(report: dict) -> str:
    lines = [f"Machine: {report['machine']}. {report['seconds']:g} s per point."]
    for model in MODELS:
        if model not in report["ceiling"]:
            continue
        ceiling = report["ceiling"][model]
        lines += ["", f"### {model}", "",
                  f"In-process static ceiling (random batches of {BATCH}, one thread): greedy "
                  f"{ceiling['greedy']['sequences_per_s']:.0f} sequences/s, "
                  f"{ceiling['greedy']['tokens_per_s']:.0f} tokens/s; beam {BEAM} "
                  f"{ceiling['beam']['sequences_per_s']:.0f} sequences/s, "
                  f"{ceiling['beam']['tokens_per_s']:.0f} tokens/s.", ""]
        lines += [*requests_table(report, model), "", *streams_table(report, model)]
    if report.get("load_average_at_end"):
        lines += ["", f"Load average at the end: {report['load_average_at_end']}."]
    found = targets(report)
    if found:
        lines += ["", "Targets (issue 16):", *found]
    return "\n".join(lines) + "\n"


# Inputs ------------------------------------------------------------------------------------------


def caption_images() -> list[bytes]:
    """Encoded test scenes: ``CAPTION_SCENES`` scenes in every variant."""
    from PIL import Image

    from training.scenes import make_scene

    images = []
    for seed in range(CAPTION_SCENES):
        scene = Image.fromarray(make_scene(seed, "test_fresh").image)
        for fmt, options, mode, side in CAPTION_VARIANTS:
            buffer = io.BytesIO()
            scene.resize((side, side), Image.Resampling.NEAREST).convert(mode).save(buffer, fmt, **options)
            images.append(buffer.getvalue())
    return images


@dataclass
class Workload:
    """One model's inputs: request bodies per decoder, stream bodies, and how tokens are counted."""

    model: str
    route: str
    stream_route: str
    bodies: dict[str, list[dict]]  # decoder -> request bodies
    stream_bodies: list[dict]
    metric: str  # the server's counter of generated tokens, labelled by ``decoder``
    stream_tokens_key: str  # the summary event's token count


def workloads() -> dict[str, Workload]:
    texts = translate_sentences()
    images = [base64.b64encode(data).decode() for data in caption_images()]
    return {
        "translate": Workload(
            "translate", "/v1/translate", "/v1/translate/stream",
            {"greedy": [{"text": t, "beam_size": 1} for t in texts],
             "beam": [{"text": t, "beam_size": BEAM} for t in texts]},
            [{"text": t} for t in texts], "rnnserve_translate_generated_tokens_total", "output_tokens"),
        "caption": Workload(
            "caption", "/v1/caption", "/v1/caption/stream",
            {"greedy": [{"image": i, "beam_size": 1} for i in images],
             "beam": [{"image": i, "beam_size": BEAM} for i in images]},
            [{"image": i} for i in images], "rnnserve_caption_decode_steps_sum", "steps"),
    }


# 1. Ceilings ------------------------------------------------------------------------------------


def timed(run: Callable[[list], int], batches: list[list], seconds: float) -> dict:
    """Sequences and tokens per second of ``run`` (one batch -> its generated tokens)."""
    run(batches[0])  # warm
    sequences = tokens = index = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        batch = batches[index % len(batches)]
        tokens += run(batch)
        sequences += len(batch)
        index += 1
    elapsed = time.perf_counter() - started
    return {"sequences_per_s": sequences / elapsed, "tokens_per_s": tokens / elapsed}


def translate_ceiling(seconds: float) -> dict:
    from models.artifact import load_artifact
    from services.batching import collate
    from services.schemas.translate import TranslateItem
    from services.translate import NAME, Codec, decode_batch

    path, sha = artifact_dir("translate")
    model, metadata = load_artifact(path, expected_sha256=sha)
    encoded = Codec(metadata).encode(translate_sentences())
    defaults = TranslateItem(text="x")
    rng = random.Random(0)
    batches = [rng.sample(encoded, BATCH) for _ in range(50)]
    out = {}
    for decoder, beam in (("greedy", 1), ("beam", BEAM)):
        def run(batch: list[list[int]], beam: int = beam) -> int:
            tokens, lengths, _ = collate(batch, NAME)
            return int(decode_batch(model, tokens, lengths, beam, defaults.max_length,
                                    defaults.length_penalty, False)[1].sum())
        out[decoder] = timed(run, batches, seconds)
    return out


def caption_ceiling(seconds: float) -> dict:
    from models.artifact import load_artifact
    from services.caption import Decoder, encode_pixels, prepare_image, to_batch
    from services.schemas.caption import MAX_LENGTH, CaptionItem

    path, sha = artifact_dir("caption")
    model, metadata = load_artifact(path, expected_sha256=sha)
    decoder = Decoder.from_metadata(model, metadata)
    max_length = min(int(metadata["max_length"]), MAX_LENGTH)
    items = [CaptionItem(pixels=encode_pixels(prepare_image(data, decoder.image_size)[1]), beam_size=1,
                         max_length=max_length) for data in caption_images()]
    rng = random.Random(0)
    batches = [[rng.choice(items) for _ in range(BATCH)] for _ in range(20)]
    out = {}
    for name, beam in (("greedy", 1), ("beam", BEAM)):
        def run(batch: list[CaptionItem], beam: int = beam) -> int:
            with torch.inference_mode():
                images = to_batch(decoder, batch)
                limits = torch.full((len(batch),), max_length, dtype=torch.long)
                if beam == 1:
                    _, _, lengths = model.greedy(images, limits)
                else:
                    _, _, lengths = model.beam_search(images, limits, beam)
            return int(lengths.sum())
        out[name] = timed(run, batches, seconds)
    return out


# 2. Served ---------------------------------------------------------------------------------------


def counted(samples: dict, metric: str, decoder: str) -> float:
    return sum(value for (name, labels), value in samples.items()
               if name == metric and dict(labels).get("decoder") == decoder)


def request_load(url: str, work: Workload, decoder: str, clients: int, seconds: float) -> dict:
    make = cycle_requests(work.route, random.Random(clients).sample(work.bodies[decoder],
                                                                    len(work.bodies[decoder])))
    asyncio.run(closed_loop(url, min(clients, 4), 1.0, make))  # warm connections and the route
    before = scrape(url)
    started = time.monotonic()
    run = asyncio.run(closed_loop(url, clients, seconds, make))
    elapsed = time.monotonic() - started
    tokens = counted(scrape(url), work.metric, decoder) - counted(before, work.metric, decoder)
    ok = [o.latency_s for o in run.outcomes if o.ok]
    return {"clients": clients, "seconds": round(elapsed, 2), "requests": len(ok), "rps": len(ok) / elapsed,
            "tokens_per_s": tokens / elapsed, "p50_ms": 1000 * median(ok), "p99_ms": 1000 * pct(ok, 0.99),
            "failures": dict(Counter(o.status for o in run.outcomes if not o.ok))}


async def stream_load(url: str, work: Workload, streams: int, seconds: float) -> dict:
    """``streams`` clients, each opening its next stream when the last one ends."""
    rng = random.Random(streams)
    records: list[StreamRecord] = []
    failures: Counter[str] = Counter()
    deadline = time.monotonic() + seconds

    async def client(http: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            started = time.monotonic()
            reader = FrameReader()
            try:
                body = rng.choice(work.stream_bodies)
                async with http.post(url + work.stream_route, json=body) as response:
                    if response.status != 200:
                        failures[str(response.status)] += 1
                        await response.read()
                        continue
                    async for chunk in response.content.iter_any():
                        reader.feed(chunk, time.monotonic())
                records.append(stream_record(reader.frames, started, work.stream_tokens_key))
            except aiohttp.ClientError as exc:
                failures[type(exc).__name__] += 1
            except (ValueError, KeyError):
                failures["malformed"] += 1

    connector = aiohttp.TCPConnector(limit=streams + 8)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:
        started = time.monotonic()
        await asyncio.gather(*(client(http) for _ in range(streams)))
        elapsed = time.monotonic() - started
    return stream_row(streams, elapsed, records, failures)


def bench_tree(label: str, root: Path, home: Path, work: dict[str, Workload],
               args: argparse.Namespace) -> dict:
    print(f"== {label}: {root}", flush=True)
    server = TreeServer(home, root).start()
    result: dict = {}
    try:
        for model in args.models:
            result[model] = {"requests": {}, "streams": []}
            for decoder in ("greedy", "beam"):
                rows = result[model]["requests"][decoder] = []
                for clients in args.clients:
                    rows.append(request_load(server.url, work[model], decoder, clients, args.seconds))
                    print(f"  {model} {decoder} {rows[-1]}", flush=True)
            for streams in args.streams:
                row = asyncio.run(stream_load(server.url, work[model], streams, args.seconds))
                result[model]["streams"].append(row)
                print(f"  {model} streams {row}", flush=True)
        return result
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="checkout of the earlier code; omitted: this tree only")
    parser.add_argument("--seconds", type=float, default=8.0, help="per load point and per ceiling")
    parser.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS))
    parser.add_argument("--streams", type=int, nargs="*", default=list(STREAMS))
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--out", type=Path, default=REPORTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    home = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
    report: dict = {"machine": machine(), "seconds": args.seconds, "ceiling": {}}
    print(f"load average at the start: {report['machine']['load_average_at_start']}", flush=True)
    ceilings = {"translate": translate_ceiling, "caption": caption_ceiling}
    for model in args.models:
        report["ceiling"][model] = ceilings[model](args.seconds)
        print(f"ceiling {model} {report['ceiling'][model]}", flush=True)
    work = workloads()
    if args.before is not None:
        report["before"] = bench_tree("before", args.before.resolve(), home, work, args)
    report["after"] = bench_tree("after", Path(__file__).resolve().parent.parent, home, work, args)
    report["load_average_at_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_decoding.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (args.out / "bench_decoding.md").write_text(table)
    print("\n" + table)
    return report


if __name__ == "__main__":
    main()
