"""One engine shared by threads: volumes per minute with 1, 2 and 4 concurrent callers.

Each measurement segments the same number of MNI volumes (4) on one `Engine`, from N threads at
once; rounds are interleaved (1, 2, 4, 1, 2, 4, ...) and the medians reported, per backend the
engine can run here (its chosen runtime, and ONNX Runtime fp32 beside it). Labels from every
thread are checked against the single-threaded ones.

    .venv/bin/python scripts/bench_threads.py [--engine DIR] [--rounds 3]

The default engine is the one `build-engine --precision auto` picks for the bundled model (built
once into artifacts/bench/threads/engine). Prints a table and writes artifacts/bench/threads.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "artifacts" / "bench" / "threads"
MODEL = ROOT / "artifacts" / "models" / "mni-tissue-tiny.pt"
VOLUMES_PER_MEASUREMENT = 4
CALLERS = (1, 2, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", type=Path, default=OUT / "engine")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from nnslim.compiler.runtime.backends.openvino_cpu import cpu_record
    from nnslim.compiler.runtime.engine import load_engine
    from nnslim.training.data import write_mni_tissue_raw

    OUT.mkdir(parents=True, exist_ok=True)
    data = write_mni_tissue_raw(OUT / "mni") if not (OUT / "mni" / "imagesTr").is_dir() else OUT / "mni"
    scan = nib.load(data / "imagesTr" / "mni_0000.nii.gz")
    image, spacing = np.asarray(scan.dataobj, dtype=np.float32), scan.header.get_zooms()[:3]
    if not (args.engine / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "nnslim", "build-engine", str(MODEL), "--out", str(args.engine)],
                       check=True)
    with load_engine(args.engine) as chosen:  # what the build chose for this machine
        label = chosen.runtime.label
    setups = {label: {}, "onnxruntime fp32": {"backend": "onnxruntime", "precision": "fp32"}}
    engines = {label: load_engine(args.engine, **kw) for label, kw in setups.items()}
    reference = {label: engine.segment(image, spacing) for label, engine in engines.items()}
    seconds: dict[str, dict[int, list[float]]] = {label: {n: [] for n in CALLERS} for label in engines}
    for round_ in range(args.rounds):
        for label, engine in engines.items():
            for callers in CALLERS:
                start = time.perf_counter()
                with ThreadPoolExecutor(callers) as pool:
                    labels = list(pool.map(lambda _: engine.segment(image, spacing), range(VOLUMES_PER_MEASUREMENT)))
                seconds[label][callers].append(time.perf_counter() - start)
                assert all(np.array_equal(x, reference[label]) for x in labels), f"{label}: labels differ"
                print(f"[{round_ + 1}/{args.rounds}] {label}, {callers} caller(s): {seconds[label][callers][-1]:.2f} s",
                      file=sys.stderr)
    rows = []
    for label in engines:
        base = statistics.median(seconds[label][1])
        for callers in CALLERS:
            median = statistics.median(seconds[label][callers])
            rows.append({"runtime": label, "callers": callers, "seconds": median,
                         "volumes_per_minute": VOLUMES_PER_MEASUREMENT * 60 / median, "vs_one_caller": base / median})
    print(f"\n{'runtime':22}{'callers':>8}{'s / 4 volumes':>15}{'volumes/min':>13}{'vs 1 caller':>13}")
    for row in rows:
        print(f"{row['runtime']:22}{row['callers']:>8}{row['seconds']:>15.2f}{row['volumes_per_minute']:>13.1f}"
              f"{row['vs_one_caller']:>12.2f}x")
    record = {"cpu": cpu_record(), "machine": platform.machine(), "volume_shape": list(image.shape),
              "rounds": args.rounds, "rows": rows}
    (ROOT / "artifacts" / "bench" / "threads.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
