"""Faults: a worker killed with SIGKILL under load, a damaged artifact, SIGTERM with requests in flight.

    python -m load.faults kill [--service translate|rnnserve] [--rate 20] [--duration 60] [--kill-at 10]
    python -m load.faults artifact [--model forecast] [--damage truncated|tampered|missing]
    python -m load.faults sigterm [--requests 16]
    python -m load.faults all

Each scenario starts its own ``bentoml serve`` on a free loopback port (the artifact one on a copy of
the model store, damaged), prints a JSON report and writes it to ``load/reports/faults-<name>.json``.
``tests/integration/test_faults.py`` runs bounded versions of the same functions.

- kill: traffic for ``service`` at ``rate`` req/s (translate requests for the translate model
  service; sentiment requests for ``rnnserve``, the entry worker, which runs the sentiment model
  itself); at ``kill_at`` s the service's worker gets SIGKILL. BentoML's arbiter (circus) starts a
  new one. A killed model service answers the entry's calls with connection errors, which the entry
  turns into 503 + Retry-After; a killed entry worker takes the connections it held with it (with
  ``RNNSERVE_API_WORKERS`` >= 2 the others keep serving). Reported: requests that failed (by status), the new
  pid, and the recovery time: from the kill until the first of three consecutive requests that
  answer normally (200, well-formed, latency under ``normal_latency_s``).
- artifact: the model's ``model.pt`` in the store copy is truncated, has one byte flipped (same size,
  wrong sha256) or is deleted. Expected: that service logs ``MODEL NOT LOADED`` and stays not ready,
  the entry's ``/readyz`` answers 503 naming it, its endpoints answer 503 with Retry-After, and the
  other models answer normally.
- sigterm: ``requests`` requests are put in flight, then ``bentoml serve`` gets SIGTERM (what
  Kubernetes sends). Expected: every one of them is answered 200, a request sent afterwards is
  refused, and the server exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil

from load.harness import TRAFFIC, Run, open_loop, send, session, translate_sentences, write_report
from load.harness import Request as Call
from services.local_server import Server
from services.workers import worker_pid

# Probe requests per model: one cheap request that answers 200 when the model serves.
PROBES: dict[str, tuple[str, dict[str, Any]]] = {
    "sentiment": ("/v1/sentiment", {"text": "a fine, warm film"}),
    "forecast": ("/v1/forecast/spec", {}),
    "caption": ("/v1/caption/spec", {}),
    "translate": ("/v1/translate", {"text": "I like cats."}),
}


def store_home() -> Path:
    return Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))


# SIGKILL a worker under load ----------------------------------------------------------------------


async def kill_worker_under_load(url: str, pid: int, service: str = "translate", rate: float = 20.0,
                                 duration_s: float = 60.0, kill_at_s: float = 10.0,
                                 normal_latency_s: float = 2.0) -> dict[str, Any]:
    """Kills ``service``'s worker with SIGKILL ``kill_at_s`` into a steady load; see the module doc."""
    old = worker_pid(pid, service)
    run = Run()
    make = TRAFFIC[service](3)
    load = asyncio.create_task(open_loop(url, rate, duration_s, make, run=run))
    await asyncio.sleep(kill_at_s)
    os.kill(old, signal.SIGKILL)
    killed_at = time.monotonic() - run.started
    await load
    new = None
    deadline = time.monotonic() + 30
    while new is None and time.monotonic() < deadline:
        try:
            candidate = worker_pid(pid, service)
            new = candidate if candidate != old else None
        except LookupError:
            pass
        if new is None:
            await asyncio.sleep(0.5)
    after = sorted((o for o in run.outcomes if o.sent_at + o.latency_s >= killed_at),
                   key=lambda o: o.sent_at)
    failed = [o for o in after if not o.ok]
    normal = [o.ok and o.latency_s <= normal_latency_s for o in after]
    recovery = None
    for i in range(len(after) - 2):
        if all(normal[i:i + 3]) and after[i].sent_at >= killed_at:
            recovery = round(after[i].sent_at + after[i].latency_s - killed_at, 2)
            break
    statuses: dict[str, int] = {}
    for outcome in failed:
        statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
    return {"service": service, "rate_rps": rate, "duration_s": duration_s,
            "killed_at_s": round(killed_at, 2), "old_pid": old, "new_pid": new, "requests": len(run.outcomes),
            "failed_after_kill": len(failed), "failed_statuses": statuses,
            "recovery_s": recovery, "normal_latency_s": normal_latency_s, "whole_run": run.summary()}


# Damaged artifact ---------------------------------------------------------------------------------


def damage_store(source: Path, target: Path, model: str, damage: str) -> Path:
    """Copies the model store and damages ``model``'s latest ``model.pt``; returns the file."""
    shutil.copytree(source / "models", target / "models", symlinks=True)
    version = (target / "models" / model / "latest").read_text().strip()
    path = target / "models" / model / version / "model.pt"
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        size = path.stat().st_size
        with open(path, "r+b") as handle:
            handle.truncate(size // 2)
    elif damage == "tampered":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, one byte different: only the checksum can tell
        path.write_bytes(bytes(data))
    else:
        raise ValueError(f"damage must be missing, truncated or tampered, got {damage!r}")
    return path


def start_degraded(home: Path, env: dict[str, str] | None = None, timeout: float = 300.0) -> Server:
    """Starts a server that is expected NOT to become ready; returns once every other service is."""
    server = Server(home, env=env).launch()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"bentoml serve exited:\n{server.log()}")
        try:
            answer = httpx.get(f"{server.url}/readyz", timeout=5)
            if answer.status_code == 200:
                return server
            detail = answer.json().get("detail", [])
            not_ready = sum(not d["ready"] for d in detail)
            if not_ready == 1 and "MODEL NOT LOADED" in server.log_path.read_text():
                return server
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    server.stop()
    raise RuntimeError(f"server not up after {timeout} s:\n{server.log()}")


