#!/usr/bin/env bash
# The GPU check: what these machines cannot test, run in one command on a machine with an NVIDIA GPU.
#
# There: a CUDA build of PyTorch, onnx, onnxscript, numpy, scipy and ONNX Runtime's CPU wheel are
# installed; TensorRT, onnxruntime-gpu and the network are not. This script installs nothing from the
# network: the few pure-Python wheels and the MNI T1 it needs beyond that machine's packages come in
# artifacts/gpu-check/ (at most 30 MB), made here by `--prepare`. It then
#   1. runs every GPU-tier test that can run there (`-m "gpu or tensorrt"`: the PyTorch CUDA predictor
#      through the sliding window: device accumulation, fp16 accumulators, the fallbacks when the
#      device is full, a side stream, a whole case; tests that need TensorRT or onnxruntime-gpu skip
#      with their reason),
#   2. builds a CPU engine (ONNX Runtime fp32) from the bundled model and times it on the MNI volume
#      against the CUDA PyTorch path (the same network, device tensors end to end), medians of 3,
#      with their label agreement,
# all within 8 minutes, and writes one JSON report: artifacts/gpu-check/report.json (and
# $OUT/gpu_check.json when $OUT is set, as on the device tool's machine).
#
#   bash scripts/gpu_check.sh --prepare   # here, with the package index: fill artifacts/gpu-check/
#   bash scripts/gpu_check.sh             # there (the device tool: carry artifacts/gpu-check)
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=artifacts/gpu-check
PYTHON="${PYTHON:-python3}"
# pure-Python wheels (any CPython 3.10+) the check needs beyond a CUDA PyTorch image
WHEELS=(nibabel packaging click tqdm onnx-graphsurgeon pytest pluggy iniconfig pygments)

if [ "${1:-}" = "--prepare" ]; then
    rm -rf "$CARRY/wheels" && mkdir -p "$CARRY/wheels" "$CARRY/data"
    .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: -d "$CARRY/wheels" "${WHEELS[@]}" || exit 1
    .venv/bin/python -c "
import shutil
from nnslim.training.data import mni_template_paths
shutil.copy(mni_template_paths()['t1'], '$CARRY/data/mni_t1.nii.gz')"
    size=$(du -sm "$CARRY" | cut -f1)
    echo "[gpu-check] $CARRY: $(ls "$CARRY/wheels" | wc -l) wheels and the MNI T1, ${size} MB"
    [ "$size" -le 30 ] || { echo "[gpu-check] over 30 MB"; exit 1; }
    exit 0
fi

[ -d "$CARRY/wheels" ] && [ -f "$CARRY/data/mni_t1.nii.gz" ] || {
    echo "[gpu-check] $CARRY is missing: run 'bash scripts/gpu_check.sh --prepare' where pip can download, then carry it"
    exit 1; }
SITE=$(mktemp -d /tmp/nnslim-gpu-check.XXXXXX)
"$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --target "$SITE" "$CARRY"/wheels/*.whl || exit 1
# nnslim from this checkout, without installing it (nnslim/__init__.py finds compiler/ and training/ beside it)
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 NNSLIM_CACHE="$SITE/cache"
REPORT="$CARRY/report.json"
started=$(date +%s)

echo "[gpu-check] 1/2 GPU-tier tests"
timeout 300 "$PYTHON" -m pytest -q -rs -p no:cacheprovider -m "gpu or tensorrt" --junitxml "$SITE/tests.xml" tests \
    2>&1 | tail -40
echo "[gpu-check] 2/2 the CUDA PyTorch path against the CPU engine on the MNI volume"
timeout 300 "$PYTHON" - "$SITE" "$REPORT" "$started" <<'PY'
import json, os, statistics, subprocess, sys, time, xml.etree.ElementTree as ET
from pathlib import Path

site, report_path, started = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
report = {"tests": {}, "timing": {}, "errors": []}
try:
    suite = ET.parse(site / "tests.xml").getroot()
    cases = suite.iter("testcase")
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        skipped = case.find("skipped")
        failed = case.find("failure") if case.find("failure") is not None else case.find("error")
        report["tests"][name] = ("failed: " + (failed.get("message") or "")[:300] if failed is not None else
                                 "skipped: " + (skipped.get("message") or "")[:200] if skipped is not None else "passed")
except (OSError, ET.ParseError) as exc:
    report["errors"].append(f"no test report: {exc}")
try:
    import numpy as np
    import torch
    import nnslim
    from nnslim.compiler.runtime.backends.torch_module import TorchPredictor
    from nnslim.compiler.runtime.segmentation import InferenceOptions, prepare_volume, segment_prepared
    from nnslim.compiler.runtime.volumes.volume import load_volume
    from nnslim.compiler.stages.source import load_source

    report["device"] = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                        "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_cores": os.cpu_count()}
    model, engine_dir = Path("artifacts/models/mni-tissue-tiny.pt"), site / "engine"
    built = subprocess.run([sys.executable, "-m", "nnslim", "build-engine", model, "--out", engine_dir, "--precision",
                            "fp32", "--parity-tiles", "1", "--no-pass-parity"], capture_output=True, text=True)
    if built.returncode != 0:
        raise RuntimeError(f"build-engine failed: {built.stderr[-1500:]}")
    engine = nnslim.load_engine(engine_dir)
    prepared = prepare_volume(load_volume(Path("artifacts/gpu-check/data/mni_t1.nii.gz"), 1), engine.spec)
    runners = {"cpu engine (" + engine.runtime.label + ")": engine.predictor}
    if torch.cuda.is_available():
        runners["pytorch cuda fp32"] = TorchPredictor(load_source(model).model, "cuda")
    options = InferenceOptions(progress=False)
    times, labels = {k: [] for k in runners}, {}
    for name, predictor in runners.items():  # warm-up (CUDA kernels, the engine's first call)
        labels[name] = segment_prepared(prepared, "mni", predictor, engine.spec, options).labels
    for _ in range(3):
        for name, predictor in runners.items():
            if "cuda" in name:
                torch.cuda.synchronize()
            t = time.perf_counter()
            segment_prepared(prepared, "mni", predictor, engine.spec, options)
            times[name].append(time.perf_counter() - t)
    report["timing"] = {name: {"median_s": statistics.median(v), "runs_s": v} for name, v in times.items()}
    first, *rest = labels
    report["label_agreement_with_cpu_engine"] = {k: float((labels[k] == labels[first]).mean()) for k in rest}
except Exception as exc:  # the report says what broke; the check itself must not hide it
    report["errors"].append(f"{type(exc).__name__}: {exc}")
report["seconds"] = round(time.time() - started, 1)
counts = {}
for verdict in report["tests"].values():
    counts[verdict.split(":")[0]] = counts.get(verdict.split(":")[0], 0) + 1
report["test_counts"] = counts
text = json.dumps(report, indent=2) + "\n"
report_path.write_text(text)
if os.environ.get("OUT"):
    Path(os.environ["OUT"], "gpu_check.json").write_text(text)
print(json.dumps({k: report[k] for k in ("device", "test_counts", "timing", "label_agreement_with_cpu_engine",
                                          "errors", "seconds") if k in report}, indent=2))
PY
echo "[gpu-check] report: $REPORT ($(( $(date +%s) - started )) s)"
