"""A Locust closed loop on one endpoint, with the server's CPU per request (``make bench-locust``).

    python -m load.locust_bench --endpoint sentiment|forecast|forecast-columns [--users 1 16 64 256]
                                [--seconds 20]
                                [--url http://127.0.0.1:PORT[/path]] [--server-pid PID]

Beside ``load/bench.py`` (its own aiohttp client): this is the load a user comparing servers runs,
one headless Locust process (``FastHttpUser``, closed loop, wait 0, every user spawned at once), so the
same command measures this project's server and a peer (TorchServe) on the same requests.

- Without ``--url`` it starts this project's server (``services.local_server.Server``, the
  ``make serve`` defaults plus ``--env KEY=VALUE``) on a free loopback port and measures its process
  tree. With ``--url`` it targets that server; a path in the URL replaces the project's route (e.g.
  ``http://127.0.0.1:8080/predictions/sentiment``), and the body stays the project's JSON
  (``{"text": ...}``; ``FORECAST_EXAMPLE``), so a peer must accept it. ``--server-pid`` names the peer's
  root process, whose tree's CPU is measured with psutil; without it server CPU is reported unknown.
  Traffic only ever goes to 127.0.0.1.
- Per user count: Locust (``load/locust_bench_users.py``) runs headless for ``--seconds`` and writes
  its CSV; from it come requests/s (200s only), p50 and p99 (Locust's, over every answer) and
  failures by status.
  Server CPU seconds over the run (the whole process tree) / requests answered = server CPU per
  request; the Locust process's own CPU (client, including its start-up: about a second) is read
  from its rusage. Where the server serves this
  project's ``/metrics``, requests per model call and the model's busy share come from it too.
- ``--profile-users N``: after the table's steps, one more step of N users with py-spy recording the
  server's process tree (``load/breakdown.py``), whose server CPU per request is split by stage of the
  request path (HTTP, middleware, validation, tokenization, batching, model, serialization, metrics,
  logging). It is a step of its own so that the profiler's cost never touches the table's figures.
  ``--root DIR`` serves another checkout of the code (``git archive <commit> | tar -x -C DIR``), for a
  before/after pair in one sitting.
- Before the server starts, the model's in-process ceiling (``load/bench.py``'s model path, batch 64,
  one thread; ``--ceiling-seconds 0`` skips it) is measured, so each run states its own ceiling.

Prints a markdown table and writes ``load/reports/locust_bench_<endpoint>.json``. Speed is never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
import resource
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from load import breakdown
from services.local_server import ROOT, Server

REPORTS = ROOT / "load" / "reports"
USERS_FILE = ROOT / "load" / "locust_bench_users.py"
ENDPOINTS = ("sentiment", "forecast", "forecast-columns")
LOOPBACK = ("127.0.0.1",)
# Past --seconds, how long Locust may take to start and stop before it is killed.
LOCUST_GRACE_S = 60.0


def route_of(endpoint: str) -> str:
    """The project's route for an endpoint of this benchmark."""
    if endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint {endpoint!r}: choose one of {', '.join(ENDPOINTS)}")
    return f"/v1/{endpoint.split('-')[0]}"


def request_bodies(endpoint: str) -> list[dict]:
    """The request bodies, as the project's other Locust users and tests send them."""
    if endpoint == "sentiment":
        from load.harness import sentences

        return [{"text": text} for text in sentences()]
    if endpoint == "forecast":
        from services.schemas.forecast import FORECAST_EXAMPLE

        return [FORECAST_EXAMPLE]
    if endpoint == "forecast-columns":  # the same bars as the columnar form a pandas user sends
        from services.schemas.forecast import COLUMNS, FORECAST_EXAMPLE

        rows = FORECAST_EXAMPLE["rows"]
        columns = {name: [row[name] for row in rows] for name in COLUMNS}
        return [{**{k: v for k, v in FORECAST_EXAMPLE.items() if k != "rows"}, **columns}]
    raise ValueError(f"endpoint {endpoint!r}: choose one of {', '.join(ENDPOINTS)}")