def check_degraded(server: Server, model: str, token: str | None = None) -> dict[str, Any]:
    """What a server with ``model`` damaged answers: readiness, the damaged and the other models."""
    report: dict[str, Any] = {"model": model}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        ready = client.get("/readyz")
        report["readyz"] = {"status": ready.status_code, "body": ready.json()}
        probes = {}
        for name, (path, body) in PROBES.items():
            answer = client.post(path, json=body)
            shaped = answer.status_code != 200 and answer.headers.get("content-type") == "application/json"
            probes[name] = {"status": answer.status_code, "retry_after": answer.headers.get("retry-after"),
                            "code": answer.json()["error"]["code"] if shaped else None}
        report["probes"] = probes
    log = server.log_path.read_text()
    lines = [line for line in log.splitlines() if "MODEL NOT LOADED" in line]
    report["log_line"] = lines[0][:400] if lines else None
    return report


def artifact_scenario(model: str, damage: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="rnnserve-damaged-") as tmp:
        path = damage_store(store_home(), Path(tmp), model, damage)
        started = time.monotonic()
        server = start_degraded(Path(tmp))
        try:
            report = check_degraded(server, model)
        finally:
            server.stop()
        report.update(damage=damage, file=str(path.relative_to(tmp)),
                      up_after_s=round(time.monotonic() - started, 1))
    return report


# SIGTERM with requests in flight ------------------------------------------------------------------


async def sigterm_in_flight(url: str, pid: int, requests: int = 16, texts_per_request: int = 4,
                            delay_s: float = 0.1) -> dict[str, Any]:
    """Puts ``requests`` requests in flight on open connections, then sends SIGTERM to ``pid``.

    Translation with beam search of the longest held-out sentences: slow enough (about a second for
    all of them) to be in flight when the signal arrives, and it crosses the entry and a model
    service, so the shutdown order of the two is tested too. ``answered_before_sigterm`` says how
    many had already finished.
    """
    long_texts = sorted(translate_sentences(), key=len)[-texts_per_request:]
    call = Call("/v1/translate", {"texts": long_texts, "beam_size": 4},
                lambda answer: len(answer.get("results", [])) == len(long_texts))
    run = Run()
    async with session(requests + 4) as http:
        # Open the connections first, so the requests below are in flight, not waiting to connect;
        # repeat until a round answers 200 throughout (at most 5): right after a model worker was
        # restarted, the entry's client pool may still hold a connection to the dead one.
        warm_up: list[dict[str, int]] = []
        for _ in range(5):
            round_run = Run()
            await asyncio.gather(*(send(http, url, call, round_run) for _ in range(requests)))
            warm_up.append(round_run.counts())
            if all(o.ok for o in round_run.outcomes):
                break
        in_flight = [asyncio.create_task(send(http, url, call, run)) for _ in range(requests)]
        await asyncio.sleep(delay_s)
        signalled = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        sent_before = sum(1 for _ in in_flight)
        answered_before = sum(task.done() for task in in_flight)
        await asyncio.gather(*in_flight)
    late = Run()
    await asyncio.sleep(0.5)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as fresh:
        await send(fresh, url, call, late)
    exited_after = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not alive(pid):
            exited_after = round(time.monotonic() - signalled, 2)
            break
        await asyncio.sleep(0.1)
    return {"warm_up_rounds": warm_up, "in_flight": sent_before, "answered_before_sigterm": answered_before,
            "statuses": run.counts(), "error_codes": dict(run.error_codes),
            "all_ok": all(o.ok for o in run.outcomes),
            "late_request": late.outcomes[0].status, "exited_after_s": exited_after}


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# Command line -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=["kill", "artifact", "sigterm", "all"])
    parser.add_argument("--service", default="translate", choices=sorted(TRAFFIC),
                        help="kill: whose worker gets SIGKILL")
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--kill-at", type=float, default=10.0)
    parser.add_argument("--model", default="forecast", help="artifact: which model to damage")
    parser.add_argument("--damage", default="all", choices=["missing", "truncated", "tampered", "all"])
    parser.add_argument("--requests", type=int, default=16, help="sigterm: requests in flight")
    args = parser.parse_args(argv)
    reports: dict[str, Any] = {}
    if args.scenario in ("kill", "all"):
        server = Server(store_home()).start()
        try:
            reports["kill"] = asyncio.run(kill_worker_under_load(
                server.url, server.process.pid, args.service, args.rate, args.duration, args.kill_at))
        finally:
            server.stop()
    if args.scenario in ("artifact", "all"):
        damages = ["missing", "truncated", "tampered"] if args.damage == "all" else [args.damage]
        reports["artifact"] = [artifact_scenario(args.model, damage) for damage in damages]
    if args.scenario in ("sigterm", "all"):
        server = Server(store_home()).start()
        try:
            reports["sigterm"] = asyncio.run(sigterm_in_flight(server.url, server.process.pid, args.requests))
        finally:
            server.stop()
    for name, report in reports.items():
        path = write_report(f"faults-{name}", report if isinstance(report, dict) else {"runs": report})
        print(json.dumps(report, indent=2, default=str))
        print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
