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
# results/, or $OUT on the device tool) gpu.json and gpu.md; the table is printed too. First, on
# a machine with >= 2 GPUs and Ray, one request on 1 vs 2 GPUs: parallel.json (else skipped there).
set -euo pipefail
STARTED=$(date +%s)
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
RESULTS=${RESULTS:-${OUT:-results}}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PIP=("$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --no-deps
    --no-compile --no-cache-dir)

# torchao goes in a folder of its own: diffusers imports it whenever it is installed and catches
# only ImportError, and a torchao built for another torch (0.18 needs torch >= 2.11, CUDA 13 for
# its compiled parts) can fail otherwise. It joins PYTHONPATH only if it imports here.
FP8_SKIP=""
core=() torchao=()
for wheel in "$WHEELS"/*.whl; do
    [ -e "$wheel" ] || continue
    case "$(basename "$wheel")" in
        torchao-*) torchao+=("$wheel") ;;
        *) core+=("$wheel") ;;
    esac
done
if [ ${#core[@]} -gt 0 ]; then
    SITE=$(mktemp -d /tmp/serve-app-site.XXXXXX)
    "${PIP[@]}" --target "$SITE" "${core[@]}"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ ${#torchao[@]} -gt 0 ]; then
    AO_SITE=$(mktemp -d /tmp/serve-app-torchao.XXXXXX)
    "${PIP[@]}" --target "$AO_SITE" "${torchao[@]}"
    if probe=$(PYTHONPATH="$AO_SITE${PYTHONPATH:+:$PYTHONPATH}" timeout 120 "$PYTHON" -c \
        'import torchao' 2>&1); then
        export PYTHONPATH="$AO_SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        [ $? = 124 ] && probe="import torchao took over 120 s"
        ao=$(basename "${torchao[0]}" | cut -d- -f2)
        torch_version=$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null \
            || echo "?")
        FP8_SKIP="torchao $ao does not import with torch $torch_version ($(printf '%s' \
            "$probe" | { grep -v '^\s*$' || true; } | tail -1 | cut -c1-200)); left out, so diffusers loads"
        echo "gpu-check: fp8 rows will be skipped: $FP8_SKIP" >&2
    fi
fi

# Import what the bench needs; on failure say which import failed and what is installed.
if ! "$PYTHON" - "$WHEELS" <<'PY'
import importlib.metadata as metadata
import re
import sys
import traceback

try:
    import diffusers  # noqa: F401
    import pydantic  # noqa: F401
except Exception as exc:  # noqa: BLE001 - any failure, shown as it is
    lines = traceback.format_exc().strip().splitlines()
    print("gpu-check: importing diffusers and pydantic failed:", file=sys.stderr)
    print("\n".join("    " + line for line in lines[-6:]), file=sys.stderr)
    names = ["torch", "transformers", "accelerate", "peft", "huggingface_hub", "diffusers",
             "pydantic", "torchao"]  # fmt: skip
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} missing")
    print(f"gpu-check: found {', '.join(found)} (python {sys.version.split()[0]})", file=sys.stderr)
    missing = [n for n in ("diffusers", "pydantic") if f"{n} missing" in found]
    wheels = sys.argv[1]
    named = re.search(r"'([\w.-]+)' distribution was not found", str(exc))
    lacking = named.group(1) if named else getattr(exc, "name", None)
    if missing:
        advice = (f"{' and '.join(missing)} missing: run 'bash scripts/gpu-wheels.sh' where PyPI "
                  f"is reachable and carry {wheels}/ here")
    elif lacking:
        advice = (f"{lacking} is missing here: add it to CORE in scripts/gpu-wheels.sh (run "
                  f"where PyPI is reachable) and carry {wheels}/ again")
    else:
        advice = ("a package above is not the version the carried wheels need: add a wheel of "
                  f"the version the error names to scripts/gpu-wheels.sh, rerun it, carry {wheels}/")
    print(f"gpu-check: {advice}", file=sys.stderr)
    sys.exit(2)
import torch

gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"gpu-check: torch {torch.__version__}, {gpu}, diffusers {diffusers.__version__}", flush=True)
PY
then
    exit 2
fi

# Sequence parallelism (docs/gpu.md "Sequence-parallel replicas"): one 1024x1024 request on 1 vs
# 2 GPUs, `bench parallel` (source synthetic, 28 steps). It needs several GPUs and Ray (the
# `gpu-wheels.sh --with-ray` set, as --serve does); otherwise it is skipped, saying why. Either
# way $RESULTS/parallel.json says what happened: the bench's results, or a row like gpu.json's
# ({"step": "parallel", "skipped" or "error": why}). Its time comes out of the budget below.
PARALLEL_TIMEOUT_S=${PARALLEL_TIMEOUT_S:-180}
parallel_row() {  # KEY WHY: write parallel.json as a skipped or failed row
    mkdir -p "$RESULTS"
    "$PYTHON" -c 'import json, sys
row = {"step": "parallel", sys.argv[2]: sys.argv[3]}
open(sys.argv[1], "w").write(json.dumps(row, indent=2) + "\n")' "$RESULTS/parallel.json" "$1" "$2"
}
gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null) || gpus=0
if [ "$gpus" -lt 2 ]; then
    why="$gpus GPU$([ "$gpus" = 1 ] || echo s) on this machine; needs >= 2"
    echo "gpu-check: parallel: skipped ($why)"
    parallel_row skipped "$why"
elif ! "$PYTHON" -c 'import ray' >/dev/null 2>&1; then
    why="ray does not import here: carry the wheels of 'bash scripts/gpu-wheels.sh --with-ray'"
    echo "gpu-check: parallel: skipped ($why)"
    parallel_row skipped "$why"
else
    echo "gpu-check: parallel: one 1024x1024 request on 1 vs 2 of $gpus GPUs" \
        "(<= ${PARALLEL_TIMEOUT_S}s)"
    status=0
    timeout --kill-after=20 "$PARALLEL_TIMEOUT_S" "$PYTHON" -m serve_app.bench parallel \
        --source synthetic --device cuda --ranks 2 --size 1024x1024 --steps 28 \
        --out "$RESULTS" || status=$?
    if [ "$status" != 0 ]; then
        why="bench parallel exited $status"
        if [ "$status" = 124 ] || [ "$status" = 137 ]; then
            why="stopped at its limit of ${PARALLEL_TIMEOUT_S}s"
        fi
        echo "gpu-check: parallel: failed ($why); the other steps go on" >&2
        parallel_row error "$why"
    fi
fi

# The device tool's limit is 600 s per command: keep 90 s for what ran before and a step that
# overruns its estimate (an explicit --budget-s later in "$@" wins).
BUDGET=$((510 - ($(date +%s) - STARTED)))
[ "$BUDGET" -lt 60 ] && BUDGET=60  # a slow install still leaves the headline row its chance
if [ "${1:-}" = "--serve" ]; then
    # The HTTP part of `bench report` on the GPU: in-process batches, then the Serve app
    # (source synthetic, a GPU per replica, jobs off) at each concurrency, batched and
    # unbatched; levels that no longer fit the budget are skipped, saying so.
    shift
    exec "$PYTHON" -m serve_app.bench report --source synthetic --device cuda \
        --size 1024x1024 --steps 28 --batch-sizes 1,2,4 --max-batch-images 4 \
        --concurrency 1,2,4,8 --seconds 30 --repeat 1 --budget-s "$BUDGET" --out "$RESULTS" "$@"
fi
exec "$PYTHON" -m serve_app.bench gpu --budget-s "$BUDGET" --out "$RESULTS/gpu.json" \
    ${FP8_SKIP:+--fp8-unavailable "$FP8_SKIP"} "$@"