def split_url(url: str, endpoint: str) -> tuple[str, str]:
    """``(host URL for Locust, request path)``; refuses anything but plain HTTP to 127.0.0.1."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK or parts.port is None:
        raise ValueError(f"--url {url!r}: this benchmark only loads http://127.0.0.1:PORT[/path]")
    path = parts.path.rstrip("/") or route_of(endpoint)
    return f"http://{parts.hostname}:{parts.port}", path


# Locust's CSV -------------------------------------------------------------------------------------


@dataclass
class Step:
    users: int
    requests: int  # every answer, 200 or not
    failures: dict[str, int]  # by status code ("503"), or the client error when nothing answered
    rps: float  # Locust's Requests/s over every answer
    p50_ms: float | None
    p99_ms: float | None
    seconds: float  # wall time of the Locust process, start to exit
    server_cpu_s: float | None  # CPU seconds of the server's process tree over that time; None: unknown
    client_cpu_s: float  # CPU seconds of the Locust process
    load_average: float = 0.0  # one-minute load average when the step started
    requests_per_call: float | None = None  # this project's /metrics only
    model_busy: float | None = None
    cpu_by_process: dict[str, float] = field(default_factory=dict)
    stage_samples: dict[str, int] = field(default_factory=dict)  # --profile-users: py-spy samples by stage

    @property
    def ok(self) -> int:
        return self.requests - sum(self.failures.values())

    @property
    def ok_rps(self) -> float:
        """200s per second: Locust's req/s counts every answer, a fast 503 too."""
        return self.rps * self.ok / self.requests if self.requests > 0 else 0.0

    @property
    def server_cpu_ms_per_request(self) -> float | None:
        return cpu_per_request_ms(self.server_cpu_s, self.requests)

    @property
    def client_cpu_ms_per_request(self) -> float | None:
        return cpu_per_request_ms(self.client_cpu_s, self.requests)

    @property
    def server_cores(self) -> float | None:
        """Cores the server kept busy: its CPU seconds over the span Locust measured (requests / req/s);
        the server idles while Locust starts and stops, so this is slightly high, never low."""
        if self.server_cpu_s is None or self.rps <= 0 or self.requests <= 0:
            return None
        return self.server_cpu_s / (self.requests / self.rps)


def cpu_per_request_ms(cpu_seconds: float | None, requests: int) -> float | None:
    """Milliseconds of CPU per request answered; None when the CPU is unknown or nothing answered."""
    if cpu_seconds is None or requests <= 0:
        return None
    return 1000.0 * cpu_seconds / requests


def _number(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):  # Locust writes "N/A" where there is no sample
        return None


def read_stats(path: Path) -> dict:
    """The ``Aggregated`` row of Locust's ``<prefix>_stats.csv``: requests, failures, req/s, p50, p99."""
    with open(path, newline="") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    if "Aggregated" not in rows:
        raise ValueError(f"{path}: no Aggregated row (did Locust run?)")
    row = rows["Aggregated"]
    return {"requests": int(row["Request Count"]), "failure_count": int(row["Failure Count"]),
            "rps": _number(row["Requests/s"]) or 0.0, "p50_ms": _number(row["50%"]),
            "p99_ms": _number(row["99%"])}


STATUS = re.compile(r"status (\d{3})")


def read_failures(path: Path) -> dict[str, int]:
    """Occurrences by status code from Locust's ``<prefix>_failures.csv`` (messages of
    ``load/locust_bench_users.py``); an error without a status is counted under its own text."""
    out: dict[str, int] = {}
    if not path.is_file():
        return out
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            found = STATUS.search(row["Error"])
            key = found.group(1) if found else row["Error"][:80]
            out[key] = out.get(key, 0) + int(row["Occurrences"])
    return dict(sorted(out.items()))


# Server CPU ---------------------------------------------------------------------------------------


