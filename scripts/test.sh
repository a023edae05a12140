#!/usr/bin/env bash
# Set up, then run the CPU test suite (GPU / TensorRT tests skip with a reason on this machine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -rs "$@"
