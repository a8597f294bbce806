"""Session step throughput against full-window recomputation, measured in one run.

    python -m load.bench_forecast_sessions                          # in-process, the committed artifact
    python -m load.bench_forecast_sessions --url http://127.0.0.1:3000   # also over HTTP

In-process, S sessions each stream T new bars (after a warm history of ``window`` bars):

* ``session step``: one batched ``model.step`` per tick over all S stored states (what the server's
  sessions do);
* ``recompute window``: per tick, the many-to-many model over each session's last ``window`` bars,
  batched (what a stateless client resending its window costs);
* ``recompute history``: per tick, over each session's whole history so far (what reproducing the
  session's exact state statelessly costs).

It also checks that the streamed forecasts equal the whole-history recomputation (allclose). Over
HTTP (``--url``) it compares ``/v1/forecast/sessions/step`` with ``/v1/forecast`` resending
``window + 1`` rows, from concurrent clients. Speed is printed as ratios; nothing is asserted.

    python -m load.bench_forecast_sessions --stores       # session store: memory against Redis

``--stores`` starts the composed server twice on a private model store, once with sessions in memory
and once in a local ``redis-server`` (AOF, ``appendfsync always`` as in deploy/k8s), and at 1, 16 and
64 concurrent sessions streams ``--store-bars`` bars into each over HTTP (closed loop: each client
posts its next bar when the last is answered), giving bars/s and the p50/p99 step latency.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from models.artifact import load_artifact
from training.forecast_data import feature_matrix, read_yahoo_csv

ROOT = Path(__file__).resolve().parent.parent


def timed(fn, repeats: int = 3) -> float:
    """Best-of-``repeats`` wall time of ``fn()`` in seconds (the least disturbed by other load)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


@torch.inference_mode()
def in_process(artifact: Path, csv: Path, sessions: int, ticks: int) -> dict:
    model, metadata = load_artifact(artifact)
    window = metadata["window"]
    features = torch.from_numpy(feature_matrix(read_yahoo_csv(csv))[1:])  # (N, F)
    # Session i streams a different stretch of history: bars start_i .. start_i + window + ticks.
    span = window + ticks
    starts = np.linspace(0, len(features) - span - 1, sessions).astype(int)
    streams = torch.stack([features[s:s + span] for s in starts])  # (S, window + T, F)
    warm, new = streams[:, :window], streams[:, window:]

    _, warm_state = model.sequence(warm, model.initial_state(sessions))

    def session_steps() -> torch.Tensor:
        state, out = warm_state, []
        for t in range(ticks):
            quantiles, state = model.step(new[:, t], state)  # (S, Q)
            out.append(quantiles)
        return torch.stack(out, dim=1)  # (S, T, Q)

    def recompute_window() -> None:
        for t in range(ticks):
            model.sequence(streams[:, t + 1:window + t + 1], model.initial_state(sessions))

    def recompute_history() -> None:
        for t in range(ticks):
            model.sequence(streams[:, :window + t + 1], model.initial_state(sessions))

    def single_session_steps() -> None:
        state = warm_state[:, :1]
        for t in range(ticks):
            _, state = model.step(new[:1, t], state)

    streamed = session_steps()
    whole, _ = model.sequence(streams, model.initial_state(sessions))  # (S, window + T, Q)
    equivalent = bool(torch.allclose(streamed, whole[:, window:], rtol=1e-4, atol=1e-6))
    max_diff = float((streamed - whole[:, window:]).abs().max())

    bars = sessions * ticks
    results = {
        "sessions": sessions, "ticks": ticks, "window": window, "cell": metadata["cell"],
        "torch_threads": torch.get_num_threads(),
        "equivalent_allclose": equivalent, "max_abs_diff": max_diff,
        "session_step_bars_per_s": bars / timed(session_steps),
        "recompute_window_bars_per_s": bars / timed(recompute_window),
        "recompute_history_bars_per_s": bars / timed(recompute_history),
        "single_session_step_ms": timed(single_session_steps) / ticks * 1000,
    }
    results["speedup_vs_window"] = results["session_step_bars_per_s"] / results["recompute_window_bars_per_s"]
    results["speedup_vs_history"] = (results["session_step_bars_per_s"]
                                     / results["recompute_history_bars_per_s"])
    return results


