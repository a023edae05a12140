#!/usr/bin/env bash
# Create .venv if missing and install nnslim (editable) with its test extra. Idempotent: a second
# run only compares a stamp of pyproject.toml and returns in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.nnslim-install-stamp
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing nnslim and its dependencies (torch==2.13.0 CPU build, onnx, onnxruntime-gpu, openvino, ...)"
    .venv/bin/python -m pip install --quiet --upgrade pip
    # torch first, pinned: 2.13.0 is a CPU build on local disk here; the project's range would let pip
    # pick a newer CUDA build of several GB
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
    .venv/bin/python -m pip install --quiet -e ".[dev,demo,plots]"
    echo "$want" > "$stamp"
fi
