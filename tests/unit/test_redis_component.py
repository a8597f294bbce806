"""deploy/k8s/components/redis-sessions on top of the CPU overlay: it renders, passes Kubernetes'
strict schemas, and gives rnnserve-forecast a durable shared store that its settings accept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[str, list[dict]]:
    overlay = tmp_path_factory.mktemp("overlay")
    relative = os.path.relpath(K8S, overlay)
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {relative}/overlays/cpu\ncomponents:\n  - {relative}/components/redis-sessions\n")
    kubectl = Path(sys.executable).with_name("kubectl")
    out = subprocess.run([str(kubectl), "kustomize", str(overlay)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout, [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def named(docs: list[dict], kind: str, name: str) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_the_component_renders_and_validates_strictly(rendered, version):
    text, _ = rendered
    result = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, "-"],
                            input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_redis_keeps_every_acknowledged_step_on_a_volume(rendered):
    _, docs = rendered
    redis = named(docs, "StatefulSet", "rnnserve-redis")
    [container] = redis["spec"]["template"]["spec"]["containers"]
    command = " ".join(container["args"])
    for option in ("--appendonly yes", "--appendfsync always", "--dir /data", "--maxmemory-policy noeviction",
                   '--requirepass "$REDIS_PASSWORD"'):
        assert option in command, option
    [claim] = redis["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data" and {"name": "data", "mountPath": "/data"} in container[
        "volumeMounts"]
    assert named(docs, "Service", "rnnserve-redis")["spec"]["clusterIP"] == "None"


def test_the_forecast_deployment_scales_out_on_the_shared_store(rendered):
    _, docs = rendered
    forecast = named(docs, "Deployment", "rnnserve-forecast")
    assert forecast["spec"]["replicas"] == 2
    [container] = forecast["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["RNNSERVE_FORECAST_SESSION_STORE"]["valueFrom"]["secretKeyRef"] == {
        "name": "rnnserve-redis", "key": "url"}
    # What the pod's process reads: its ConfigMap, overridden by env, with the Secret's URL.
    [source] = container["envFrom"]
    config = named(docs, "ConfigMap", source["configMapRef"]["name"])["data"]
    overrides = {k: e["value"] for k, e in env.items() if "value" in e and k.startswith("RNNSERVE_")}
    values = {**config, **overrides,
              "RNNSERVE_FORECAST_SESSION_STORE": "redis://:secret@rnnserve-redis:6379/0"}
    settings = Settings.from_env(values, secrets_dir="/nonexistent").forecast
    assert settings.workers == 2 and settings.session_store.startswith("redis://")
    # The forecast pods may reach Redis, and Redis admits only them.
    policy = named(docs, "NetworkPolicy", "rnnserve-redis")
    [rule] = policy["spec"]["ingress"]
    assert rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "forecast"
