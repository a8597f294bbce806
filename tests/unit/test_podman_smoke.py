"""The pure parts of the container smoke tests (deploy/smoke.sh, deploy/smoke_split.sh), without Podman.

- deploy/podman/split_manifests.py: the rendered CPU overlay adapted for `podman kube play`: one play
  per Deployment named as its Service, every model URL of the entry pointing at a pod on the network and
  the port that Service targets, 127.0.0.1 only, and nothing else of what Kubernetes gets changed.
- deploy/podman/target_wheels.py: the wheels the image's interpreter needs, markers evaluated for it.
- deploy/probe.py ``check_down``: the translate-down step's verdict, against a fake entry.
"""

from __future__ import annotations

import copy
import sys
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tests.unit.test_manifests import DEPLOYMENTS, render

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deploy" / "podman"))
sys.path.insert(0, str(ROOT / "deploy"))
import probe  # noqa: E402
import split_manifests  # noqa: E402
import target_wheels  # noqa: E402

IMAGE = "localhost/rnnserve:smoke"
# The container fields a play may change (with replicas and hostname; the rest equals the rendered).
ADAPTED_CONTAINER = {"image", "imagePullPolicy", "ports"}


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(render("cpu")) if doc]


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return {name: 40000 + index for index, name in enumerate(DEPLOYMENTS)}


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def without_adapted(deployment: dict, alias: str = "") -> dict:
    deployment = copy.deepcopy(deployment)
    deployment["spec"].pop("replicas", None)
    deployment["spec"]["template"]["spec"].pop("hostname", None)
    for volume in [*deployment["spec"]["template"]["spec"].get("volumes", []),
                   *[mount for container in deployment["spec"]["template"]["spec"]["containers"]
                     for mount in container.get("volumeMounts", [])]]:
        volume["name"] = volume["name"].removeprefix(f"{alias}-")
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        for key in ADAPTED_CONTAINER - {"ports"}:
            container.pop(key)
        for declared in container.get("ports", []):
            declared.pop("hostPort", None)
            declared.pop("hostIP", None)
    return deployment


def test_every_deployment_is_played_as_its_service_entry_last(rendered, ports):
    original = copy.deepcopy(rendered)
    plays = split_manifests.split_plays(rendered, IMAGE, ports)
    assert rendered == original, "the rendered documents are not changed in place"
    assert [play.deployment for play in plays][-1] == "rnnserve"
    assert sorted(play.deployment for play in plays) == sorted(DEPLOYMENTS)
    services = by_kind(rendered, "Service")
    for play in plays:
        [deployment] = [doc for doc in play.docs if doc["kind"] == "Deployment"]
        spec = deployment["spec"]["template"]["spec"]
        # The one Service that selects these pods gives the name, as the entry's URLs use it.
        assert play.alias in services and play.alias == split_manifests.service_of(deployment, services)[
            "metadata"]["name"]
        assert spec["hostname"] == play.alias
        assert deployment["spec"]["replicas"] == 1
        [container] = spec["containers"]
        assert container["image"] == IMAGE and container["imagePullPolicy"] == "Never"
        [declared] = container["ports"]
        assert declared["hostIP"] == "127.0.0.1" and declared["hostPort"] == ports[play.deployment]
        # Nothing else of what Kubernetes gets is changed: probes, security context, volumes, resources.
        kubernetes = by_kind(rendered, "Deployment")[play.deployment]
        assert without_adapted(deployment, play.alias) == without_adapted(kubernetes)
        # The play carries exactly the ConfigMaps its pod reads.
        maps = {doc["metadata"]["name"] for doc in play.docs if doc["kind"] == "ConfigMap"}
        assert maps == {source["configMapRef"]["name"] for source in container["envFrom"]}
        assert {doc["kind"] for doc in play.docs} == {"ConfigMap", "Deployment"}


def test_each_pod_gets_its_own_empty_dirs(rendered, ports):
    """Podman 4.3 names an emptyDir's volume after it: pods sharing a name would share the directory
    (prometheus_client's multiprocess files of four pods in one place: a corrupt /metrics)."""
    seen: list[str] = []
    for play in split_manifests.split_plays(rendered, IMAGE, ports):
        [deployment] = [doc for doc in play.docs if doc["kind"] == "Deployment"]
        spec = deployment["spec"]["template"]["spec"]
        empty_dirs = [volume["name"] for volume in spec["volumes"] if "emptyDir" in volume]
        assert empty_dirs and all(name.startswith(f"{play.alias}-") for name in empty_dirs)
        mounted = {mount["name"] for container in spec["containers"] for mount in container["volumeMounts"]}
        assert mounted <= {volume["name"] for volume in spec["volumes"]}
        seen += empty_dirs
    assert len(seen) == len(set(seen)), "no two pods share an emptyDir"


