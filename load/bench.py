"""The service against the ceiling of its own models, in one run on one machine (``make bench``).

    python -m load.bench [--models sentiment forecast] [--seconds 8] [--clients 1 16 64 256]

Per model:

1. **Ceiling**: the model's own throughput, in process, on its TorchScript artifact (from the model
   store, else ``models/artifacts/<name>``), at batch sizes 1, 8, 32 and 64, in sequences per second,
   on held-out inputs (SST-2 dev sentences; TSLA bars of the test year), one intra-op thread as the
   service runs. ``model``: the service's collate + predict on ready token ids (sentiment) or the
   forward on ready feature windows (forecast): the limit the ratios use. ``helpers``: the service's
   whole pure path (``classify``: encode -> collate -> predict -> results -> split;
   ``forecast_windows``), which adds tokenization, features and building the result objects.
2. **Service, batching on**: ``bentoml serve services.api:Api`` on loopback, closed-loop clients
   (each sends its next request when the last one is answered) at 1, 16, 64 and 256 concurrent
   clients, one sequence per request: requests/s, p50/p99, failures by status.
3. **Service, batching off**: the same with ``RNNSERVE_BATCHING=off``, which declares the model APIs
   non-batchable so each request calls the model alone.
4. **Ratios**: service best / ceiling best; batched / unbatched at 64 clients; and p99 at half of the
   peak (an open-loop run at a constant half-peak rate) against 3 x max_latency_ms + one full batch.

The load generator (``load/harness.py``, the reliability scripts' too) shares the machine with the
server. It is one asyncio process (aiohttp): its CPU seconds and the server's (all its processes,
from /proc) are measured for every run and printed, so the share of the cores each side used is on
the table; ``--pin`` instead puts the server on the first CPU and the client on the second
(``os.sched_setaffinity``).

Length-aware batching (sentiment): padded positions and model time of batches of 64, with one model
call against length groups (``services.batching.plan_groups``) on the dev mix and on a long-tail mix
(one text in ten is four dev sentences joined), and a least-squares fit of the grouping cost model
(time = a*padded grid + b*real tokens + c*max_len + d per call) that gives the settings.

Results: printed, and written to ``load/reports/bench.json``. Speed is never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch

from load.harness import closed_loop, cycle_requests, open_loop, sentences, translate_sentences
from services.local_server import ROOT, Server, parse_metrics
from services.workers import cpu_seconds_by_service, service_name_of

REPORTS = ROOT / "load" / "reports"
TSLA = ROOT / "training" / "data" / "stock" / "TSLA.csv"
BATCH_SIZES = (1, 8, 32, 64)


# Inputs --------------------------------------------------------------------------------------------


def long_tail(sentences: list[str], rng: random.Random, count: int) -> list[str]:
    """One text in ten is four dev sentences joined (a short review), the rest single sentences."""
    return [" ".join(rng.sample(sentences, 4)) if rng.random() < 0.1 else rng.choice(sentences)
            for _ in range(count)]


def forecast_bodies(metadata: dict) -> list[dict]:
    """Request bodies over the held-out test year: each the window + 1 bars ending on a test day."""
    from training.forecast_data import read_yahoo_csv

    bars = read_yahoo_csv(TSLA)
    rows_needed = int(metadata["window"]) + 1
    first_test = metadata.get("split", {}).get("test", [bars.dates[-250]])[0]
    start = max(rows_needed, bars.dates.index(first_test) if first_test in bars.dates else len(bars) - 250)
    return [{"rows": bars.rows(end - rows_needed, end), "horizon": 1} for end in range(start, len(bars) + 1)]


# 1. Ceiling -------------------------------------------------------------------------------------


def artifact_dir(name: str) -> tuple[Path, str | None]:
    """The model store's copy of ``<name>:latest`` and its checksum, else the committed artifact."""
    import bentoml

    from services.settings import SETTINGS

    tag = getattr(SETTINGS, name).model if name in SETTINGS.GROUPS else f"{name}:latest"
    with contextlib.suppress(Exception):
        stored = bentoml.models.get(tag)
        return Path(stored.path), stored.info.metadata.get("sha256")
    return ROOT / "models" / "artifacts" / name, None


def throughput(run: Callable[[list], object], batches: list[list], seconds: float) -> float:
    """Items per second of ``run`` over ``batches``, cycled for about ``seconds`` after a warm-up."""
    for batch in batches[:3]:
        run(batch)
    done, started = 0, time.perf_counter()
    while True:
        for batch in batches:
            run(batch)
            done += len(batch)
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return done / elapsed