def over_http(url: str, clients: int, steps: int) -> dict:
    import httpx

    from services.schemas.forecast import EXAMPLE_BARS

    with httpx.Client(base_url=url, timeout=60) as http:
        rows_needed = http.post("/v1/forecast/spec", json={}).json()["rows_needed"]
    history = EXAMPLE_BARS[:len(EXAMPLE_BARS) - steps]
    assert len(history) >= rows_needed, f"needs {rows_needed + steps} example bars"

    shed = {"count": 0}

    def post(http: httpx.Client, route: str, body: dict) -> httpx.Response:
        """POST, retrying 503 (BentoML's batcher sheds load it predicts it cannot serve in time)."""
        for _ in range(20):
            response = http.post(route, json=body)
            if response.status_code != 503:
                response.raise_for_status()
                return response
            shed["count"] += 1
            time.sleep(0.05)
        response.raise_for_status()
        return response

    def session_client(_: int) -> list[float]:
        with httpx.Client(base_url=url, timeout=60) as http:
            session_id = http.post("/v1/forecast/sessions", json={"history": history}).json()["session_id"]
            latencies = []
            for bar in EXAMPLE_BARS[len(history):]:
                started = time.perf_counter()
                post(http, "/v1/forecast/sessions/step",
                     {"session_id": session_id, "bar": bar})
                latencies.append(time.perf_counter() - started)
            http.post("/v1/forecast/sessions/delete", json={"session_id": session_id})
            return latencies

    def window_client(_: int) -> list[float]:
        with httpx.Client(base_url=url, timeout=60) as http:
            latencies = []
            for t in range(steps):
                end = len(history) + t + 1
                body = {"rows": EXAMPLE_BARS[end - rows_needed:end], "horizon": 1}
                started = time.perf_counter()
                post(http, "/v1/forecast", body)
                latencies.append(time.perf_counter() - started)
            return latencies

    out = {"clients": clients, "steps_per_client": steps}
    for name, fn in (("http_session_step", session_client), ("http_window_forecast", window_client)):
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            latencies = [x for per_client in pool.map(fn, range(clients)) for x in per_client]
        elapsed = time.perf_counter() - started
        out[f"{name}_per_s"] = len(latencies) / elapsed
        out[f"{name}_p50_ms"] = statistics.median(latencies) * 1000
    out["http_503_retries"] = shed["count"]
    out["http_speedup"] = out["http_session_step_per_s"] / out["http_window_forecast_per_s"]
    return out