def test_entry_urls_reach_the_pods_at_the_port_their_service_targets(rendered, ports):
    plays = {play.deployment: play for play in split_manifests.split_plays(rendered, IMAGE, ports)}
    aliases = {play.alias for play in plays.values()}
    [entry_config] = [doc for doc in plays["rnnserve"].docs if doc["kind"] == "ConfigMap"]
    [kubernetes_config] = [doc for doc in rendered if doc["kind"] == "ConfigMap"
                           and doc["metadata"]["name"] == entry_config["metadata"]["name"]]
    urls = {key: value for key, value in entry_config["data"].items() if key.endswith("_URL")}
    assert set(urls) == {"RNNSERVE_TRANSLATE_URL", "RNNSERVE_CAPTION_URL", "RNNSERVE_FORECAST_URL"}
    for key, url in urls.items():
        parts, original = urlsplit(url), urlsplit(kubernetes_config["data"][key])
        assert parts.hostname in aliases and parts.hostname == original.hostname
        assert original.port is None, "Kubernetes keeps the Service URL (port 80)"
        deployment = by_kind(plays[parts.hostname].docs, "Deployment")[parts.hostname]
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        assert parts.port == container["ports"][0]["containerPort"] == 3000
    # Every other setting is the one Kubernetes gets.
    assert {k: v for k, v in entry_config["data"].items() if k not in urls} == {
        k: v for k, v in kubernetes_config["data"].items() if k not in urls}


def service(name: str, port: int, target: int | str, selector: dict[str, str]) -> dict:
    return {"kind": "Service", "metadata": {"name": name},
            "spec": {"selector": selector, "ports": [{"port": port, "targetPort": target}]}}


def deployment(name: str, labels: dict[str, str], ports: list[dict] | None = None) -> dict:
    container = {"name": "app", "image": "x", "ports": ports if ports is not None else
                 [{"name": "http", "containerPort": 3000}]}
    return {"kind": "Deployment", "metadata": {"name": name},
            "spec": {"template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}}}}


def test_podman_url_maps_the_service_port_and_leaves_other_urls():
    deployments = {"model": deployment("model", {"app": "model"})}
    named = {"model": service("model", 80, "http", {"app": "model"})}
    numeric = {"model": service("model", 8080, 3000, {"app": "model"})}
    assert split_manifests.podman_url("http://model", named, deployments) == "http://model:3000"
    assert split_manifests.podman_url("http://model:80/", named, deployments) == "http://model:3000/"
    assert split_manifests.podman_url("http://model:8080", numeric, deployments) == "http://model:3000"
    # Not a Service of these manifests (Redis, an outside host): unchanged.
    assert split_manifests.podman_url("redis://redis:6379/0", named, deployments) == "redis://redis:6379/0"
    assert split_manifests.podman_url("http://elsewhere", named, deployments) == "http://elsewhere"
    with pytest.raises(ValueError, match="no port 8080"):
        split_manifests.podman_url("http://model:8080", named, deployments)
    unnamed = {"model": deployment("model", {"app": "model"}, [{"containerPort": 3000}])}
    with pytest.raises(ValueError, match="targets port 'http'"):
        split_manifests.podman_url("http://model", named, unnamed)


def test_a_deployment_needs_exactly_one_service_to_name_it():
    pods = deployment("model", {"app": "model", "tier": "x"})
    assert split_manifests.service_of(pods, {"a": service("a", 80, "http", {"app": "model"})})[
        "metadata"]["name"] == "a"
    with pytest.raises(ValueError, match="selected by 0 Services"):
        split_manifests.service_of(pods, {"a": service("a", 80, "http", {"app": "other"})})
    with pytest.raises(ValueError, match="selected by 2 Services"):
        split_manifests.service_of(pods, {"a": service("a", 80, "http", {"app": "model"}),
                                          "b": service("b", 80, "http", {"tier": "x"})})


def test_embedded_play_is_the_entry_without_model_urls(rendered):
    play = split_manifests.embedded_play(rendered, IMAGE, 41000)
    assert (play.deployment, play.alias, play.host_port) == ("rnnserve", "rnnserve", 41000)
    [config] = [doc for doc in play.docs if doc["kind"] == "ConfigMap"]
    [entry] = [doc for doc in play.docs if doc["kind"] == "Deployment"]
    assert config["data"] and not [key for key in config["data"] if key.endswith("_URL")]
    assert entry["metadata"]["name"] == "rnnserve"
    assert entry["spec"]["template"]["spec"]["containers"][0]["ports"][0]["hostIP"] == "127.0.0.1"


def test_free_ports_are_distinct():
    ports = split_manifests._free_ports(list(DEPLOYMENTS))
    assert len(set(ports.values())) == len(DEPLOYMENTS) and set(ports) == set(DEPLOYMENTS)


def wheel(directory: Path, name: str, version: str, requires: list[str]) -> None:
    path = directory / f"{name}-{version}-py3-none-any.whl"
    metadata = "\n".join(["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
                          *(f"Requires-Dist: {line}" for line in requires), "", "A description."])
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}-{version}.dist-info/METADATA", metadata)


def environment(python_full_version: str) -> dict[str, str]:
    from packaging.markers import default_environment

    return {**default_environment(), "python_full_version": python_full_version,
            "python_version": ".".join(python_full_version.split(".")[:2])}


def test_target_wheels_evaluates_markers_for_the_image_interpreter(tmp_path):
    wheel(tmp_path, "rnnserve", "0.1.0", ["redis==8.1.0", "web[standard]>=1"])
    wheel(tmp_path, "redis", "8.1.0", ["async-timeout>=4.0.3; python_full_version < '3.11.3'",
                                       "hiredis>=3.2.0; extra == 'hiredis'"])
    wheel(tmp_path, "web", "1.0", ["h11>=0.8", "uvloop>=0.15; extra == 'standard'",
                                   "watchfiles; extra == 'reload'"])
    wheel(tmp_path, "h11", "0.16.0", [])
    # Debian 12's Python 3.11.2 needs async-timeout; the extra asked for (web[standard]) brings uvloop;
    # extras nobody asks for (redis[hiredis], web[reload]) do not count.
    assert target_wheels.missing_requirements(tmp_path, environment("3.11.2")) == [
        "async-timeout>=4.0.3", "uvloop>=0.15"]
    assert target_wheels.missing_requirements(tmp_path, environment("3.11.7")) == ["uvloop>=0.15"]
    wheel(tmp_path, "uvloop", "0.21.0", [])
    assert target_wheels.missing_requirements(tmp_path, environment("3.11.7")) == []


def test_target_wheels_marker_script_matches_packaging():
    """The script run by the image's python3 (no packaging there) gives packaging's environment."""
    import contextlib
    import io
    import json

    from packaging.markers import default_environment

    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(target_wheels.MARKER_ENVIRONMENT_SCRIPT, {})
    assert json.loads(output.getvalue()) == default_environment()


def test_target_wheels_needs_the_project_wheel(tmp_path):
    wheel(tmp_path, "redis", "8.1.0", [])
    with pytest.raises(SystemExit, match="no rnnserve wheel"):
        target_wheels.missing_requirements(tmp_path, environment("3.11.2"))


def test_context_digest_sees_content_not_zip_timestamps(tmp_path):
    """The smoke build skips the layer cache when the context's content changed, and only then."""
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "model.pt").write_bytes(b"weights")

    def project_wheel(source: bytes, when: tuple[int, ...]) -> None:
        with zipfile.ZipFile(tmp_path / "rnnserve-0.1.0-py3-none-any.whl", "w") as archive:
            archive.writestr(zipfile.ZipInfo("services/api.py", date_time=when), source)

    project_wheel(b"print(1)", (2024, 1, 1, 0, 0, 0))
    first = target_wheels.context_digest(tmp_path)
    project_wheel(b"print(1)", (2025, 6, 1, 12, 0, 0))  # rebuilt from the same sources
    assert target_wheels.context_digest(tmp_path) == first
    project_wheel(b"print(2)", (2025, 6, 1, 12, 0, 0))  # a changed checkout
    changed = target_wheels.context_digest(tmp_path)
    assert changed != first
    (tmp_path / "artifacts" / "model.pt").write_bytes(b"other weights")
    assert target_wheels.context_digest(tmp_path) not in (first, changed)


