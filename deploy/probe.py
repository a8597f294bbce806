"""Real requests against a running rnnserve: one per served model, CPU/GPU comparison, bounded load.

``ENDPOINTS`` is the one list of public model endpoints that the deployment checks use: the smoke test
(``deploy/smoke.sh``), the GPU check (``deploy/gpu_check.sh``) and the manifest tests. A model that
``GET /v1/models`` reports but that is missing here fails the check with a message saying so, so a new
model cannot slip past the smoke test. Each entry names the route and the request example constant in
the model's schema module (the same constant the OpenAPI docs and Locust use).

    python deploy/probe.py check http://127.0.0.1:3000
    python deploy/probe.py compare http://127.0.0.1:3001 http://127.0.0.1:3002   # CPU vs CUDA
    python deploy/probe.py load http://127.0.0.1:3000 --seconds 20 --concurrency 8
    python deploy/probe.py down http://127.0.0.1:3000 translate      # with translate's service stopped
    python deploy/probe.py wait-up http://127.0.0.1:3000 translate   # until it answers 200 again

Loopback only: the load is bounded in time and count and stops by itself.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@dataclass(frozen=True)
class Endpoint:
    route: str
    example_module: str
    example_name: str

    def example(self) -> dict[str, Any]:
        return getattr(importlib.import_module(self.example_module), self.example_name)


# Public endpoint of every model, by the name GET /v1/models reports. Add a model here when it lands.
ENDPOINTS: dict[str, Endpoint] = {
    "sentiment": Endpoint("/v1/sentiment", "services.schemas.sentiment", "SENTIMENT_EXAMPLE"),
    "forecast": Endpoint("/v1/forecast", "services.schemas.forecast", "FORECAST_EXAMPLE"),
    "caption": Endpoint("/v1/caption", "services.schemas.caption", "CAPTION_EXAMPLE"),
    "translate": Endpoint("/v1/translate", "services.schemas.translate", "TRANSLATE_EXAMPLE"),
}
# Paths the deployment relies on (probes, scraping); the manifest tests check them against these.
LIVENESS_PATH = "/livez"
READINESS_PATH = "/readyz"
METRICS_PATH = "/metrics"
MODELS_PATH = "/v1/models"


def request_with_headers(url: str, body: dict[str, Any] | None = None,
                         timeout: float = 60) -> tuple[int, bytes, dict[str, str]]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.read(), {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), {k.lower(): v for k, v in exc.headers.items()}


def request(url: str, body: dict[str, Any] | None = None, timeout: float = 60) -> tuple[int, bytes]:
    status, payload, _ = request_with_headers(url, body, timeout)
    return status, payload


def served_models(base: str) -> list[str]:
    status, body = request(base + MODELS_PATH, {})  # BentoML APIs are POST
    if status != 200:
        raise SystemExit(f"POST {MODELS_PATH} answered {status}: {body[:300]!r}")
    return [model["name"] for model in json.loads(body)]


def check(base: str) -> dict[str, Any]:
    """Readiness, metrics and one real request per served model; exits non-zero on any failure."""
    failures = []
    status, _ = request(base + READINESS_PATH)
    print(f"GET {READINESS_PATH}: {status}")
    if status != 200:
        failures.append(f"{READINESS_PATH} answered {status}")
    answers: dict[str, Any] = {}
    names = served_models(base)
    print(f"POST {MODELS_PATH}: {', '.join(names)}")
    for name in names:
        if name not in ENDPOINTS:
            failures.append(f"model {name!r} is served but has no entry in deploy/probe.py ENDPOINTS")
            continue
        endpoint = ENDPOINTS[name]
        started = time.perf_counter()
        status, body = request(base + endpoint.route, endpoint.example())
        elapsed_ms = (time.perf_counter() - started) * 1000
        shown = body[:400].decode(errors="replace")
        print(f"POST {endpoint.route}: {status} in {elapsed_ms:.0f} ms: {shown}")
        if status != 200:
            failures.append(f"{endpoint.route} answered {status}")
        else:
            answers[name] = json.loads(body)
    status, body = request(base + METRICS_PATH)
    families = sorted({line.split()[2] for line in body.decode().splitlines() if line.startswith("# TYPE")})
    print(f"GET {METRICS_PATH}: {status}, {len(families)} metric families: {', '.join(families)}")
    if status != 200 or "bentoml_service_request_total" not in families:
        failures.append(f"{METRICS_PATH} answered {status} without bentoml_service_request_total")
    if failures:
        raise SystemExit("FAILED: " + "; ".join(failures))
    return answers


def model_states(base: str) -> dict[str, str]:
    status, body = request(base + MODELS_PATH, {})
    if status != 200:
        raise SystemExit(f"POST {MODELS_PATH} answered {status}: {body[:300]!r}")
    return {model["name"]: model["state"] for model in json.loads(body)}


def check_down(base: str, down: str, tries: int = 4) -> None:
    """With model ``down``'s own service stopped: its endpoint answers 503 ``model_unavailable`` with a
    Retry-After (``tries`` times, one after the other: each entry worker has its own connections to
    the stopped service, and the first calls meet the ones it kept open), ``/v1/models`` shows it
    unavailable and every other model ready, every other model answers 200, and the entry stays
    ready. Prints how long each 503 took. Exits non-zero on any failure."""
    failures = []
    elapsed = []
    for attempt in range(1, tries + 1):
        started = time.perf_counter()
        status, body, headers = request_with_headers(base + ENDPOINTS[down].route, ENDPOINTS[down].example())
        elapsed.append(time.perf_counter() - started)
        code = json.loads(body).get("error", {}).get("code") if body.startswith(b"{") else None
        print(f"POST {ENDPOINTS[down].route} ({attempt}/{tries}): {status} in {elapsed[-1] * 1000:.0f} ms, "
              f"Retry-After {headers.get('retry-after')}, {body[:300].decode(errors='replace')}")
        if status != 503 or not headers.get("retry-after", "").isdigit() or code != "model_unavailable":
            failures.append(f"{ENDPOINTS[down].route} answered {status} (Retry-After "
                            f"{headers.get('retry-after')!r}, code {code!r}) in {elapsed[-1]:.1f} s; "
                            "expected 503 model_unavailable with a Retry-After")
    print(f"{ENDPOINTS[down].route} while {down} is down: 503 in "
          f"{', '.join(f'{seconds:.2f}' for seconds in elapsed)} s")
    states = model_states(base)
    print(f"POST {MODELS_PATH}: {states}")
    expected = {name: "unavailable" if name == down else "ready" for name in states}
    if states != expected or down not in states:
        failures.append(f"{MODELS_PATH} says {states}; expected {expected}")
    for name, endpoint in ENDPOINTS.items():
        if name == down:
            continue
        status, body = request(base + endpoint.route, endpoint.example())
        print(f"POST {endpoint.route}: {status}")
        if status != 200:
            failures.append(f"{endpoint.route} answered {status} while {down} is down: {body[:200]!r}")
    status, body = request(base + READINESS_PATH)
    print(f"GET {READINESS_PATH}: {status}")
    if status != 200:
        failures.append(f"{READINESS_PATH} answered {status} while only {down} is down: {body[:200]!r}")
    if failures:
        raise SystemExit("FAILED: " + "; ".join(failures))


def wait_up(base: str, name: str, timeout_s: float, interval_s: float = 0.5) -> float:
    """Polls ``name``'s endpoint through the entry until it answers 200; returns the seconds waited."""
    endpoint = ENDPOINTS[name]
    started = time.monotonic()
    statuses: dict[int, int] = {}
    while True:
        status, body = request(base + endpoint.route, endpoint.example())
        statuses[status] = statuses.get(status, 0) + 1
        waited = time.monotonic() - started
        if status == 200:
            print(f"POST {endpoint.route}: 200 after {waited:.1f} s (answers on the way: {statuses}): "
                  f"{body[:200].decode(errors='replace')}")
            return waited
        if waited > timeout_s:
            raise SystemExit(f"FAILED: {endpoint.route} still answers {status} after {timeout_s:.0f} s "
                             f"(answers: {statuses}): {body[:300]!r}")
        time.sleep(interval_s)