Paths = dict[str, tuple[Callable[[list], object], list]]  # name -> (run one batch, items to batch)


def sentiment_paths() -> tuple[Paths, dict]:
    """``model``: collate -> predict on token ids; ``helpers``: the whole ``classify`` on texts."""
    from models.artifact import load_artifact
    from models.text import Vocab
    from services.batching import collate
    from services.sentiment import NAME, classify, encode, predict

    path, sha = artifact_dir("sentiment")
    model, metadata = load_artifact(path, expected_sha256=sha)
    vocab, labels = Vocab(metadata["vocab"]), list(metadata["labels"])
    texts = sentences()
    encoded = [vocab.encode(text) for text in texts]
    info = {"artifact": str(path), "cell": metadata["cell"], "model_config": metadata.get("model_config")}

    def model_only(batch: list[list[int]]) -> object:
        tokens, lengths, _ = collate(batch, NAME)
        return predict(model, tokens, lengths)

    def helpers(batch: list[str]) -> object:
        return classify(model, labels, encode(vocab, batch, int(metadata["max_tokens"])))

    return {"model": (model_only, encoded), "helpers": (helpers, texts)}, info


def forecast_paths() -> tuple[Paths, dict, list[dict]]:
    """``model``: the many-to-one forward on feature windows; ``helpers``: ``forecast_windows``."""
    from models.artifact import load_artifact
    from services.forecasting import ModelSpec, forecast_windows, row_features
    from services.schemas.forecast import ForecastRequest

    path, sha = artifact_dir("forecast")
    model, metadata = load_artifact(path, expected_sha256=sha)
    spec = ModelSpec.from_metadata(metadata, "bench")
    bodies = forecast_bodies(metadata)
    requests = [ForecastRequest.model_validate(body) for body in bodies]
    windows = [row_features(request.rows[-(spec.window + 1):]) for request in requests]
    info = {"artifact": str(path), "cell": metadata["cell"], "window": spec.window}

    @torch.inference_mode()
    def model_only(batch: list[list[list[float]]]) -> object:
        return model(torch.tensor(batch, dtype=torch.float32))  # (B, L, F) -> (B, H, Q)

    return {"model": (model_only, windows),
            "helpers": (lambda batch: forecast_windows(model, spec, batch), requests)}, info, bodies


def translate_paths() -> tuple[Paths, dict, list[dict]]:
    """Greedy decoding. ``model``: collate -> greedy decode on ids; ``helpers``: ``translate``."""
    from models.artifact import load_artifact
    from services.batching import collate
    from services.schemas.translate import TranslateItem
    from services.translate import NAME, Codec, decode_batch, translate

    path, sha = artifact_dir("translate")
    model, metadata = load_artifact(path, expected_sha256=sha)
    codec = Codec(metadata)
    texts = translate_sentences()
    items = [TranslateItem(text=text, beam_size=1) for text in texts]
    encoded = codec.encode(texts)
    max_length = items[0].max_length
    info = {"artifact": str(path), "cell": metadata["cell"], "decoder": "greedy", "max_length": max_length}

    def model_only(batch: list[list[int]]) -> object:
        tokens, lengths, _ = collate(batch, NAME)
        return decode_batch(model, tokens, lengths, 1, max_length, 1.0, False)

    paths = {"model": (model_only, encoded), "helpers": (lambda batch: translate(model, codec, batch), items)}
    return paths, info, [{"text": text, "beam_size": 1} for text in texts]


