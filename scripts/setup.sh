#!/usr/bin/env bash
# Create .venv and install the project with its test extras, and Debian's redis-server for the
# asynchronous jobs (the app starts it itself); `--tests` also installs Debian's Chromium for the
# playground's browser tests and exiftool for the provenance tests (as root, with apt; elsewhere
# each says what to do).
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

apt_install() {  # $1: package, $2: what needs it
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        # Install only, start no service (the app starts its own redis-server where needed).
        local made_policy=""
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
            chmod +x /usr/sbin/policy-rc.d
            made_policy=1
        fi
        apt-get install -y -qq "$1" >/dev/null 2>&1 \
            || { apt-get update -qq && apt-get install -y -qq "$1" >/dev/null; }
        if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
    else
        echo "setup.sh: $2 needs $1: sudo apt-get install $1" >&2
    fi
}
command -v redis-server >/dev/null 2>&1 || apt_install redis-server "asynchronous jobs"
if [ "${1:-}" = "--tests" ] && ! command -v chromium >/dev/null 2>&1; then
    apt_install chromium "the browser tests"
fi
if [ "${1:-}" = "--tests" ] && ! command -v exiftool >/dev/null 2>&1; then
    apt_install libimage-exiftool-perl "the provenance tests (exiftool reads the marks)"
fi
