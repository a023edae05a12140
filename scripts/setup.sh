#!/usr/bin/env bash
# Create .venv if missing and install nnslim (editable) with its development extras. Idempotent: a
# second run compares a stamp and returns in well under a second.
#
# The editable install is setuptools' "strict" mode: a tree of links to the sources under
# build/__editable__.*, on sys.path through a plain .pth entry. The default (lenient) mode maps
# `nnslim.compiler` -> compiler/ with an import hook, which mypy, pyright and Pylance cannot follow;
# a link tree they can. A link tree lists files, so the stamp also covers the list of source files:
# adding or removing a module re-links (a few seconds, no dependencies reinstalled).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi

link_stamp=.venv/.nnslim-link-stamp
link_want="$(find nnslim compiler training -name '*.py' -not -path '*/__pycache__/*' | LC_ALL=C sort | sha256sum | cut -d' ' -f1)"
deps_stamp=.venv/.nnslim-install-stamp
deps_want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$deps_stamp" ] || [ "$(cat "$deps_stamp")" != "$deps_want" ]; then
    echo "[setup] installing nnslim and its dependencies (torch==2.13.0 CPU build, onnx, onnxruntime-gpu, openvino, ...)"
    .venv/bin/python -m pip install --quiet --upgrade pip
    # torch first, pinned: 2.13.0 is a CPU build on local disk here; the project's range would let pip
    # pick a newer CUDA build of several GB
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
    .venv/bin/python -m pip install --quiet -e ".[dev,demo,plots]" --config-settings editable_mode=strict
    # `nnslim serve`'s tritonserver (the serve extra) without its numpy<2 pin: the development set keeps numpy 2
    .venv/bin/python -m pip install --quiet --no-deps "nvidia-pytriton==0.7.0"
    echo "$deps_want" > "$deps_stamp"
    echo "$link_want" > "$link_stamp"
fi
if [ ! -f "$link_stamp" ] || [ "$(cat "$link_stamp")" != "$link_want" ]; then
    echo "[setup] linking the sources (editable_mode=strict)"
    rm -rf build/__editable__.nnslim-*
    .venv/bin/python -m pip install --quiet --no-deps -e . --config-settings editable_mode=strict
    echo "$link_want" > "$link_stamp"
fi
