#!/usr/bin/env bash
# Assembles the build context for deploy/Dockerfile in DIR, using the network on the host only:
#   DIR/wheelhouse/  every wheel the image installs (the project itself included), via `pip wheel`
#   DIR/artifacts/   a copy of the trained artifacts (model.pt + metadata.json per model)
# Usage: deploy/context.sh DIR   (PYTHON, ARTIFACTS_DIR, TORCH_WHEEL, TORCH_VARIANT may be set)
#
# torch: TORCH_VARIANT=cpu (default) or cuda, checked here on the wheel and again by the image build.
# PyPI's linux wheel of torch 2.13.0 is the CUDA build (with its nvidia-* wheels, GBs). For the CPU
# image put the CPU wheel in the wheelhouse first (TORCH_WHEEL=path/to/torch-2.13.0+cpu-...whl, or have
# it on pip's --find-links as this machine does): its local version "+cpu" sorts above "2.13.0", so pip
# takes it. TORCH_VARIANT=cuda (the GPU image, overlays/gpu) removes any +cpu wheel from DIR and ignores
# pip's configuration (a find-links there would bring the CPU wheel back), so pip resolves the CUDA build.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:?usage: deploy/context.sh DIR}"
python="${PYTHON:-python3.11}"
artifacts="${ARTIFACTS_DIR:-$root/models/artifacts}"

variant="${TORCH_VARIANT:-cpu}"
case "$variant" in cpu|cuda) ;; *) echo "TORCH_VARIANT must be cpu or cuda, not $variant" >&2; exit 2;; esac
mkdir -p "$out/wheelhouse"
[ -z "${TORCH_WHEEL:-}" ] || cp "$TORCH_WHEEL" "$out/wheelhouse/"
if [ "$variant" = cuda ]; then
    rm -f "$out"/wheelhouse/torch-*+cpu-*.whl
    export PIP_CONFIG_FILE=/dev/null
fi
rm -f "$out"/wheelhouse/rnnserve-*.whl  # the project itself is always rebuilt from this checkout
rm -rf "$out/artifacts" && mkdir -p "$out/artifacts"
# The image runs CPython 3.11 on glibc (Debian 12); the host interpreter must match that ABI.
"$python" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version'
# Wheels already in the wheelhouse are reused, so a second run needs no network at all. The
# constraints pin what services/bentoml_compat.py relies on, as `make setup` does.
"$python" -m pip wheel --quiet --wheel-dir "$out/wheelhouse" --find-links "$out/wheelhouse" \
    -c "$root/constraints.txt" "$root"
torch_wheel="$(ls "$out"/wheelhouse/torch-*.whl 2>/dev/null | head -1)"
case "$torch_wheel" in
    *+cpu-*) wheel_variant=cpu ;;
    */torch-*) wheel_variant=cuda ;;  # PyPI's linux build; the image build checks torch.version.cuda
    *) wheel_variant=none ;;
esac
[ "$wheel_variant" = "$variant" ] \
    || { echo "context: TORCH_VARIANT=$variant but the wheelhouse has ${torch_wheel:-no torch wheel}" >&2; exit 1; }
found=0
for dir in "$artifacts"/*/; do
    [ -f "$dir/model.pt" ] || continue
    name="$(basename "$dir")"
    mkdir -p "$out/artifacts/$name"
    cp "$dir/model.pt" "$dir/metadata.json" "$out/artifacts/$name/"
    found=$((found + 1))
done
[ "$found" -gt 0 ] || { echo "no artifact with a model.pt under $artifacts" >&2; exit 1; }
echo "context $out ($variant torch: $(basename "$torch_wheel")): $(ls "$out/wheelhouse" | wc -l) wheels ($(du -sh "$out/wheelhouse" | cut -f1)), $found artifacts"