class FakeEntry:
    """An entry on 127.0.0.1 (http.server in a thread) whose down model answers ``down_answers`` in
    turn (status, error code); every other model 200, /v1/models and /readyz as with one model down."""

    def __init__(self, down: str, down_answers: list[tuple[int, str]]) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        answers = list(down_answers)
        self.down_calls = 0
        entry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._send(200, {"ready": True})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == probe.MODELS_PATH:
                    self._send(200, [{"name": name, "state": "unavailable" if name == down else "ready"}
                                     for name in probe.ENDPOINTS])
                elif self.path == probe.ENDPOINTS[down].route:
                    entry.down_calls += 1
                    status, code = answers.pop(0)
                    self._send(status, {"error": {"code": code, "message": "", "field": None}},
                               {"Retry-After": "1"})
                else:
                    self._send(200, {})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_check_down_passes_when_every_try_is_model_unavailable(capsys):
    entry = FakeEntry("translate", [(503, "model_unavailable")] * 4)
    try:
        probe.check_down(entry.url, "translate", tries=4)
    finally:
        entry.close()
    assert entry.down_calls == 4
    assert "/v1/translate while translate is down: 503 in " in capsys.readouterr().out


def test_check_down_fails_when_a_later_try_times_out():
    """The split smoke's failure: the first call answered 503, a later one only at the entry's
    request deadline (503 ``timeout``, a connection kept alive to the stopped pod). One try alone
    would have passed."""
    entry = FakeEntry("translate", [(503, "model_unavailable"), (503, "timeout"),
                                    (503, "model_unavailable"), (503, "model_unavailable")])
    try:
        with pytest.raises(SystemExit, match=r"answered 503 \(Retry-After '1', code 'timeout'\)"):
            probe.check_down(entry.url, "translate", tries=4)
    finally:
        entry.close()
    assert entry.down_calls == 4
