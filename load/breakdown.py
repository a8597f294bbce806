"""Server CPU per request, split by stage of the request path, from a py-spy profile under load.

``python -m load.locust_bench --profile-users 64`` records the server's process tree with py-spy
(``record --subprocesses --nonblocking --format raw``: sampled stacks of every thread that is on a
CPU, the idle ones left out) while Locust drives that step, and splits the step's measured server CPU
per request by the share of samples in each stage. A sample's stage is the first rule that matches
walking its stack from the innermost frame outwards, so pydantic called by a middleware counts as
validation and a socket write issued by a middleware's ``send`` counts as the HTTP stack.

uvicorn runs on uvloop, whose loop, sockets and the httptools parser are compiled code: py-spy
sees them as time in ``Runner.run`` with no Python frame above it, the "event loop, sockets and
HTTP parsing (C)" stage. The rules are by file and function name and are printed with the table;
what no rule matches is "other", so the table always adds up to the measured CPU.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

# (stage, patterns): a frame matches when one pattern occurs in ``function (file:line)``.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("model (forward)", ("torch/nn/", "torch/jit/", "torch/_tensor.py", "torch/functional.py",
                         "models/rnn.py", "predict (services/sentiment.py")),
    ("features (tokens, bars, dates)", ("models/text.py", "tokenizers", "encode (services/sentiment.py",
                                        "SentimentModel.encode", "row_features", "bar_features (",
                                        "business_dates", "to_forecasts", "forecast_windows (")),
    ("logging", ("logging/", "services/observability.py:8", "services/observability.py:9",
                 "services/observability.py:1", "access.py")),
    ("metrics", ("prometheus_client/", "services/metrics.py", "instruments.py", "Batcher._observe",
                 "batch_size_histogram")),
    ("serialization", ("json/encoder.py", "to_json", "model_dump", "services/errors.py", "to_results (",
                       "starlette/responses.py", "_bentoml_sdk/io_models.py", "serde")),
    ("validation", ("pydantic", "services/schemas/", "services/body_checks.py", "json/decoder.py",
                    "json/__init__.py", "Body.__call__", "read_body (", "validate")),
    ("batching", ("services/inprocess.py", "services/batching.py", "concurrent/futures/", "threading.py",
                  "asyncio/futures.py", "asyncio/locks.py", "queue.py", "marshal/dispatcher.py",
                  "_bentoml_sdk/method.py")),
    ("routing", ("starlette/routing.py", "Routes.__call__", "services/fast_routes.py",
                 "starlette/applications.py")),
    ("middleware", ("services/admission.py", "services/openapi.py", "services/observability.py", "uuid.py",
                    "starlette/middleware/", "bentoml/_internal/server/", "_bentoml_impl/server/",
                    "services/api.py", "asyncio/timeouts.py", "asgi/", "services/lifecycle.py",
                    "services/bentoml_compat.py", "contextvars", "opentelemetry")),
    ("HTTP protocol (uvicorn, Python)", ("uvicorn/protocols/", "h11")),
    ("event loop, sockets and HTTP parsing (C)", ("Runner.run (asyncio/runners.py", "asyncio/")),
]
OTHER = "other"
STAGE_NAMES = [name for name, _ in STAGES] + [OTHER]


def stage_of(frames: list[str]) -> str:
    """The stage of one sampled stack (outermost frame first, as py-spy writes it)."""
    for frame in reversed(frames):
        if frame.startswith(("process ", "thread ")):
            continue
        for name, patterns in STAGES:
            if any(pattern in frame for pattern in patterns):
                return name
    return OTHER


def parse(text: str) -> Counter[str]:
    """Samples per stage from py-spy's raw (collapsed) output: ``frame;frame;... count`` per line."""
    samples: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples[stage_of(stack.split(";"))] += int(count)
    return samples


def py_spy() -> str:
    return str(Path(sys.executable).with_name("py-spy"))


def record(pid: int, seconds: float, out: Path, rate: int = 100) -> subprocess.Popen:
    """Starts py-spy on ``pid`` and its children for ``seconds``; wait on the returned process."""
    return subprocess.Popen(
        [py_spy(), "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--rate", str(rate),
         "--duration", str(max(1, round(seconds))), "--format", "raw", "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def split_ms(samples: Counter[str], cpu_ms_per_request: float) -> dict[str, float]:
    """Each stage's CPU milliseconds per request: its share of the samples times the measured CPU."""
    total = sum(samples.values())
    if total == 0:
        return {}
    return {name: cpu_ms_per_request * samples.get(name, 0) / total for name in STAGE_NAMES}


def table(columns: dict[str, tuple[Counter[str], float]]) -> str:
    """Markdown: one row per stage, per column its ms per request and share; a total row last."""
    names = list(columns)
    lines = ["| stage | " + " | ".join(f"{n}: ms / request | share" for n in names) + " |",
             "|---|" + "---:|---:|" * len(names)]
    splits = {n: split_ms(samples, ms) for n, (samples, ms) in columns.items()}
    for stage in STAGE_NAMES:
        cells = []
        for n in names:
            ms, total = splits[n].get(stage, 0.0), columns[n][1]
            cells.append(f"{ms:.3f} | {ms / total:.0%}" if total else "| ")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines.append("| **total (measured)** | " + " | ".join(
        f"**{columns[n][1]:.3f}** | {sum(columns[n][0].values())} samples" for n in names) + " |")
    return "\n".join(lines)


def rules() -> str:
    """The stage rules, as a markdown list (printed under each breakdown table)."""
    return "\n".join(f"- {name}: " + ", ".join(f"`{p}`" for p in patterns) for name, patterns in STAGES)