def stream_sessions(url: str, clients: int, bars: int) -> dict:
    """``clients`` sessions, each warmed with 30 bars then stepped ``bars`` more, concurrently."""
    import httpx

    from services.schemas.forecast import EXAMPLE_BARS

    history, stream = EXAMPLE_BARS[:30], EXAMPLE_BARS[30:30 + bars]
    start = threading.Barrier(clients + 1)
    retries = {"count": 0}

    def client(_: int) -> list[float]:
        with httpx.Client(base_url=url, timeout=60) as http:
            session_id = http.post("/v1/forecast/sessions", json={"history": history}).json()["session_id"]
            start.wait()
            latencies = []
            for bar in stream:
                started = time.perf_counter()
                for _ in range(50):
                    response = http.post("/v1/forecast/sessions/step", json={"session_id": session_id,
                                                                               "bar": bar})
                    if response.status_code != 503:
                        break
                    retries["count"] += 1
                    time.sleep(0.05)
                response.raise_for_status()
                latencies.append(time.perf_counter() - started)
            http.post("/v1/forecast/sessions/delete", json={"session_id": session_id})
            return latencies

    with ThreadPoolExecutor(max_workers=clients) as pool:
        futures = [pool.submit(client, i) for i in range(clients)]
        start.wait()
        started = time.perf_counter()
        latencies = [x for f in futures for x in f.result()]
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {"clients": clients, "steps": len(latencies), "bars_per_s": len(latencies) / elapsed,
            "p50_ms": latencies[len(latencies) // 2] * 1000,
            "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
            "retries_503": retries["count"]}


def store_comparison(levels: tuple[int, ...], bars: int, appendfsync: str = "always") -> list[dict]:
    """The session-step table, memory against Redis, on servers this function starts and stops."""
    import os
    import subprocess
    import sys
    import tempfile

    from services.local_redis import RedisServer
    from services.local_server import Server

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-sessions-") as tmp:
        home = Path(tmp) / "bentoml"
        artifacts = sorted(str(p) for p in (ROOT / "models" / "artifacts").iterdir()
                           if (p / "model.pt").is_file())
        subprocess.run([sys.executable, "-m", "training.registry", *artifacts], cwd=ROOT, check=True,
                       env={**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"},
                       capture_output=True)
        redis = RedisServer(Path(tmp) / "redis", appendfsync=appendfsync).start()
        try:
            for store, env in (("memory", {}), (f"redis ({appendfsync})",
                                                {"RNNSERVE_FORECAST_SESSION_STORE": redis.url})):
                server = Server(home, env=env).start()
                try:
                    stream_sessions(server.url, 4, 5)  # warm the connections and the batcher
                    for clients in levels:
                        rows.append({"store": store, **stream_sessions(server.url, clients, bars)})
                        print(f"  {store:>16} {clients:>3} sessions: {rows[-1]['bars_per_s']:>7.1f} bars/s, "
                              f"p50 {rows[-1]['p50_ms']:.1f} ms, p99 {rows[-1]['p99_ms']:.1f} ms", flush=True)
                finally:
                    server.stop()
        finally:
            redis.stop()
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, default=ROOT / "models" / "artifacts" / "forecast")
    parser.add_argument("--csv", type=Path, default=ROOT / "training" / "data" / "stock" / "TSLA.csv")
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--ticks", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--url", help="also benchmark a running server over HTTP")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--http-steps", type=int, default=20)
    parser.add_argument("--stores", action="store_true",
                        help="also compare session stores over HTTP: memory against a local Redis")
    parser.add_argument("--store-levels", default="1,16,64", help="concurrent sessions, comma-separated")
    parser.add_argument("--store-bars", type=int, default=60, help="bars each session streams (<= 60)")
    parser.add_argument("--appendfsync", default="always", choices=["always", "everysec", "no"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = in_process(args.artifact, args.csv, args.sessions, args.ticks)
    print(f"in-process, {results['sessions']} sessions x {results['ticks']} bars, window "
          f"{results['window']}, {results['cell']}, {results['torch_threads']} thread(s)")
    print(f"  session step (batched):    {results['session_step_bars_per_s']:>10.0f} bars/s")
    print(f"  recompute last window:     {results['recompute_window_bars_per_s']:>10.0f} bars/s  "
          f"-> sessions {results['speedup_vs_window']:.1f}x faster")
    print(f"  recompute whole history:   {results['recompute_history_bars_per_s']:>10.0f} bars/s  "
          f"-> sessions {results['speedup_vs_history']:.1f}x faster")
    print(f"  one session, one step:     {results['single_session_step_ms']:>10.3f} ms")
    print(f"  streamed == recomputed (allclose): {results['equivalent_allclose']} "
          f"(max |diff| {results['max_abs_diff']:.2e})")
    if args.url:
        results.update(over_http(args.url, args.clients, args.http_steps))
        print(f"HTTP, {args.clients} concurrent clients x {args.http_steps} bars")
        print(f"  /v1/forecast/sessions/step: {results['http_session_step_per_s']:>8.1f} req/s, p50 "
              f"{results['http_session_step_p50_ms']:.1f} ms")
        print(f"  /v1/forecast (resend rows): {results['http_window_forecast_per_s']:>8.1f} req/s, p50 "
              f"{results['http_window_forecast_p50_ms']:.1f} ms  -> sessions {results['http_speedup']:.2f}x")
        print(f"  503 load-shedding retries: {results['http_503_retries']}")
    if args.stores:
        levels = tuple(int(x) for x in args.store_levels.split(","))
        print(f"session store over HTTP (the composed server), {args.store_bars} bars per session")
        results["stores"] = store_comparison(levels, min(args.store_bars, 60), args.appendfsync)
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
