"""A real ``bentoml serve`` on a free loopback port, and its ``/metrics`` read back.

Used by the tests (``tests/conftest.py`` fixtures), the load tools and the benchmarks (``load/``), so
that neither imports the other. It runs from a checkout: the server starts in the repository root
(``ROOT``) with this interpreter, and traffic only ever goes to 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
ENTRY_TARGET = "services.api:Api"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def private_home(bentoml_home: Path, port: int) -> Path:
    """A BENTOML_HOME of its own that shares ``bentoml_home``'s model store.

    ``bentoml serve`` wipes ``$BENTOML_HOME/prometheus_multiproc_dir`` when it starts, so two servers
    on one home would delete each other's metric files (the first server's histograms vanish from
    ``/metrics``). Each server therefore gets its own home whose ``models`` links to the shared store.
    """
    home = bentoml_home / f"serve-{port}"
    home.mkdir(parents=True, exist_ok=True)
    models = home / "models"
    if not models.exists():
        (bentoml_home / "models").mkdir(parents=True, exist_ok=True)
        models.symlink_to((bentoml_home / "models").resolve(), target_is_directory=True)
    return home


class Server:
    """A real ``bentoml serve`` process on a free loopback port, of this checkout or of ``root`` (another
    checkout of the code, e.g. ``git archive <commit>``, for before/after benchmarks)."""

    def __init__(self, bentoml_home: Path, env: dict[str, str] | None = None,
                 target: str = ENTRY_TARGET, root: Path = ROOT) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        home = private_home(bentoml_home, self.port)
        self.log_path = home / "serve.log"
        self.env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true",
                    **(env or {})}
        if root != ROOT:
            self.env["PYTHONPATH"] = str(root)
        self.target = target
        self.root = root
        self.process: subprocess.Popen | None = None

    def launch(self) -> Server:
        """Starts the process and returns at once; ``start`` also waits until ``/readyz`` answers 200."""
        log = open(self.log_path, "w")  # noqa: SIM115 - kept open for the process's lifetime
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", self.target, "--host", "127.0.0.1",
             "--port", str(self.port)],
            cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        return self

    def start(self, timeout: float = 300.0) -> Server:
        self.launch()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bentoml serve exited early:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"bentoml serve not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()[-5000:]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()


# /metrics -----------------------------------------------------------------------------------------


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    """Prometheus text -> ``{(sample name, sorted label pairs): value}``."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def batch_histogram(client: httpx.Client, runner: str, method: str) -> tuple[float, float]:
    """(sum, count) of BentoML's ``bentoml_service_adaptive_batch_size`` histogram for one batcher,
    summed over workers: the sum counts requests, the count counts model calls. ``client``'s base URL
    is the server's."""
    totals = {"sum": 0.0, "count": 0.0}
    for (name, labels), value in parse_metrics(client.get("/metrics").text).items():
        found = dict(labels)
        if found.get("runner_name") != runner or found.get("method_name") != method:
            continue
        for kind in totals:
            if name == f"bentoml_service_adaptive_batch_size_{kind}":
                totals[kind] += value
    return totals["sum"], totals["count"]
