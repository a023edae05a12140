#!/usr/bin/env bash
# The main job: set up, then build the fastest CPU engine (checked against PyTorch) from the bundled model, segment the
# whole MNI volume with it (and with PyTorch), and print Dice on the held-out band, parity and
# timings. Outputs go to artifacts/demo/ (summary.json) and artifacts/engines/mni-tissue-tiny/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
