"""Which OpenVINO CPU settings win on this machine: performance hint x threads, fp32 and int8.

Times the demo engine's graphs (built with `--precision auto`, so both the fp32 and the int8
graph exist) on real MNI tiles, batch 2, interleaved rounds, medians; prints a table and writes
artifacts/bench/openvino_settings.json. nnslim's default (`OpenVinoPredictor`) is the winner.

    .venv/bin/python scripts/bench_openvino_settings.py [--engine DIR] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", type=Path, default=ROOT / "artifacts" / "engines" / "mni-tissue-tiny")
    parser.add_argument("--volume", type=Path, default=ROOT / "artifacts/data/mni-tissue/imagesTr/mni_0000.nii.gz")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from nnslim.compiler.stages.parity import parity_crops
    from nnslim.files import write_json_atomic
    from nnslim.compiler.runtime.manifest import load_manifest
    from nnslim.compiler.runtime.backends.openvino_cpu import OpenVinoPredictor, cpu_record

    manifest = load_manifest(args.engine)
    models = (manifest.selection.models if manifest.selection else None) or {"fp32": manifest.runtime_model}
    patch = manifest.io.patch_size
    tiles, _, _ = parity_crops(patch, 1, 2, args.volume, manifest.preprocessing, seed=3)
    threads = [0] + ([os.cpu_count()] if os.cpu_count() else []) + [1]
    settings = [(graph, hint, n) for graph in models for hint in ("LATENCY", "THROUGHPUT") for n in threads]
    predictors = {s: OpenVinoPredictor(args.engine / models[s[0]], precision=s[0], threads=s[2], performance_hint=s[1])
                  for s in settings}
    times: dict[tuple, list[float]] = {s: [] for s in settings}
    for p in predictors.values():
        p(tiles)
    for _ in range(args.repeats):
        for s, predict in predictors.items():
            started = time.perf_counter()
            predict(tiles)
            times[s].append(time.perf_counter() - started)
    rows = [{"graph": g, "hint": h, "threads": n, "seconds_per_batch": statistics.median(times[(g, h, n)])}
            for g, h, n in settings]
    print(f"OpenVINO on {cpu_record().get('name')} ({os.cpu_count()} cores), batch 2 of {patch} tiles, "
          f"median of {args.repeats}")
    print(f"{'graph':6} {'hint':11} {'threads':>7} {'s / batch':>10}")
    for r in rows:
        print(f"{r['graph']:6} {r['hint']:11} {r['threads'] or 'default':>7} {r['seconds_per_batch']:10.3f}")
    out = ROOT / "artifacts" / "bench" / "openvino_settings.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, {"cpu": cpu_record(), "patch": list(patch), "rows": rows})


if __name__ == "__main__":
    main()
