#!/usr/bin/env bash
# PyTorch's side of the training benchmark: a throwaway virtual environment
# with a pinned torch, then ci/torch-bench.py (same models, step, batches
# and thread count as `fedge-device bench`).
#
#   ci/torch-bench.sh [--seconds S] [--threads N] [--out FILE]
#
# The CPU-only wheel index (download.pytorch.org/whl/cpu) is used when it is
# reachable, else plain PyPI (whose Linux wheel also pulls the CUDA
# libraries: about 5.5 GB in the environment, nothing left in pip's cache;
# torch still runs on the CPU).
# TORCH_VENV keeps the environment somewhere else (default: a temporary
# directory removed on exit); TORCH_VERSION overrides the pin.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
version="${TORCH_VERSION:-2.15.0}"
keep=1
venv="${TORCH_VENV:-}"
if [ -z "$venv" ]; then
    venv="$(mktemp -d)/venv"
    keep=0
fi
cleanup() { if [ "$keep" = 0 ]; then rm -rf "$(dirname "$venv")"; fi; }
trap cleanup EXIT

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import torch; assert torch.__version__.split('+')[0] == '$version'" 2>/dev/null; then
    if curl -fsS -o /dev/null --max-time 10 https://download.pytorch.org/whl/cpu/torch/; then
        echo "installing torch $version from the CPU wheel index" >&2
        "$venv/bin/pip" install -q --no-cache-dir "torch==$version" --index-url https://download.pytorch.org/whl/cpu
    else
        echo "CPU wheel index unreachable: installing torch $version from PyPI" >&2
        "$venv/bin/pip" install -q --no-cache-dir "torch==$version"
    fi
fi
"$venv/bin/python" "$here/torch-bench.py" "$@"
