#!/usr/bin/env bash
# The GPU check in one call (bench/gpu_check.py): set up, then measure within about 8 minutes and write
# one report. On a lent GPU machine, from the repository root:
#
#   bash bench/gpu_check.sh --out "$OUT/gpu_check"
#
# Setup is idempotent and light: the machine's torch is used if it imports (a CUDA build is expected
# there); otherwise pip installs the pinned one. --cpu-dry-run runs the same steps at tiny sizes on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
if ! "$PY" -c "import deepspeed, webdataset, omegaconf, fsspec, moto" 2>/dev/null; then
    "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
    "$PY" -m pip install -q -r requirements.txt -r requirements-test.txt
    "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi
exec "$PY" bench/gpu_check.py "$@"