def _numbers_close(left: Any, right: Any, path: str, rtol: float, atol: float, out: list[str]) -> None:
    if isinstance(left, dict) and isinstance(right, dict):
        if left.keys() != right.keys():
            out.append(f"{path}: keys {sorted(left)} != {sorted(right)}")
        for key in left.keys() & right.keys():
            _numbers_close(left[key], right[key], f"{path}.{key}", rtol, atol, out)
    elif isinstance(left, list) and isinstance(right, list):
        if len(left) != len(right):
            out.append(f"{path}: length {len(left)} != {len(right)}")
        for index, (a, b) in enumerate(zip(left, right, strict=False)):
            _numbers_close(a, b, f"{path}[{index}]", rtol, atol, out)
    elif isinstance(left, float) or isinstance(right, float):
        if not math.isclose(float(left), float(right), rel_tol=rtol, abs_tol=atol):
            out.append(f"{path}: {left} != {right}")
    elif left != right:
        out.append(f"{path}: {left!r} != {right!r}")


def compare(reference: str, candidate: str, rtol: float = 1e-3, atol: float = 1e-4) -> list[str]:
    """Posts every example to both servers; returns the differences beyond tolerance."""
    differences: list[str] = []
    for name in served_models(reference):
        endpoint = ENDPOINTS[name]
        results = [request(base + endpoint.route, endpoint.example()) for base in (reference, candidate)]
        (status_a, body_a), (status_b, body_b) = results
        if status_a != 200 or status_b != 200:
            differences.append(f"{name}: status {status_a} vs {status_b}")
            continue
        _numbers_close(json.loads(body_a), json.loads(body_b), name, rtol, atol, differences)
        print(f"{name}: compared ({len(body_a)} bytes)")
    return differences


