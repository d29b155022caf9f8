#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (issue 11; docs/gpu.md). It has Python 3.12 with
# torch (CUDA) but no diffusers, pydantic, ray or torchao and no network: run
# `bash scripts/gpu-wheels.sh` here first and carry .whl/. Then, on the GPU machine:
#
#   bash scripts/gpu-check.sh                      # source synthetic, 1024x1024, 28 steps, <= 9 min
#   bash scripts/gpu-check.sh --serve              # end to end through Ray Serve (gpu-wheels --with-ray)
#   bash scripts/gpu-check.sh --source tiny --size 128x128 --small-size 64x64 --steps 2   # on a CPU
#
# Other arguments go to `python -m serve_app.bench gpu` (see --help). Results: $RESULTS (default
# results/, or $OUT on the device tool) gpu.json and gpu.md; the table is printed too.
set -euo pipefail
STARTED=$(date +%s)
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
RESULTS=${RESULTS:-${OUT:-results}}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    SITE=$(mktemp -d /tmp/serve-app-site.XXXXXX)
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
        --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PYTHON" -c "import diffusers, pydantic" 2>/dev/null; then
    echo "gpu-check: diffusers/pydantic missing: run 'bash scripts/gpu-wheels.sh' where PyPI is" \
        "reachable and carry $WHEELS/ here" >&2
    exit 2
fi
"$PYTHON" - <<'PY'
import torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"gpu-check: torch {torch.__version__}, {gpu}", flush=True)
PY

if [ "${1:-}" = "--serve" ]; then
    # The HTTP part of `bench report` on the GPU: in-process batches, then the Serve app
    # (source synthetic, a GPU per replica) at each concurrency, batched and unbatched.
    shift
    exec "$PYTHON" -m serve_app.bench report --source synthetic --device cuda \
        --size 1024x1024 --steps 28 --batch-sizes 1,2,4 --max-batch-images 4 \
        --concurrency 1,2,4,8 --seconds 30 --repeat 1 --out "$RESULTS" "$@"
fi
# The device tool's limit is 600 s per command: keep 90 s for what ran before and a step that
# overruns its estimate (an explicit --budget-s later in "$@" wins).
BUDGET=$((510 - ($(date +%s) - STARTED)))
exec "$PYTHON" -m serve_app.bench gpu --budget-s "$BUDGET" --out "$RESULTS/gpu.json" "$@"