def tree_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds so far of ``pid`` and its descendants, by BentoML service (``arbiter``: the rest)."""
    import psutil

    from services.workers import cpu_seconds_by_service

    if not psutil.pid_exists(pid):
        raise ValueError(f"--server-pid {pid}: no such process")
    return cpu_seconds_by_service(pid)


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# One step -----------------------------------------------------------------------------------------


def locust_command(host: str, users: int, seconds: float, prefix: Path) -> list[str]:
    """Headless, bounded, every user at once, no wait, stats to ``<prefix>_*.csv``."""
    return [sys.executable, "-m", "locust", "-f", str(USERS_FILE), "--headless", "--host", host,
            "--users", str(users), "--spawn-rate", str(users), "--run-time", f"{max(1, round(seconds))}s",
            "--stop-timeout", "5", "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING",
            "--exit-code-on-error", "0"]


def run_step(host: str, path: str, endpoint: str, users: int, seconds: float, out: Path,
             server_pid: int | None, profile: bool = False) -> Step:
    """One Locust run of ``users`` users for ``seconds``; raises when Locust fails or writes no stats.
    With ``profile``, py-spy records the server's tree from 2 s in until 2 s before the end."""
    from load.bench import model_counters, scrape

    prefix = out / f"locust_bench_{endpoint}_{users}"
    for suffix in ("_stats.csv", "_failures.csv"):
        Path(f"{prefix}{suffix}").unlink(missing_ok=True)
    env = {**os.environ, "LOCUST_BENCH_ENDPOINT": endpoint, "LOCUST_BENCH_PATH": path}
    load_average = os.getloadavg()[0]
    metrics_before = scrape(host)
    cpu_before = tree_cpu_seconds(server_pid) if server_pid else None
    client_before = children_cpu_seconds()
    started = time.monotonic()
    locust = subprocess.Popen(locust_command(host, users, seconds, prefix), cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    profile_path = out / f"profile_{endpoint}_{users}.txt"
    profiler = None
    if profile and server_pid:
        time.sleep(2.0)
        profiler = breakdown.record(server_pid, max(1.0, seconds - 4.0), profile_path)
    try:
        _, stderr = locust.communicate(timeout=seconds + LOCUST_GRACE_S)
    except subprocess.TimeoutExpired:
        locust.kill()
        _, stderr = locust.communicate()
    elapsed = time.monotonic() - started
    stage_samples: dict[str, int] = {}
    if profiler is not None:
        _, profiler_err = profiler.communicate(timeout=60)
        if profiler.returncode != 0 or not profile_path.is_file():
            raise RuntimeError(f"py-spy exited {profiler.returncode}: {profiler_err[-2000:]}")
        stage_samples = dict(breakdown.parse(profile_path.read_text()))
    client_cpu = children_cpu_seconds() - client_before
    cpu_after = tree_cpu_seconds(server_pid) if server_pid else None
    if locust.returncode != 0 or not Path(f"{prefix}_stats.csv").is_file():
        raise RuntimeError(f"locust exited {locust.returncode}:\n{stderr[-3000:]}")
    stats = read_stats(Path(f"{prefix}_stats.csv"))
    failures = read_failures(Path(f"{prefix}_failures.csv"))
    by_process = ({name: value - cpu_before.get(name, 0.0) for name, value in cpu_after.items()}
                  if cpu_before is not None else {})
    step = Step(users=users, requests=stats["requests"], failures=failures, rps=stats["rps"],
                p50_ms=stats["p50_ms"], p99_ms=stats["p99_ms"], seconds=round(elapsed, 2),
                server_cpu_s=sum(by_process.values()) if cpu_before is not None else None,
                client_cpu_s=client_cpu, load_average=load_average,
                cpu_by_process={k: round(v, 2) for k, v in by_process.items() if v >= 0.01},
                stage_samples=stage_samples)
    model = model_counters(metrics_before, scrape(host)) if metrics_before else None
    if model and model["batch_calls"]:
        step.requests_per_call = model["batched_requests"] / model["batch_calls"]
        step.model_busy = model["forward_seconds"] / elapsed
    return step


# Report -------------------------------------------------------------------------------------------


def _ms(value: float | None, digits: int = 2) -> str:
    return "unknown" if value is None else f"{value:.{digits}f}"


def table(steps: list[Step]) -> str:
    """The markdown table of a run, one row per user count."""
    lines = ["| users | req/s (200s) | p50 ms | p99 ms | requests | failures | server CPU per request (ms) "
             "| server CPU (cores) | client CPU per request (ms) | requests / model call | model busy |",
             "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for s in steps:
        failures = ", ".join(f"{n} x {code}" for code, n in s.failures.items()) or "0"
        per_call = "" if s.requests_per_call is None else f"{s.requests_per_call:.1f}"
        busy = "" if s.model_busy is None else f"{s.model_busy:.0%}"
        lines.append(
            f"| {s.users} | {s.ok_rps:.0f} | {_ms(s.p50_ms, 0)} | {_ms(s.p99_ms, 0)} | {s.requests} "
            f"| {failures} | {_ms(s.server_cpu_ms_per_request)} | {_ms(s.server_cores)} "
            f"| {_ms(s.client_cpu_ms_per_request)} | {per_call} | {busy} |")
    return "\n".join(lines)


def inprocess_ceiling(endpoint: str, seconds: float) -> float:
    """Sequences per second of the model path of ``load/bench.py`` at batch 64, one thread."""
    import random

    import torch

    from load.bench import forecast_paths, sentiment_paths, throughput

    torch.set_num_threads(1)
    run, items = (sentiment_paths()[0] if endpoint == "sentiment" else forecast_paths()[0])["model"]
    rng = random.Random(0)
    return throughput(run, [rng.sample(items, 64) for _ in range(8)], seconds)


def uptime() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", choices=ENDPOINTS, default="sentiment")
    parser.add_argument("--users", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--seconds", type=float, default=20.0, help="per user count")
    parser.add_argument("--url", help="a running server on 127.0.0.1 (default: start this project's)")
    parser.add_argument("--server-pid", type=int, help="the --url server's root process, for its CPU")
    parser.add_argument("--env", nargs="*", default=[], help="KEY=VALUE settings for the server it starts")
    parser.add_argument("--ceiling-seconds", type=float, default=3.0, help="0: no in-process ceiling")
    parser.add_argument("--label", default="", help="the server's name in the report")
    parser.add_argument("--out", type=Path, default=REPORTS)
    parser.add_argument("--profile-users", type=int, nargs="*", default=[],
                        help="one more step per user count, profiled: server CPU per request by stage")
    parser.add_argument("--root", type=Path, default=ROOT, help="serve this checkout of the code instead")
    args = parser.parse_args(argv)
    if any(users < 1 for users in args.users) or args.seconds <= 0:
        parser.error("--users must be at least 1 and --seconds positive")
    if args.server_pid and not args.url:
        parser.error("--server-pid goes with --url (the server it starts is measured anyway)")
    if args.env and args.url:
        parser.error("--env sets the server this command starts; with --url, set them on that server")
    if args.root != ROOT and (args.url or not (args.root / "services" / "api.py").is_file()):
        parser.error("--root is a checkout of this project (services/api.py), served by this command")
    if args.profile_users and args.url and not args.server_pid:
        parser.error("--profile-users needs the server's process: --server-pid with --url")
    if args.url:
        try:
            split_url(args.url, args.endpoint)
        except ValueError as error:
            parser.error(str(error))
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"endpoint": args.endpoint, "uptime_at_start": uptime(),
                    "label": args.label or (args.url or "this project (make serve defaults)"),
                    "args": {k: str(v) for k, v in vars(args).items()}}
    if args.ceiling_seconds > 0:
        report["ceiling_batch_64"] = inprocess_ceiling(args.endpoint, args.ceiling_seconds)
        print(f"in-process ceiling, batch 64: {report['ceiling_batch_64']:.0f} sequences/s", flush=True)
    server = None
    if args.url:
        host, path = split_url(args.url, args.endpoint)
        server_pid = args.server_pid
        if server_pid is None:
            print("no --server-pid: server CPU is unknown", flush=True)
    else:
        home = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
        env = {"RNNSERVE_DEVICE": "cpu", **dict(item.split("=", 1) for item in args.env)}
        server = Server(home, env=env, root=args.root).start()
        host, path, server_pid = server.url, route_of(args.endpoint), server.process.pid
        print(f"server ready on {server.url} (log: {server.log_path})", flush=True)
    steps: list[Step] = []
    profiled: list[Step] = []
    try:
        for users in args.users:
            step = run_step(host, path, args.endpoint, users, args.seconds, args.out, server_pid)
            steps.append(step)
            print(f"  {users:>4} users: {step.ok_rps:8.1f} req/s (200s)  p50 {_ms(step.p50_ms, 0)} ms  p99 "
                  f"{_ms(step.p99_ms, 0)} ms  failures {step.failures or 0}  server CPU "
                  f"{_ms(step.server_cpu_ms_per_request)} ms/request {step.cpu_by_process}", flush=True)
        for users in args.profile_users:
            step = run_step(host, path, args.endpoint, users, args.seconds, args.out, server_pid,
                            profile=True)
            profiled.append(step)
            print(f"  {users:>4} users, profiled: {step.ok_rps:8.1f} req/s (200s), server CPU "
                  f"{_ms(step.server_cpu_ms_per_request)} ms/request", flush=True)
    finally:
        if server is not None:
            server.stop()
    report["uptime_at_end"] = uptime()
    report["steps"], report["profiled_steps"] = ([{**asdict(s), "ok_rps": s.ok_rps,
                                                   "server_cpu_ms_per_request": s.server_cpu_ms_per_request,
                                                   "client_cpu_ms_per_request": s.client_cpu_ms_per_request}
                                                  for s in group] for group in (steps, profiled))
    written = args.out / f"locust_bench_{args.endpoint}.json"
    written.write_text(json.dumps(report, indent=1))
    best = max((s.ok_rps for s in steps), default=0.0)
    print(f"\n{report['label']}, {args.endpoint} {path}, {args.seconds:g} s per step; "
          f"{report['uptime_at_start']}\n")
    print(table(steps))
    if "ceiling_batch_64" in report:
        print(f"\nIn-process ceiling (batch 64): {report['ceiling_batch_64']:.0f} sequences/s; "
              f"best / ceiling = {best / report['ceiling_batch_64']:.2f}")
    for step in profiled:
        if step.server_cpu_ms_per_request is None or not step.stage_samples:
            continue
        print(f"\nServer CPU per request by stage, {step.users} users (py-spy, {step.ok_rps:.0f} req/s "
              "while profiled):\n")
        columns = {report["label"]: (Counter(step.stage_samples), step.server_cpu_ms_per_request)}
        print(breakdown.table(columns))
        print("\nStages, by the innermost frame that names one of (load/breakdown.py):\n")
        print(breakdown.rules())
    print(f"written: {written}")
    return report


if __name__ == "__main__":
    main()
