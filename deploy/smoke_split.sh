#!/usr/bin/env bash
# Container smoke test of the split: every Deployment of the CPU overlay played with `podman kube play`
# (entry, translate, caption, forecast sessions: one pod each) on one Podman network where each pod
# answers to its Service's name, as in a cluster. Then:
#   1. every pod ready (time to ready per pod, memory per pod), the image's size;
#   2. each pod resolves the others by Service name; one real request per model through the entry;
#   3. the translate pod stopped (`podman pod stop`): sentiment, forecast and caption still answer 200,
#      the entry's /readyz stays 200, /v1/translate answers 503 model_unavailable with Retry-After
#      (four calls, each timed), and /v1/models shows translate unavailable. The entry's kept-alive
#      connections to the stopped pod get no FIN or RST (`ss` in the entry's pod: still ESTABLISHED
#      after the stop, a request written on one never acknowledged), as from a failed node in a
#      cluster: a call that meets one answers after RNNSERVE_PEER_TIMEOUT_S (3 s; services/
#      bentoml_compat.py dependency_socket), one that connects anew to the pod's address (in the
#      entry's DNS cache for up to 10 s) after RNNSERVE_CONNECT_TIMEOUT_S (3 s), later ones at once
#      (the name no longer resolves);
#   4. the translate pod started again: how long until /v1/translate answers 200 through the entry;
# and a summary. Everything (pods, network, image) is torn down on exit, failed or not.
#
#   make smoke-split      (or: deploy/smoke_split.sh; as root, under `flock -s /tmp/rnnserve-cpu.lock`
#                          on a shared machine: four pods load models at once)
#
# Needs what deploy/podman/build.sh lists (root, podman, netavark + aardvark-dns, debootstrap, kubectl,
# the project). What is adapted for Podman, and why, is in deploy/podman/split_manifests.py: 1 replica,
# the built image, the Service's name as hostname and network alias, a *_URL's Service port replaced by
# the container port it targets (Podman only; Kubernetes keeps http://rnnserve-translate), and each
# pod's port on 127.0.0.1 only. deploy/smoke.sh plays the entry alone in the embedded mode.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
. deploy/podman/build.sh

