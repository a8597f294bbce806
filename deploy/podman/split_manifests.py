"""The rendered Kubernetes manifests, adapted for `podman kube play` (deploy/smoke.sh, deploy/smoke_split.sh).

Podman 4.3 plays Deployments and ConfigMaps and ignores Services, HPAs and PDBs, so what a Service
gives a pod in Kubernetes is rebuilt here, and nothing else changes (probes, security context,
read-only root filesystem, emptyDir volumes and resources are played as rendered):

- **One play per Deployment** (its Deployment and the ConfigMaps it reads), 1 replica, the image built
  by the smoke test, ``imagePullPolicy: Never``.
- **The Service's name**: the pod's hostname, and the network alias the play is given
  (``podman kube play --network NET:alias=NAME``), so that ``http://rnnserve-translate`` resolves to
  the translate pod as the Service name does in a cluster.
- **The Service's port**: a Service maps port 80 to the container's port 3000; a pod reached directly
  on the network has no such mapping. Only for Podman, a ``*_URL`` setting whose host is a Service
  gets the container port that Service targets (``http://rnnserve-translate`` ->
  ``http://rnnserve-translate:3000``). Kubernetes keeps the Service URLs.
- **emptyDir per pod**: Podman 4.3 makes each ``emptyDir`` a named volume called by the volume's name,
  so pods that use the same name share it (every Deployment here mounts ``tmp``, ``bentoml-tmp`` and
  ``prometheus-multiproc``). Four pods then write prometheus_client's multiprocess files, named by
  PIDs that are alike in every container, into one directory, and the entry's /metrics answers 500
  on a corrupt file. Each pod's emptyDirs are renamed ``<Service>-<volume>``, private as in a cluster.
  (``medium: Memory`` becomes a directory on disk under Podman; the size limits are not enforced.)
- **Published on 127.0.0.1 only**: Podman 4.3 publishes every ``containerPort`` on the host, on every
  interface and on the same port number, when no ``hostPort`` is set (four pods on 3000 collide). Each
  pod's port is published on 127.0.0.1 at a port of its own, so the host can time each pod's /readyz.

    python deploy/podman/split_manifests.py split RENDERED.yaml OUTDIR IMAGE     # every Deployment
    python deploy/podman/split_manifests.py embedded RENDERED.yaml OUTDIR IMAGE  # the entry alone

Each prints one line per play: ``DEPLOYMENT ALIAS HOST_PORT FILE``, the entry last.
"""

from __future__ import annotations

import copy
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

ENTRY = "rnnserve"  # the entry Deployment and Service (deploy/k8s/base/entry.yaml)
DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Play:
    deployment: str
    alias: str  # the name of the Service that selects this Deployment's pods
    host_port: int
    docs: list[dict[str, Any]]  # the Deployment's ConfigMaps, then the Deployment


def _by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc and doc.get("kind") == kind}


