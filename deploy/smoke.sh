#!/usr/bin/env bash
# Container smoke test: build the image with Podman (no network during the build), run the Deployment
# from the Kubernetes manifests with `podman kube play` (1 replica, its ConfigMap, probes, read-only
# root filesystem and emptyDir volumes), check /readyz, /metrics and one real request per served
# model on 127.0.0.1, report image size and time to ready, and tear everything down.
#
#   make smoke            (or: deploy/smoke.sh)
#
# Needs what deploy/podman/build.sh lists (root, podman, netavark, debootstrap, kubectl, the project).
# deploy/smoke_split.sh plays every Deployment (one pod per model) and stops translate on the way.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
. deploy/podman/build.sh

manifest="$SMOKE_DIR/embedded/rnnserve.yaml"
teardown() {
    log "teardown"
    [ -f "$manifest" ] && podman kube down "$manifest" >/dev/null 2>&1 || true
    podman volume prune -f >/dev/null 2>&1 || true  # the pod's emptyDirs (this smoke's own storage)
    podman image prune -f >/dev/null 2>&1 || true   # images left untagged by a rebuild
    [ "${SMOKE_KEEP_IMAGE:-0}" = 1 ] || podman rmi -f "$IMAGE" >/dev/null 2>&1 || true
    if [ "${SMOKE_KEEP_BASE:-1}" = 0 ]; then podman rmi -f "$BASE_IMAGE" >/dev/null 2>&1 || true; fi
}
trap teardown EXIT

build_base
build_image

# The entry Deployment and its ConfigMap from the CPU overlay, 1 replica, on 127.0.0.1 only, without
# the model-service URLs: the entry then runs every model in its own process tree (the embedded mode).
# deploy/smoke_split.sh plays the split (deploy/podman/split_manifests.py says what is adapted).
kubectl kustomize deploy/k8s/overlays/cpu > "$SMOKE_DIR/rendered.yaml"
read -r _ _ port manifest < <("$PYTHON" deploy/podman/split_manifests.py embedded "$SMOKE_DIR/rendered.yaml" \
    "$SMOKE_DIR/embedded" "$IMAGE")
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

# Readiness, metrics and one real request per model (deploy/probe.py ENDPOINTS).
"$PYTHON" deploy/probe.py check "http://127.0.0.1:$port"
container="$(podman ps --format '{{.Names}}' | grep -v infra | grep rnnserve | head -1)"
log "container $container: user $(podman exec "$container" id -u), root fs read-only: $(podman exec "$container" sh -c 'touch /opt/probe 2>/dev/null && echo no || echo yes')"
log "health check: $(podman healthcheck run "$container" >/dev/null 2>&1 && echo healthy || echo 'not run (podman kube play ignores HEALTHCHECK; the probes apply)')"
echo "SMOKE OK: image $IMAGE $(( image_bytes / 1000000 )) MB, ready in $ready_s s after kube play"