NETWORK="${SMOKE_NETWORK:-rnnserve-smoke}"
DOWN="translate"  # the model whose pod is stopped and started again
plays="$SMOKE_DIR/split"
teardown() {
    log "teardown"
    local file
    for file in "$plays"/*.yaml; do
        [ -f "$file" ] && podman kube down "$file" >/dev/null 2>&1 || true
    done
    podman network rm -f "$NETWORK" >/dev/null 2>&1 || true
    podman volume prune -f >/dev/null 2>&1 || true  # the pods' emptyDirs (this smoke's own storage)
    podman image prune -f >/dev/null 2>&1 || true   # images left untagged by a rebuild
    [ "${SMOKE_KEEP_IMAGE:-0}" = 1 ] || podman rmi -f "$IMAGE" >/dev/null 2>&1 || true
    if [ "${SMOKE_KEEP_BASE:-1}" = 0 ]; then podman rmi -f "$BASE_IMAGE" >/dev/null 2>&1 || true; fi
}
trap teardown EXIT
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
pod_of() { podman pod ps --format '{{.Name}}' | grep -E "^$1-pod(-[0-9]+)?$" | head -1; }
container_of() { podman ps -a --filter "pod=$1" --format '{{.Names}}' | grep -v -- '-infra$' | head -1; }
dump() {
    podman pod ps; podman ps -a
    local name
    for name in $(podman ps -a --format '{{.Names}}' | grep -v -- '-infra$'); do
        echo "--- $name"; podman logs --tail 30 "$name" 2>&1
    done
}

build_base
build_image

# The manifests Kubernetes gets, adapted for Podman, one play per Deployment (entry last).
kubectl kustomize deploy/k8s/overlays/cpu > "$SMOKE_DIR/rendered.yaml"
rm -rf "$plays"
"$PYTHON" deploy/podman/split_manifests.py split "$SMOKE_DIR/rendered.yaml" "$plays" "$IMAGE" > "$SMOKE_DIR/plays.txt"
podman network rm -f "$NETWORK" >/dev/null 2>&1 || true
podman volume prune -f >/dev/null  # an emptyDir starts empty
podman network create "$NETWORK" >/dev/null  # netavark: DNS (aardvark-dns) on by default
log "network $NETWORK: dns_enabled=$(podman network inspect --format '{{.DNSEnabled}}' "$NETWORK")"

declare -A port started ready_s alias_of
order=()
while read -r deployment alias host_port file; do
    order+=("$deployment"); port[$deployment]=$host_port; alias_of[$deployment]=$alias
    log "podman kube play $deployment as $alias (127.0.0.1:$host_port)"
    started[$deployment]=$(now)
    podman kube play --network "$NETWORK:alias=$alias" "$file" >> "$SMOKE_DIR/play.log" 2>&1 \
        || { cat "$SMOKE_DIR/play.log"; exit 1; }
done < "$SMOKE_DIR/plays.txt"
entry="http://127.0.0.1:${port[rnnserve]}"

# 1. Every pod ready: its own /readyz, polled on the host once a second.
first=$(now)
ready_count=0
while [ "$ready_count" -lt "${#order[@]}" ]; do
    for deployment in "${order[@]}"; do
        [ -z "${ready_s[$deployment]:-}" ] || continue
        if [ "$(curl -s -o /dev/null -m 3 -w '%{http_code}' "http://127.0.0.1:${port[$deployment]}/readyz")" = 200 ]; then
            ready_s[$deployment]=$(since "${started[$deployment]}")
            ready_count=$((ready_count + 1))
            log "$deployment ready ${ready_s[$deployment]} s after its kube play"
        fi
    done
    if awk -v t="$(since "$first")" -v limit="$READY_TIMEOUT_S" 'BEGIN { exit !(t > limit) }'; then
        dump; echo "smoke: not every pod ready after $READY_TIMEOUT_S s" >&2; exit 1
    fi
    sleep 1
done
all_ready_s=$(since "$first")
podman stats --no-stream --format '{{.Name}} {{.MemUsage}}' | grep -v -- '-infra ' > "$SMOKE_DIR/memory.txt" || true

# 2. Names as in a cluster, and one real request per model through the entry.
entry_container=$(container_of "$(pod_of rnnserve)")
log "names seen from $entry_container:"
podman exec "$entry_container" python3 -c 'import socket, sys
print("  hostname", socket.gethostname())
for name in sys.argv[1:]:
    print("  ", name, "->", socket.gethostbyname(name))' "${alias_of[@]}"
log "entry settings: $(podman exec "$entry_container" sh -c 'env | grep -E "^RNNSERVE_[A-Z]+_URL=" | sort | tr "\n" " "')"
log "one request per model through the entry ($entry)"
"$PYTHON" deploy/probe.py check "$entry" || { dump; exit 1; }

# 3. The translate pod stopped: only translate is out.
down_pod=$(pod_of "rnnserve-$DOWN")
stop_started=$(now)
podman pod stop "$down_pod" >/dev/null
stop_s=$(since "$stop_started")
log "podman pod stop $down_pod: stopped in $stop_s s; the entry with $DOWN down:"
"$PYTHON" deploy/probe.py down "$entry" "$DOWN" | tee "$SMOKE_DIR/down.log" || { dump; exit 1; }
down_s=$(sed -n "s/^.* while $DOWN is down: 503 in //p" "$SMOKE_DIR/down.log")

# 4. Started again: how long until the entry answers for it, and until its own /readyz.
start_started=$(now)
podman pod start "$down_pod" >/dev/null
log "podman pod start $down_pod"
"$PYTHON" deploy/probe.py wait-up "$entry" "$DOWN" --timeout "$READY_TIMEOUT_S" || { dump; exit 1; }
recovered_s=$(since "$start_started")
until [ "$(curl -s -o /dev/null -m 3 -w '%{http_code}' "http://127.0.0.1:${port[rnnserve-$DOWN]}/readyz")" = 200 ]; do sleep 0.5; done
own_ready_s=$(since "$start_started")
log "$DOWN answers through the entry $recovered_s s after podman pod start (its own /readyz: 200 at $own_ready_s s)"
"$PYTHON" deploy/probe.py check "$entry" > "$SMOKE_DIR/check-after.log" \
    || { cat "$SMOKE_DIR/check-after.log"; dump; exit 1; }
log "every model answers 200 through the entry again"

echo
echo "SMOKE SPLIT OK: image $IMAGE $(( image_bytes / 1000000 )) MB (built in $build_s s), network $NETWORK"
printf '  %-20s %-20s %-16s %s\n' deployment "name on network" "ready after" memory
for deployment in "${order[@]}"; do
    memory=$(awk -v c="$(container_of "$(pod_of "$deployment")")" '$1 == c { $1 = ""; print }' "$SMOKE_DIR/memory.txt")
    printf '  %-20s %-20s %-16s %s\n' "$deployment" "${alias_of[$deployment]}" "${ready_s[$deployment]} s" "$memory"
done
echo "  all four ready $all_ready_s s after the first kube play (played one after the other, loading at once)"
echo "  $DOWN stopped ($stop_s s): /v1/$DOWN 503 model_unavailable with Retry-After in $down_s; others 200,"
echo "    entry /readyz 200, /v1/models: $DOWN unavailable"
echo "  $DOWN started again: 200 through the entry after $recovered_s s (its /readyz at $own_ready_s s)"