def _selects(service: dict[str, Any], deployment: dict[str, Any]) -> bool:
    selector = service["spec"].get("selector") or {}
    labels = deployment["spec"]["template"]["metadata"].get("labels") or {}
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def service_of(deployment: dict[str, Any], services: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The one Service whose selector matches the Deployment's pod labels."""
    matches = [service for service in services.values() if _selects(service, deployment)]
    if len(matches) != 1:
        names = [service["metadata"]["name"] for service in matches]
        raise ValueError(f"Deployment {deployment['metadata']['name']} is selected by {len(matches)} "
                         f"Services ({names}); the smoke test needs exactly one to name its pod")
    return matches[0]


def container_port(service: dict[str, Any], port: int, deployment: dict[str, Any]) -> int:
    """The container port that ``service``'s ``port`` reaches in ``deployment``'s pods."""
    entries = [entry for entry in service["spec"]["ports"] if entry["port"] == port]
    if not entries:
        raise ValueError(f"Service {service['metadata']['name']} has no port {port}")
    target = entries[0].get("targetPort", port)
    if isinstance(target, int):
        return target
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        for declared in container.get("ports", []):
            if declared.get("name") == target:
                return declared["containerPort"]
    raise ValueError(f"Service {service['metadata']['name']} targets port {target!r}, which no container "
                     f"of Deployment {deployment['metadata']['name']} declares")


def podman_url(url: str, services: dict[str, dict[str, Any]], deployments: dict[str, dict[str, Any]]) -> str:
    """``url`` as a pod reaches it on a Podman network: a Service's port replaced by the container port
    it targets; any other URL unchanged."""
    parts = urlsplit(url)
    service = services.get(parts.hostname or "")
    if service is None:
        return url
    selected = [deployment for deployment in deployments.values() if _selects(service, deployment)]
    if len(selected) != 1:
        raise ValueError(f"Service {parts.hostname} selects {len(selected)} Deployments")
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    target = container_port(service, port, selected[0])
    return urlunsplit(parts._replace(netloc=f"{parts.hostname}:{target}"))


def _config_maps_read(deployment: dict[str, Any]) -> list[str]:
    names = []
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        names += [source["configMapRef"]["name"] for source in container.get("envFrom", [])
                  if "configMapRef" in source]
        names += [variable["valueFrom"]["configMapKeyRef"]["name"] for variable in container.get("env", [])
                  if "configMapKeyRef" in variable.get("valueFrom", {})]
    return list(dict.fromkeys(names))


def _pod(deployment: dict[str, Any], alias: str, image: str, host_port: int) -> dict[str, Any]:
    deployment = copy.deepcopy(deployment)
    deployment["spec"]["replicas"] = 1
    pod = deployment["spec"]["template"]["spec"]
    pod["hostname"] = alias
    renamed = {volume["name"]: f"{alias}-{volume['name']}" for volume in pod.get("volumes", [])
               if "emptyDir" in volume}
    for volume in pod.get("volumes", []):
        volume["name"] = renamed.get(volume["name"], volume["name"])
    for container in pod["containers"]:
        for mount in container.get("volumeMounts", []):
            mount["name"] = renamed.get(mount["name"], mount["name"])
    for index, container in enumerate(pod["containers"]):
        container["image"] = image
        container["imagePullPolicy"] = "Never"
        for number, declared in enumerate(container.get("ports", [])):
            if index or number:
                raise ValueError(f"Deployment {deployment['metadata']['name']}: one container with one "
                                 "port is what the smoke test publishes")
            declared.update(hostPort=host_port, hostIP="127.0.0.1")
    return deployment


def split_plays(docs: list[dict[str, Any]], image: str, host_ports: dict[str, int]) -> list[Play]:
    """Every Deployment as a play of its own, named and reached as its Service; the entry last."""
    deployments = _by_kind(docs, "Deployment")
    services = _by_kind(docs, "Service")
    config_maps = _by_kind(docs, "ConfigMap")
    plays = []
    for name in sorted(deployments, key=lambda name: (name == ENTRY, name)):
        deployment = deployments[name]
        alias = service_of(deployment, services)["metadata"]["name"]
        maps = []
        for map_name in _config_maps_read(deployment):
            config_map = copy.deepcopy(config_maps[map_name])
            for key, value in (config_map.get("data") or {}).items():
                if key.endswith("_URL") and value:
                    config_map["data"][key] = podman_url(value, services, deployments)
            maps.append(config_map)
        pod = _pod(deployment, alias, image, host_ports[name])
        plays.append(Play(name, alias, host_ports[name], [*maps, pod]))
    return plays


def embedded_play(docs: list[dict[str, Any]], image: str, host_port: int) -> Play:
    """The entry alone, without the model-service URLs: it then runs every model in its own process
    tree (the embedded mode, `make serve`)."""
    deployments = _by_kind(docs, "Deployment")
    config_maps = _by_kind(docs, "ConfigMap")
    entry = deployments[ENTRY]
    maps = []
    for map_name in _config_maps_read(entry):
        config_map = copy.deepcopy(config_maps[map_name])
        config_map["data"] = {key: value for key, value in (config_map.get("data") or {}).items()
                              if not key.endswith("_URL")}
        maps.append(config_map)
    return Play(ENTRY, ENTRY, host_port, [*maps, _pod(entry, ENTRY, image, host_port)])


def _free_ports(names: list[str]) -> dict[str, int]:
    """A free port on 127.0.0.1 for each name, all different (every socket is held until all are)."""
    probes = [socket.socket() for _ in names]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return {name: probe.getsockname()[1] for name, probe in zip(names, probes, strict=True)}
    finally:
        for probe in probes:
            probe.close()


def main(argv: list[str]) -> int:
    mode, rendered, out, image = argv
    docs = [doc for doc in yaml.safe_load_all(Path(rendered).read_text()) if doc]
    names = sorted(_by_kind(docs, "Deployment")) if mode == "split" else [ENTRY]
    ports = _free_ports(names)
    plays = split_plays(docs, image, ports) if mode == "split" else [embedded_play(docs, image, ports[ENTRY])]
    Path(out).mkdir(parents=True, exist_ok=True)
    for play in plays:
        path = Path(out) / f"{play.deployment}.yaml"
        path.write_text(yaml.safe_dump_all(play.docs, sort_keys=False))
        print(play.deployment, play.alias, play.host_port, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
