#!/usr/bin/env bash
# GPU check, for a CUDA machine: serves every model on cuda and on cpu (two `bentoml serve` processes
# on loopback), checks that every model's answer to its example matches between the two within
# tolerance, and prints throughput on each device. A few minutes in all.
#
#   make gpu-check        (or: PYTHON=.venv/bin/python deploy/gpu_check.sh)
#
# The cuda server uses the gpu overlay's batching settings (deploy/k8s/overlays/gpu/config.env) so it
# measures what the cluster would run. Tolerances: RTOL (1e-3), ATOL (1e-4); load: LOAD_SECONDS (20),
# CONCURRENCY (16). Exits non-zero when CUDA is unavailable or any output differs.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
PYTHON="${PYTHON:-$root/.venv/bin/python}"
RTOL="${RTOL:-1e-3}" ATOL="${ATOL:-1e-4}" LOAD_SECONDS="${LOAD_SECONDS:-20}" CONCURRENCY="${CONCURRENCY:-16}"
work="$(mktemp -d /tmp/rnnserve-gpu-check.XXXXXX)"
export BENTOML_HOME="$work/bentoml" BENTOML_DO_NOT_TRACK=true
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

"$PYTHON" -c 'import sys, torch; ok = torch.cuda.is_available(); print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if ok else None); sys.exit(0 if ok else 2)' \
    || { echo "gpu_check: CUDA is not available to torch (a CPU-only wheel or no GPU); nothing checked" >&2; exit 2; }
"$PYTHON" -m training.registry $(ls -d models/artifacts/*/ | sed 's#/$##') > "$work/tags.txt"
echo "models: $(tr '\n' ' ' < "$work/tags.txt")"

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
serve() {  # serve DEVICE PORT [ENV_FILE]
    (
        [ -n "${3:-}" ] && { set -a; . "$3"; set +a; }
        export RNNSERVE_DEVICE="$1"
        exec "$PYTHON" -m bentoml serve services.api:Api --host 127.0.0.1 --port "$2"
    ) > "$work/serve-$1.log" 2>&1 &
    pids+=($!)
}
wait_ready() {  # wait_ready DEVICE PORT
    local started=$SECONDS
    until [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$2/readyz")" = 200 ]; do
        [ $((SECONDS - started)) -lt 600 ] || { tail -40 "$work/serve-$1.log"; echo "$1 server not ready" >&2; exit 1; }
        sleep 1
    done
    echo "$1 server ready in $((SECONDS - started)) s"
}
cpu_port=$(free_port); serve cpu "$cpu_port"
gpu_port=$(free_port); serve cuda "$gpu_port" deploy/k8s/overlays/gpu/config.env
wait_ready cpu "$cpu_port"; wait_ready cuda "$gpu_port"

"$PYTHON" deploy/probe.py check "http://127.0.0.1:$gpu_port"
grep -q "on cuda" "$work/serve-cuda.log" || echo "note: no 'on cuda' line in the cuda server's log; check its warm-up lines"
echo "--- outputs, cpu against cuda (rtol $RTOL, atol $ATOL)"
"$PYTHON" deploy/probe.py compare "http://127.0.0.1:$cpu_port" "http://127.0.0.1:$gpu_port" --rtol "$RTOL" --atol "$ATOL"
echo "--- throughput, ${LOAD_SECONDS} s per model at concurrency $CONCURRENCY"
"$PYTHON" deploy/probe.py load "http://127.0.0.1:$cpu_port" --seconds "$LOAD_SECONDS" --concurrency "$CONCURRENCY" --json "$work/cpu.json"
"$PYTHON" deploy/probe.py load "http://127.0.0.1:$gpu_port" --seconds "$LOAD_SECONDS" --concurrency "$CONCURRENCY" --json "$work/cuda.json"
"$PYTHON" - "$work/cpu.json" "$work/cuda.json" <<'PY'
import json, sys
cpu, cuda = (json.load(open(p)) for p in sys.argv[1:])
print(f"{'model':<12}{'cpu req/s':>12}{'cuda req/s':>12}{'cuda/cpu':>10}")
for name in cpu:
    print(f"{name:<12}{cpu[name]:>12.1f}{cuda[name]:>12.1f}{cuda[name] / max(cpu[name], 1e-9):>10.2f}")
PY
echo "GPU CHECK OK"
