#!/usr/bin/env bash
# Run HERE (where PyPI is reachable) before scripts/gpu-check.sh on a lent GPU machine, which has
# Python 3.12 with torch, transformers, accelerate, safetensors, sentencepiece, peft and pillow but
# no network: download the wheels it lacks into .whl/ (ignored by git; it travels with `carry`).
#
#   bash scripts/gpu-wheels.sh              # core check: diffusers, pydantic, torchao (~13 MB)
#   bash scripts/gpu-wheels.sh --with-ray   # + a trimmed ray[serve] for the end-to-end mode
#
# Versions are this project's own (.venv) where installed. PY_VERSION=3.11 makes a set for this
# machine's Python, to rehearse the offline install in a bare venv (docs/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
PY_VERSION=${PY_VERSION:-3.12}
WITH_RAY=0
[ "${1:-}" = "--with-ray" ] && WITH_RAY=1

version() {  # the version installed in .venv, or nothing (pip then takes the newest)
    [ -x .venv/bin/python ] && .venv/bin/python - "$1" <<'PY' 2>/dev/null || true
import importlib.metadata, sys
print("==" + importlib.metadata.version(sys.argv[1]))
PY
}

CORE="diffusers pydantic pydantic-core annotated-types typing-inspection typing-extensions"
# torchao 0.18 is the release built for the lent machine's torch 2.11 (it needs torch >= 2.11 and
# CUDA 13 for its compiled parts); gpu-check.sh installs it in a folder of its own and uses it
# only if it imports there, else the fp8 rows are skipped saying why.
PINNED="torchao==0.18.0"
# What `ray.serve` and the app import beyond the GPU machine's packages (its list: the device
# tool's KINDS.md); ray itself is trimmed below. redis: the ingress's job routes import it even
# with jobs off (the bench's app turns them off, so Celery and Ray's task consumer stay out).
SERVE="starlette fastapi uvicorn aiohttp-cors colorful opencensus opencensus-context
    google-api-core googleapis-common-protos proto-plus smart-open watchfiles jsonschema
    jsonschema-specifications referencing rpds-py platformdirs
    mmh3 opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-exporter-prometheus
    opentelemetry-semantic-conventions importlib-metadata grpcio-reflection pydantic-settings
    python-multipart redis"

specs=()
for name in $CORE; do specs+=("$name$(version "$name")"); done
specs+=($PINNED)
if [ "$WITH_RAY" = 1 ]; then
    for name in $SERVE; do specs+=("$name$(version "$name")"); done
fi

rm -rf "$WHEELS" && mkdir -p "$WHEELS"
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$WHEELS" "${specs[@]}"

if [ "$WITH_RAY" = 1 ]; then
    full=$(mktemp -d)
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version "$PY_VERSION" --implementation cp --platform manylinux2014_x86_64 \
        -d "$full" "ray$(version ray)"
    python3 scripts/trim-ray-wheel.py "$full"/ray-*.whl "$WHEELS"
    rm -rf "$full"
fi
du -ch "$WHEELS"/*.whl | tail -1