def ceiling(paths: Paths, seconds: float, seed: int = 0) -> dict[str, dict[int, float]]:
    """Sequences per second of each path at each batch size, on the same random batches."""
    out: dict[str, dict[int, float]] = {}
    for name, (run, items) in paths.items():
        rng = random.Random(seed)
        out[name] = {}
        for batch_size in BATCH_SIZES:
            batches = [rng.sample(items, batch_size) for _ in range(max(8, 256 // batch_size))]
            out[name][batch_size] = throughput(run, batches, seconds)
    return out


# Length-aware batching ---------------------------------------------------------------------------


def grouping_study(seconds: float, seed: int = 0) -> dict:
    """Padded positions and model time of batches of 64 with and without length groups."""
    from models.artifact import load_artifact
    from models.text import Vocab
    from services.batching import LengthGrouping, collate, padded_positions, plan_groups
    from services.sentiment import grouping_from_settings, predict

    path, sha = artifact_dir("sentiment")
    model, metadata = load_artifact(path, expected_sha256=sha)
    vocab = Vocab(metadata["vocab"])
    dev = sentences()
    rng = random.Random(seed)

    # The cost model, fitted: time of one call = a * B * max_len + b * sum(len) + c * max_len + d.
    encoded = [vocab.encode(s) for s in long_tail(dev, rng, 4000)]
    rows, times = [], []
    for _ in range(300):
        batch = rng.sample(encoded, rng.choice((1, 2, 4, 8, 16, 32, 64)))
        tokens, lengths, _ = collate(batch, "bench")
        best = min(_timed(lambda t=tokens, n=lengths: predict(model, t, n)) for _ in range(2))
        b, t = tokens.shape
        rows.append([b * t, int(lengths.sum()), t, 1.0])
        times.append(best)
    a, b_tok, c_step, d_call = np.linalg.lstsq(np.array(rows, dtype=float), np.array(times), rcond=None)[0]
    fitted = {"a_per_padded_position_us": a * 1e6, "b_per_token_us": b_tok * 1e6,
              "c_per_step_us": c_step * 1e6, "d_per_call_us": d_call * 1e6}
    if a > 0:
        fitted["step_tokens"] = max(0.0, c_step / a)
        fitted["call_tokens"] = max(0.0, d_call / a)
    settings_grouping = grouping_from_settings()
    candidates = {"settings": settings_grouping}
    if a > 0:
        candidates["fitted"] = LengthGrouping(4, fitted["step_tokens"], fitted["call_tokens"])

    def run_batches(batches: list[list[list[int]]], grouping: LengthGrouping | None) -> dict:
        padded = real = calls = 0
        elapsed = 0.0
        for batch in batches:
            groups = plan_groups([len(s) for s in batch], grouping)
            started = time.perf_counter()
            for group in groups:
                tokens, lengths, _ = collate([batch[i] for i in group], "bench")
                predict(model, tokens, lengths)
            elapsed += time.perf_counter() - started
            padded += padded_positions([[len(batch[i]) for i in g] for g in groups])
            real += sum(len(s) for s in batch)
            calls += len(groups)
        return {"padding_waste": 1 - real / padded, "padded_positions_per_batch": padded / len(batches),
                "calls_per_batch": calls / len(batches), "sequences_per_s": 64 * len(batches) / elapsed}

    study = {"fit": fitted, "settings": asdict(settings_grouping)}
    for mix_name, texts in (("dev", [rng.choice(dev) for _ in range(64 * 40)]),
                            ("long_tail", long_tail(dev, rng, 64 * 40))):
        batches = [[vocab.encode(t) for t in texts[i:i + 64]] for i in range(0, len(texts), 64)]
        result = {}
        for repeat in range(max(1, int(seconds // 2))):  # interleaved, best of: fair under noise
            for name, grouping in (("one_call", None), *candidates.items()):
                measured = run_batches(batches, grouping)
                if name not in result or measured["sequences_per_s"] > result[name]["sequences_per_s"]:
                    result[name] = measured
            del repeat
        study[mix_name] = result
    return study


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


# 2-3. The service under load ---------------------------------------------------------------------


@dataclass
class LoadResult:
    clients: int
    seconds: float
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    failures: dict[str, int] = field(default_factory=dict)
    client_cpu: float = 0.0  # fraction of one core the load generator used
    server_cpu: float = 0.0  # fraction of one core the server processes used
    target_rps: float | None = None  # open-loop runs only
    cpu_by_service: dict[str, float] = field(default_factory=dict)  # cores, per server process group
    model_busy: float = 0.0  # fraction of the time a model forward ran (rnnserve_model_inference_seconds)
    mean_forward_ms: float = 0.0
    requests_per_call: float = 0.0  # bentoml_service_adaptive_batch_size: requests merged per call


def scrape(url: str) -> dict:
    with contextlib.suppress(Exception):
        import httpx

        return parse_metrics(httpx.get(f"{url}/metrics", timeout=30).text)
    return {}


def model_counters(before: dict, after: dict) -> dict[str, float]:
    """Model forwards and their seconds, and batcher calls and requests, between two scrapes."""
    from load.report import delta

    def total(name: str) -> float:
        return sum(value for _, value in delta(before, after, name))

    return {"forward_seconds": total("rnnserve_model_inference_seconds_sum"),
            "forwards": total("rnnserve_model_inference_seconds_count"),
            "batch_calls": total("bentoml_service_adaptive_batch_size_count"),
            "batched_requests": total("bentoml_service_adaptive_batch_size_sum")}


def run_load(server: Server, route: str, bodies: list[dict], clients: int, seconds: float,
             rate: float | None = None) -> LoadResult:
    """Closed loop (``rate`` None): ``clients`` clients; open loop: ``rate`` requests per second.

    Every answer but a 200 is a failure, by status (or the client error's name); latencies are of
    the 200s. Elapsed time runs until the last answer, so a backlog counts against requests/s.
    """
    make = cycle_requests(route, bodies)
    asyncio.run(closed_loop(server.url, min(clients, 4), 1.0, make))  # warm connections
    metrics_before = scrape(server.url)
    client_before, server_before = time.process_time(), cpu_seconds_by_service(server.process.pid)
    started = time.monotonic()
    run = asyncio.run(closed_loop(server.url, clients, seconds, make) if rate is None
                      else open_loop(server.url, rate, seconds, make))
    elapsed = time.monotonic() - started
    client_cpu = (time.process_time() - client_before) / elapsed
    server_after = cpu_seconds_by_service(server.process.pid)
    by_service = {name: (server_after[name] - server_before.get(name, 0.0)) / elapsed
                  for name in server_after}
    server_cpu = sum(by_service.values())
    model = model_counters(metrics_before, scrape(server.url))
    latencies = [outcome.latency_s for outcome in run.outcomes if outcome.ok]
    failures = Counter(outcome.status for outcome in run.outcomes if not outcome.ok)
    ordered = sorted(latencies) or [float("nan")]
    return LoadResult(clients=clients, seconds=round(elapsed, 2), requests=len(latencies),
                      rps=len(latencies) / elapsed, p50_ms=1000 * statistics.median(ordered),
                      p99_ms=1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
                      failures=dict(failures), client_cpu=client_cpu, server_cpu=server_cpu,
                      target_rps=rate, cpu_by_service={k: round(v, 3) for k, v in by_service.items()
                                                       if v >= 0.005},
                      model_busy=model["forward_seconds"] / elapsed,
                      mean_forward_ms=1000 * model["forward_seconds"] / max(1, model["forwards"]),
                      requests_per_call=model["batched_requests"] / max(1, model["batch_calls"]))


def start_server(home: Path, env: dict[str, str], target: str, pin: bool) -> Server:
    server = Server(home, env=env, target=target).start()
    if pin:  # the server (and its workers) on the first CPU, this client on the second
        cpus = sorted(os.sched_getaffinity(0))
        for process in [psutil.Process(server.process.pid),
                        *psutil.Process(server.process.pid).children(recursive=True)]:
            process.cpu_affinity(cpus[:1])
        os.sched_setaffinity(0, cpus[1:2] or cpus)
    return server


def profile(server: Server, seconds: float, out: Path) -> dict[str, list[tuple[str, float]]]:
    """py-spy samples of every server worker for ``seconds`` (call while load runs).

    Only samples of a thread holding the GIL count (``--gil``): with uvloop, an idle event loop
    otherwise shows up as the stale stack of the last coroutine it ran. Torch releases the GIL while
    it computes, so the model's own time is read from ``rnnserve_model_inference_seconds`` instead
    (``model_busy`` in every load row).
    """
    workers = psutil.Process(server.process.pid).children(recursive=True)
    procs = {}
    for worker in workers:
        name = service_name_of(worker.cmdline())
        if name is None or name in procs:  # one worker per service: the services' workers run alike
            continue
        raw = out / f"pyspy-{name}.txt"
        procs[name] = (subprocess.Popen(
            [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(worker.pid), "--duration",
             str(int(seconds)), "--rate", "200", "--format", "raw", "--output", str(raw), "--nonblocking",
             "--gil"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), raw)
    summary = {}
    for name, (process, raw) in procs.items():
        process.wait(timeout=seconds + 60)
        if raw.is_file():
            summary[name] = hot_frames(raw.read_text())
    return summary


# A sample counts for the group of its innermost frame that matches one (a frame matching several
# counts for the first). "BentoML middlewares" are its tracing, access-log, metrics and timeout
# wrappers around every request, receive and send.
PROFILE_GROUPS = (
    ("model forward (torch)", ("torch/", "forward", "_VF", "predict (services/sentiment.py")),
    ("tokenize / encode", ("models/text.py",)),
    ("pydantic validation / serialisation", ("pydantic", "_bentoml_sdk/validators", "io_models")),
    ("json", ("json/", "orjson")),
    ("metrics (prometheus_client)", ("prometheus_client",)),
    ("BentoML middlewares (tracing, access log, metrics)", (
        "opentelemetry", "asgi/__init__.py", "trace/", "context/", "http/access.py", "http/instruments.py",
        "http/traffic.py", "logging/")),
    ("guard middleware (services/errors.py, http.py)", ("services/errors.py", "services/http.py")),
    ("batching (BentoML dispatcher)", ("dispatcher",)),
    ("entry -> model client (aiohttp)", ("aiohttp", "_bentoml_impl/client")),
    ("HTTP server (uvicorn, httptools, starlette)", ("uvicorn", "h11", "httptools", "starlette")),
    ("asyncio / event loop", ("asyncio/", "selectors.py", "uvloop", "anyio")),
)


def hot_frames(raw: str) -> list[tuple[str, float]]:
    """Share of non-idle samples per group, by the innermost frame that matches a group."""
    totals: Counter = Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if "select (selectors.py" in frames[-1] or ("_worker (concurrent" in stack and "wait" in frames[-1]):
            continue  # idle
        samples += int(count)
        for frame in reversed(frames):
            group = next((g for g, keys in PROFILE_GROUPS if any(k in frame for k in keys)), None)
            if group:
                totals[group] += int(count)
                break
        else:
            totals["other"] += int(count)
    return [(group, n / samples) for group, n in totals.most_common()] if samples else []


def profile_under_load(server: Server, plan: ModelPlan, seconds: float, out: Path) -> dict:
    """py-spy on every worker while 64 closed-loop clients load the endpoint."""
    import threading

    loader = threading.Thread(target=run_load, args=(server, plan.route, plan.bodies, 64, seconds + 3))
    loader.start()
    time.sleep(1.5)
    try:
        summary = profile(server, seconds, out)
    finally:
        loader.join()
    for service, groups in summary.items():
        shown = ", ".join(f"{g} {share:.0%}" for g, share in groups[:8])
        print(f"  profile {service}: {shown}", flush=True)
    return summary


# The run ------------------------------------------------------------------------------------------


@dataclass
class ModelPlan:
    name: str
    route: str
    bodies: list[dict]
    max_latency_ms: int
    max_batch_size: int


def bench_service(plan: ModelPlan, home: Path, args: argparse.Namespace, full_batch_s: float,
                  extra_env: dict[str, str]) -> dict:
    results: dict = {}
    affinity = os.sched_getaffinity(0)
    # RNNSERVE_BATCHING reaches the sentiment and forecast services; the others always batch.
    modes = args.modes if plan.name in ("sentiment", "forecast") else [m for m in args.modes if m == "on"]
    for mode in modes:
        env = {"RNNSERVE_BATCHING": mode, "RNNSERVE_DEVICE": "cpu", **extra_env}
        server = start_server(home, env, "services.api:Api", args.pin)
        try:
            rows = []
            for clients in args.clients:
                row = run_load(server, plan.route, plan.bodies, clients, args.seconds)
                rows.append(row)
                print(f"  {plan.name} batching {mode:>3} {clients:>4} clients: {row.rps:8.1f} req/s  "
                      f"p50 {row.p50_ms:7.1f} ms  p99 {row.p99_ms:7.1f} ms  failures {row.failures or 0}  "
                      f"model busy {row.model_busy:.0%}, {row.requests_per_call:.1f} requests/call, "
                      f"{row.mean_forward_ms:.1f} ms/forward  "
                      f"cpu: server {row.server_cpu:.2f} {row.cpu_by_service} client {row.client_cpu:.2f} "
                      "cores", flush=True)
            results[mode] = [asdict(r) for r in rows]
            if mode == "on":
                peak = max(rows, key=lambda r: r.rps)
                half = run_load(server, plan.route, plan.bodies, peak.clients, args.seconds,
                                rate=peak.rps / 2)
                bound_ms = 3 * plan.max_latency_ms + 1000 * full_batch_s
                results["half_peak"] = {**asdict(half), "bound_ms": bound_ms}
                print(f"  {plan.name} open loop at half peak ({half.target_rps:.0f} req/s): {half.rps:.1f} "
                      f"req/s  p99 {half.p99_ms:.1f} ms (bound {bound_ms:.0f} ms)  failures "
                      f"{half.failures or 0}", flush=True)
                if args.profile:
                    results["profile"] = profile_under_load(server, plan, args.profile, args.out)
        finally:
            server.stop()
            os.sched_setaffinity(0, affinity)
    return results


def machine() -> dict:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "load_average_at_start": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def markdown(report: dict) -> str:
    """The tables of load/RESULTS.md, from a bench.json report."""
    m = report["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}, "
             f"torch {m['torch']}; load average at start {m['load_average_at_start'][0]:.2f}; "
             f"{m['date']}.", ""]
    for name, entry in report["models"].items():
        lines += [f"### {name}", "", "Ceiling, in process, one thread (sequences/s):", "",
                  "| path | " + " | ".join(f"batch {b}" for b in entry["ceiling"]) + " |",
                  "|---|" + "---:|" * len(entry["ceiling"])]
        for label, key in (("model (collate + forward)", "ceiling"),
                           ("service helpers", "ceiling_with_helpers")):
            lines.append(f"| {label} | " + " | ".join(f"{v:.0f}" for v in entry[key].values()) + " |")
        if "on" in entry:
            lines += ["", "Service (closed loop, one sequence per request):", "",
                      "| batching | clients | req/s | p50 ms | p99 ms | failures | requests / model call "
                      "| model busy | server CPU (cores) | client CPU |",
                      "|---|---:|---:|---:|---:|---|---:|---:|---|---:|"]
            for mode in ("on", "off"):
                for r in entry.get(mode, []):
                    cpu = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r.get("cpu_by_service", {}).items()))
                    lines.append(f"| {mode} | {r['clients']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | "
                                 f"{r['p99_ms']:.1f} | {r['failures'] or 0} | {r['requests_per_call']:.1f} | "
                                 f"{r['model_busy']:.0%} | {r['server_cpu']:.2f} ({cpu}) | "
                                 f"{r['client_cpu']:.2f} |")
            half, ratios = entry.get("half_peak"), entry["ratios"]
            if half is not None:
                lines += ["", f"Open loop at half the peak ({half['target_rps']:.0f} req/s offered): "
                          f"{half['rps']:.0f} req/s, p50 {half['p50_ms']:.1f} ms, "
                          f"p99 {half['p99_ms']:.1f} ms against the bound 3 x {entry['max_latency_ms']} ms "
                          f"+ {entry['full_batch_ms']:.0f} ms = {half['bound_ms']:.0f} ms; "
                          f"failures {half['failures'] or 0}."]
            lines += ["", "Ratios: service best / ceiling best = "
                      f"{ratios['service_best_over_ceiling_best']:.2f}; batched / unbatched at 64 clients = "
                      f"{ratios['batched_over_unbatched_at_64'] or 0:.1f}x.", ""]
        if "grouping" in entry:
            g = entry["grouping"]
            lines += ["", "Length groups, batches of 64 (model calls only):", "",
                      "| mix | plan | padding waste | padded positions / batch | calls / batch "
                      "| sequences/s |",
                      "|---|---|---:|---:|---:|---:|"]
            for mix in ("dev", "long_tail"):
                for plan, v in g[mix].items():
                    lines.append(f"| {mix} | {plan} | {v['padding_waste']:.1%} | "
                                 f"{v['padded_positions_per_batch']:.0f} | {v['calls_per_batch']:.2f} | "
                                 f"{v['sequences_per_s']:.0f} |")
            fit = g["fit"]
            lines += ["", "Cost fit (us): " + ", ".join(f"{k} {v:.2f}" for k, v in fit.items()), ""]
        if "profile" in entry:
            lines += ["", "Profile under 64 clients (py-spy, share of busy samples):", ""]
            for service, groups in entry["profile"].items():
                if groups and groups[0][1] < 0.95:
                    lines.append(f"- {service}: " + ", ".join(f"{g} {v:.0%}" for g, v in groups[:8]))
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["sentiment", "forecast", "translate"],
                        help="sentiment, forecast, translate (greedy); caption has no plan yet")
    parser.add_argument("--seconds", type=float, default=8.0, help="per load point")
    parser.add_argument("--ceiling-seconds", type=float, default=3.0, help="per batch size")
    parser.add_argument("--clients", type=int, nargs="*", default=[1, 16, 64, 256])
    parser.add_argument("--pin", action="store_true", help="server on CPU 0, client on CPU 1")
    parser.add_argument("--profile", type=float, default=0.0,
                        help="seconds of py-spy on every server worker under 64 clients (0: off)")
    parser.add_argument("--skip-service", action="store_true", help="ceilings and grouping only")
    parser.add_argument("--skip-grouping", action="store_true", help="no length-group study")
    parser.add_argument("--modes", nargs="*", default=["on", "off"], help="batching modes to serve")
    parser.add_argument("--env", nargs="*", default=[], help="KEY=VALUE settings for the server")
    parser.add_argument("--out", type=Path, default=REPORTS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    extra_env = dict(item.split("=", 1) for item in args.env)
    from services.settings import SETTINGS, Settings

    settings = Settings.from_env({**os.environ, **extra_env}) if extra_env else SETTINGS
    home = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
    report: dict = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "models": {}}
    print(f"machine: {report['machine']}", flush=True)
    for name in args.models:
        print(f"\n== {name}", flush=True)
        if name == "sentiment":
            paths, info = sentiment_paths()
            bodies = [{"text": text} for text in sentences()]
            route = "/v1/sentiment"
        elif name == "forecast":
            paths, info, bodies = forecast_paths()
            route = "/v1/forecast"
        elif name == "translate":
            paths, info, bodies = translate_paths()
            route = "/v1/translate"
        else:
            print(f"  no benchmark plan for {name!r}; skipped")
            continue
        all_ceilings = ceiling(paths, args.ceiling_seconds)
        ceilings = all_ceilings["model"]
        max_batch = getattr(getattr(settings, name), "max_batch_size", 64)
        full_batch_s = max_batch / all_ceilings["helpers"][max(b for b in BATCH_SIZES if b <= max_batch)]
        for path_name, values in all_ceilings.items():
            print(f"  ceiling, {path_name} (sequences/s): "
                  + ", ".join(f"batch {b}: {v:.0f}" for b, v in values.items()), flush=True)
        entry = {"info": info, "ceiling": ceilings, "ceiling_with_helpers": all_ceilings["helpers"],
                 "full_batch_ms": 1000 * full_batch_s, "max_batch_size": max_batch,
                 "max_latency_ms": getattr(getattr(settings, name), "max_latency_ms", 0)}
        if name == "sentiment" and not args.skip_grouping:
            entry["grouping"] = grouping_study(args.ceiling_seconds)
            for mix in ("dev", "long_tail"):
                shown = "; ".join(f"{k}: waste {v['padding_waste']:.1%}, {v['calls_per_batch']:.2f} calls, "
                                  f"{v['sequences_per_s']:.0f} seq/s"
                                  for k, v in entry["grouping"][mix].items())
                print(f"  length groups, batches of 64, {mix} mix: {shown}", flush=True)
            print(f"  cost fit: {entry['grouping']['fit']}", flush=True)
        if not args.skip_service:
            plan = ModelPlan(name, route, bodies, entry["max_latency_ms"], max_batch)
            entry.update(bench_service(plan, home, args, full_batch_s, extra_env))
            best_ceiling = max(ceilings.values())
            best_service = max(r["rps"] for mode in ("on", "off") for r in entry.get(mode, []))
            on64 = next((r for r in entry.get("on", []) if r["clients"] == 64), None)
            off64 = next((r for r in entry.get("off", []) if r["clients"] == 64), None)
            entry["ratios"] = {
                "service_best_over_ceiling_best": best_service / best_ceiling,
                "batched_over_unbatched_at_64": (on64["rps"] / off64["rps"]) if on64 and off64 else None,
                "half_peak_p99_within_bound": (
                    "half_peak" in entry and entry["half_peak"]["p99_ms"] < entry["half_peak"]["bound_ms"]),
            }
            print(f"  ratios: {entry['ratios']}", flush=True)
        report["models"][name] = entry
        (args.out / "bench.json").write_text(json.dumps(report, indent=1, default=float))
        (args.out / "bench.md").write_text(markdown(json.loads((args.out / "bench.json").read_text())))
    print("\n" + (args.out / "bench.md").read_text())
    print(f"written: {args.out / 'bench.json'}, {args.out / 'bench.md'}")
    return report


if __name__ == "__main__":
    main()
