"""`nnslim infer` on a folder of 6 cases: the local path against `--ray` with 1 and 2 actors.

Each run is the whole command (`python -m nnslim infer ENGINE CASES -o OUT`, a fresh output folder),
so the Ray rows include starting a local Ray instance and the actors opening the engine. The three
alternate within each round (the order rotating), and the medians over the rounds are reported.
Every run's label maps are checked equal to the first local run's. The overhead per case is the
median Ray wall time minus the local one, over the number of cases.

    .venv/bin/python scripts/bench_ray.py [--engine DIR] [--cases 6] [--repeats 3] [--out FILE]

The default engine is the build's choice for the bundled model (artifacts/bench/serve/engine, built
once, as scripts/bench_serve.py does); the cases are copies of the MNI T1 (197x233x189). Prints a
table and writes artifacts/bench/ray.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from bench_serve import cpu_name  # scripts/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "artifacts" / "bench" / "ray"
MODEL = ROOT / "artifacts" / "models" / "mni-tissue-tiny.pt"
MODES = {"local": [], "ray, 1 actor": ["--ray", "--ray-actors", "1"], "ray, 2 actors": ["--ray", "--ray-actors", "2"]}  # 1: the default on one node


def prepare(engine: Path, count: int) -> Path:
    """`count` copies of the MNI T1 as cases, and the engine (built when missing)."""
    from nnslim.training.data import write_mni_tissue_raw

    data = WORK / "mni"
    if not (data / "imagesTr").is_dir():
        write_mni_tissue_raw(data)
    cases = WORK / f"cases-{count}"
    if not cases.is_dir():
        cases.mkdir(parents=True)
        for i in range(count):
            shutil.copyfile(data / "imagesTr" / "mni_0000.nii.gz", cases / f"case{i}_0000.nii.gz")
    if not (engine / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "nnslim", "build-engine", str(MODEL), "--out", str(engine)], check=True)
    return cases


def run(engine: Path, cases: Path, extra: list[str], out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nnslim", "infer", str(engine), str(cases), "-o", str(out), "--no-progress",
                    *extra], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def labels(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(out.glob("*.nii.gz"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=Path, default=ROOT / "artifacts" / "bench" / "serve" / "engine")
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench" / "ray.json")
    args = parser.parse_args()
    cases = prepare(args.engine, args.cases)
    walls: dict[str, list[float]] = {mode: [] for mode in MODES}
    reference: dict[str, np.ndarray] | None = None
    names = list(MODES)
    for round_ in range(args.repeats):
        for mode in names[round_ % len(names):] + names[:round_ % len(names)]:
            out = WORK / "out" / mode.replace(", ", "-").replace(" ", "")
            seconds = run(args.engine, cases, MODES[mode], out)
            walls[mode].append(seconds)
            got = labels(out)
            reference = reference or got
            if got.keys() != reference.keys() or not all(np.array_equal(got[k], reference[k]) for k in reference):
                raise SystemExit(f"{mode}: the label maps differ from the first local run's")
            print(f"[{round_ + 1}/{args.repeats}] {mode}: {seconds:.1f} s", file=sys.stderr)
    local = statistics.median(walls["local"])
    rows = [{"mode": mode, "seconds": statistics.median(walls[mode]),
             "cases_per_minute": args.cases * 60 / statistics.median(walls[mode]),
             "overhead_per_case_seconds": (statistics.median(walls[mode]) - local) / args.cases} for mode in MODES]
    print(f"\n{'run':<16}{'s (median)':>12}{'cases/min':>11}{'vs local':>10}{'overhead/case s':>17}")
    for row in rows:
        print(f"{row['mode']:<16}{row['seconds']:>12.1f}{row['cases_per_minute']:>11.2f}"
              f"{local / row['seconds']:>9.2f}x{row['overhead_per_case_seconds']:>17.2f}")
    print(f"labels: every run equal to the first local run ({args.cases} cases, {args.repeats} rounds)")
    record = {"cpu": {"name": cpu_name(), "cores": os.cpu_count()}, "machine": platform.machine(),
              "cases": args.cases, "repeats": args.repeats, "rows": rows, "labels_equal": True,
              "engine": json.loads((args.engine / "manifest.json").read_text()).get("selection")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
