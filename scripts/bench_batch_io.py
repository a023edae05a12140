"""Does overlapping I/O with compute pay off? `nnslim infer` on a folder with `--io-workers 0`
(read, segment, write one after the other) against `--io-workers 1` (the next case read and the
previous one written in background threads while the network runs).

A folder of N copies of one scan (default 6, the bundled MNI T1) is segmented by
`segment_files`, the library function `nnslim infer` runs, after one warm-up run. Runs alternate
between the settings (off, on, off, on, ...) so drift in the machine's load hits both alike;
the table shows each setting's median wall time over the repeats, seconds per case, and the sum
of the cases' own stage times (with overlap the wall time should fall below that sum). Every run
writes into a fresh folder; both settings must write identical label maps (checked).

Prints a table and writes artifacts/bench/batch_io.json.

    .venv/bin/python scripts/bench_batch_io.py [--engine DIR] [--volume FILE] [--cases 6] [--repeats 3]
        [--save-probabilities]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"off (--io-workers 0)": 0, "on (--io-workers 1)": 1}


def case_folder(volume: Path, cases: int, root: Path) -> Path:
    folder = root / "cases"
    folder.mkdir()
    for i in range(cases):
        shutil.copyfile(volume, folder / f"case{i:03d}_0000.nii.gz")
    return folder


def run_once(engine, folder: Path, out: Path, workers: int, probabilities: bool) -> dict:
    from nnslim.compiler.runtime.cases.batch import BatchOptions
    from nnslim.compiler.runtime.engine import InferenceOptions
    from nnslim.compiler.runtime.cases.run import segment_files

    started = time.perf_counter()
    results = segment_files(engine, [folder], out, InferenceOptions(progress=False),
                            batch=BatchOptions(io_workers=workers, save_probabilities=probabilities))
    wall = time.perf_counter() - started
    failed = [r.name for r in results if r.error]
    if failed:
        raise SystemExit(f"cases failed: {failed}")
    return {"wall": wall, "case_seconds_sum": sum(r.seconds for r in results)}


def labels_of(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(out.glob("*.nii.gz"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", type=Path, default=ROOT / "artifacts" / "engines" / "mni-tissue-tiny")
    parser.add_argument("--volume", type=Path, default=ROOT / "artifacts/data/mni-tissue/imagesTr/mni_0000.nii.gz")
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--save-probabilities", action="store_true", help="also write CASE.npz (more to write)")
    args = parser.parse_args()

    from nnslim.compiler.runtime.engine import load_engine
    from nnslim.files import write_json_atomic

    engine = load_engine(args.engine)
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = case_folder(args.volume, args.cases, root)
        run_once(engine, folder, root / "warmup", 1, args.save_probabilities)
        outputs = {}
        for repeat in range(args.repeats):
            for name, workers in SETTINGS.items():  # interleaved: off, on, off, on, ...
                out = root / f"out-{workers}-{repeat}"
                runs[name].append(run_once(engine, folder, out, workers, args.save_probabilities))
                outputs.setdefault(name, labels_of(out))
                shutil.rmtree(out)
        first, *others = outputs.values()
        same = all(first.keys() == b.keys() and all(np.array_equal(first[k], b[k]) for k in first) for b in others)
    rows = {}
    for name, measured in runs.items():
        wall = statistics.median(r["wall"] for r in measured)
        rows[name] = {"median_wall_s": wall, "per_case_s": wall / args.cases,
                      "median_case_seconds_sum": statistics.median(r["case_seconds_sum"] for r in measured),
                      "walls_s": [r["wall"] for r in measured]}
    off, on = (rows[name]["median_wall_s"] for name in SETTINGS)
    print(f"{args.cases} cases of {args.volume.name}, {engine.runtime.label}, medians of {args.repeats} interleaved "
          f"runs{' with probabilities' if args.save_probabilities else ''}")
    print(f"{'overlap':24}{'wall s':>10}{'s/case':>10}{'sum of cases s':>16}")
    for name, row in rows.items():
        print(f"{name:24}{row['median_wall_s']:10.2f}{row['per_case_s']:10.2f}{row['median_case_seconds_sum']:16.2f}")
    print(f"speed-up {off / on:.2f}x; identical label maps: {same}")
    out = ROOT / "artifacts" / "bench" / "batch_io.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, {"engine": str(args.engine), "runtime": engine.runtime.label, "volume": str(args.volume),
                            "cases": args.cases, "repeats": args.repeats, "save_probabilities": args.save_probabilities,
                            "machine": platform.processor() or platform.machine(), "rows": rows,
                            "speedup": off / on, "identical_outputs": same})


if __name__ == "__main__":
    main()
