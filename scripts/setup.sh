#!/usr/bin/env bash
# Create .venv and install the project with its test extras; `--tests` also installs Debian's
# Chromium for the playground's browser tests (as root, with apt; elsewhere it says what to do).
# torch goes first, pinned, so that no other requirement pulls a multi-GB CUDA build: on our CPU
# machines torch==2.13.0 is a CPU build that lies on disk. On a GPU host pick your own build, e.g.
#   TORCH_SPEC="torch==2.9.1" bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
.venv/bin/python -c "import torch, ray, diffusers; print('torch', torch.__version__, '| ray', ray.__version__, '| diffusers', diffusers.__version__)"

if [ "${1:-}" = "--tests" ] && ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq chromium >/dev/null 2>&1 \
            || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }
    else
        echo "setup.sh: the browser tests need Chromium: sudo apt-get install chromium" >&2
    fi
fi