def load(base: str, seconds: float, concurrency: int, max_requests: int = 100_000) -> dict[str, float]:
    """Requests per second per model under a bounded closed-loop load (loopback only)."""
    rates = {}
    for name in served_models(base):
        endpoint = ENDPOINTS[name]
        body = endpoint.example()
        deadline = time.monotonic() + seconds
        per_worker = max_requests // concurrency

        def worker(route: str = endpoint.route, payload: dict = body, stop: float = deadline,
                   limit: int = per_worker) -> tuple[int, int]:
            ok = failed = 0
            while time.monotonic() < stop and ok + failed < limit:
                status, _ = request(base + route, payload)
                ok, failed = (ok + 1, failed) if status == 200 else (ok, failed + 1)
            return ok, failed

        started = time.monotonic()
        with ThreadPoolExecutor(concurrency) as pool:
            counts = list(pool.map(lambda _: worker(), range(concurrency)))
        elapsed = time.monotonic() - started
        ok = sum(c[0] for c in counts)
        failed = sum(c[1] for c in counts)
        rates[name] = ok / elapsed
        print(f"{name}: {ok} ok, {failed} failed in {elapsed:.1f} s: {ok / elapsed:.1f} req/s "
              f"at concurrency {concurrency}")
    return rates


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check").add_argument("url")
    cmp = sub.add_parser("compare")
    cmp.add_argument("reference")
    cmp.add_argument("candidate")
    cmp.add_argument("--rtol", type=float, default=1e-3)
    cmp.add_argument("--atol", type=float, default=1e-4)
    ld = sub.add_parser("load")
    ld.add_argument("url")
    ld.add_argument("--seconds", type=float, default=20)
    ld.add_argument("--concurrency", type=int, default=8)
    ld.add_argument("--json", help="write {model: req/s} here")
    dn = sub.add_parser("down")
    dn.add_argument("url")
    dn.add_argument("model", choices=sorted(ENDPOINTS))
    up = sub.add_parser("wait-up")
    up.add_argument("url")
    up.add_argument("model", choices=sorted(ENDPOINTS))
    up.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    if args.command == "check":
        check(args.url.rstrip("/"))
    elif args.command == "down":
        check_down(args.url.rstrip("/"), args.model)
    elif args.command == "wait-up":
        wait_up(args.url.rstrip("/"), args.model, args.timeout)
    elif args.command == "compare":
        differences = compare(args.reference.rstrip("/"), args.candidate.rstrip("/"), args.rtol, args.atol)
        for line in differences:
            print("DIFF", line)
        if differences:
            return 1
        print("all outputs match within tolerance")
    else:
        rates = load(args.url.rstrip("/"), args.seconds, args.concurrency)
        if args.json:
            Path(args.json).write_text(json.dumps(rates))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
