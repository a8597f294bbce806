"""A real Prometheus server scrapes the running service, evaluates the project's rules, and answers
queries for BentoML's request counter and adaptive batch-size histogram.

Prometheus is Debian's ``prometheus`` package (.ci/run installs it); it listens on a free loopback port
with its data in a temporary directory and is stopped at the end. The test also checks, against what
is really scraped, that every metric name the rules and the dashboard use exists, and that the paths
the Kubernetes probes and ServiceMonitor use answer 200.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import Server, free_port

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rnnserve.rules.yml"
JOB = "rnnserve"  # the job label the ServiceMonitor gives (jobLabel: app.kubernetes.io/name)
SCRAPE_INTERVAL_S = 1

sys.path.insert(0, str(ROOT / "deploy"))
import probe  # noqa: E402

from tests.unit.test_manifests import referenced_metric_names  # noqa: E402


class Prometheus:
    def __init__(self, binary: str, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        config = {
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": JOB, "metrics_path": probe.METRICS_PATH,
                                "static_configs": [{"targets": [target]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self.process = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1h", "--web.enable-lifecycle"],
            stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
        )

    def api(self, path: str, **params: str) -> dict:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        response.raise_for_status()
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def wait_for(self, expr: str, predicate, timeout: float = 90.0) -> list[dict]:
        """Polls a query until ``predicate(result)`` holds; fails with Prometheus' log otherwise."""
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                result = self.query(expr)
                if predicate(result):
                    return result
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        pytest.fail(f"{expr} never satisfied the check; last result {result}\n"
                    f"{self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def prometheus(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed: apt-get install -y prometheus (.ci/run does this)")
    instance = Prometheus(binary, tmp_path_factory.mktemp("prometheus"), f"127.0.0.1:{server.port}")
    yield instance
    instance.stop()


def value(sample: dict) -> float:
    return float(sample["value"][1])


def send_traffic(client: httpx.Client, count: int = 24) -> None:
    """Concurrent sentiment requests, so the batcher has something to merge, plus one bad request."""
    endpoint = probe.ENDPOINTS["sentiment"]

    def one(_: int) -> int:
        return client.post(endpoint.route, json=endpoint.example()).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, range(count)))
    assert statuses == [200] * count
    assert client.post(endpoint.route, json={"texts": []}).status_code == 400


def test_prometheus_scrapes_requests_and_batch_sizes(prometheus: Prometheus, client: httpx.Client):
    prometheus.wait_for(f'up{{job="{JOB}"}}', lambda r: r and value(r[0]) == 1)
    sentiment = f'job="{JOB}", endpoint="/v1/sentiment"'
    before = prometheus.query(f'sum(bentoml_service_request_total{{{sentiment}, http_response_code="200"}})')
    already = value(before[0]) if before else 0.0
    send_traffic(client)

    requests = prometheus.wait_for(
        f'sum(bentoml_service_request_total{{job="{JOB}", service_name="rnnserve", '
        f'endpoint="/v1/sentiment", http_response_code="200"}})',
        lambda r: r and value(r[0]) >= already + 24)
    assert value(requests[0]) >= already + 24
    rejected = prometheus.wait_for(
        f'sum(bentoml_service_request_total{{{sentiment}, http_response_code="400"}})',
        lambda r: r and value(r[0]) >= 1)
    assert value(rejected[0]) >= 1

    batches = prometheus.wait_for(
        f'sum by (runner_name, service_name) '
        f'(bentoml_service_adaptive_batch_size_count{{job="{JOB}", method_name="classify"}})',
        lambda r: r and value(r[0]) >= 1)
    # The entry worker (service rnnserve) batches the sentiment model itself (services/inprocess.py).
    assert batches[0]["metric"]["runner_name"] == "sentiment"
    assert batches[0]["metric"]["service_name"] == "rnnserve"
    # Requests merged into batches: the histogram's sum counts requests, its count counts batches.
    items = prometheus.query(
        f'sum(bentoml_service_adaptive_batch_size_sum{{job="{JOB}", method_name="classify"}})')
    assert 1 <= value(batches[0]) <= value(items[0])
    buckets = prometheus.query(
        f'bentoml_service_adaptive_batch_size_bucket{{job="{JOB}", method_name="classify", le="+Inf"}}')
    assert buckets and sum(value(b) for b in buckets) == value(batches[0])


def test_rules_load_and_evaluate_on_real_series(prometheus: Prometheus, client: httpx.Client):
    send_traffic(client, count=8)
    groups = prometheus.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    expected = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    assert len(rules) == len(expected)
    assert all(rule["health"] in ("ok", "unknown") for rule in rules), rules
    # A recording rule computed from the scraped counter: /v1/sentiment answered without 5xx.
    ratio = prometheus.wait_for('rnnserve:request_errors:ratio_rate5m{endpoint="/v1/sentiment"}',
                                lambda r: bool(r))
    assert value(ratio[0]) == 0.0
    firing = [a for a in prometheus.api("alerts")["alerts"] if a["state"] == "firing"]
    assert firing == []


def test_metric_names_in_rules_and_dashboard_are_really_served(prometheus: Prometheus, client: httpx.Client):
    send_traffic(client, count=4)
    prometheus.wait_for(f'rnnserve_model_inference_seconds_count{{job="{JOB}"}}', lambda r: bool(r))
    served = set(prometheus.api("label/__name__/values"))
    missing = sorted(name for name in referenced_metric_names()
                     if not ({name, name + "_bucket", name + "_total", name + "_count"} & served))
    assert not missing, f"used by the rules or dashboard but never scraped: {missing}"


def test_probe_and_scrape_paths_answer(client: httpx.Client):
    for path in (probe.LIVENESS_PATH, probe.READINESS_PATH, probe.METRICS_PATH):
        assert client.get(path).status_code == 200, path
