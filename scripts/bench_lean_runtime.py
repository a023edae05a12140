"""The lean CPU runtime (`pip install nnslim`, no torch) against the full install, side by side.

Measured in one run, interleaved (lean, full, lean, full, ...), medians:
- installed size: site-packages of the runtime install and of the full development install (MB);
- start-up of `nnslim infer`: from process start to the engine loaded, and to the first tile
  (imports, engine load, reading and preprocessing the scan), lean and full;
- the whole command on the MNI volume: lean, full, and the PyTorch reference (full install,
  `--torch-checkpoint`, batch 1 as PyTorch users run it);
- a folder of 6 cases (the MNI T1 and five crops of it): seconds per case from `--log-jsonl`,
  lean against full.

The engine is the one `build-engine --precision auto` picks on this machine for the bundled model
(the fastest CPU candidate inside its gate), built by the full install; both installs run it.
The lean install is a fresh virtual environment with the built wheel and its declared
dependencies only (OpenVINO pinned to the full install's version, so both run the same kernels).

    .venv/bin/python scripts/bench_lean_runtime.py [--repeats 5] [--baseline REV]

--baseline REV also runs `nnslim infer` from a git worktree of commit REV (the full install's
environment, the same engine) in the same interleaved rounds.

Prints a table and writes artifacts/bench/lean_runtime.json. Needs the package index (pip) the
first time it makes the lean environment (kept in artifacts/bench/lean/).
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

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "artifacts" / "bench" / "lean"
MODEL = ROOT / "artifacts" / "models" / "mni-tissue-tiny.pt"

# run inside each install: `nnslim infer` as the console script runs it, reporting when the engine is
# loaded and when the first tile reaches the network (seconds since the parent started the process)
CHILD = r"""
import importlib, os, sys, time
spawn = float(os.environ["NNSLIM_BENCH_SPAWN"])
from nnslim.compiler.runtime import engine as _engine
try:
    _walk, _name = importlib.import_module("nnslim.compiler.runtime.window.walk"), "predict"
except ImportError:  # a checkout from before the runtime's rooms (--baseline)
    _walk, _name = importlib.import_module("nnslim.compiler.runtime.sliding_window"), "_predict"
_load, _predict, marks = _engine.load_engine, getattr(_walk._Walk, _name), {}
def load(*a, **k):
    e = _load(*a, **k); marks.setdefault("engine_loaded", time.time() - spawn); return e
def predict(self, windows):
    marks.setdefault("first_tile", time.time() - spawn); return _predict(self, windows)
_engine.load_engine = load
setattr(_walk._Walk, _name, predict)
from nnslim.compiler.cli import main
sys.argv = ["nnslim", *sys.argv[1:]]
try:
    main()
finally:
    print("BENCH " + repr(marks), file=sys.stderr)
"""


def site_packages_mb(python: Path) -> float:
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    total = sum(f.stat().st_size for f in Path(site).rglob("*") if f.is_file() and not f.is_symlink())
    return total / 2**20


def lean_python() -> Path:
    """The lean install's interpreter: a fresh venv with the wheel and its dependencies only."""
    venv = OUT / "venv"
    python = venv / "bin" / "python"
    if python.exists():
        return python
    import openvino

    wheels = OUT / "wheel"
    shutil.rmtree(wheels, ignore_errors=True)
    source = OUT / "source"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("nnslim", "compiler", "training"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels,
                    source], check=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *wheels.glob("*.whl"),
                    f"openvino=={openvino.__version__.split('-')[0]}"], check=True)
    return python


def baseline_path(rev: str) -> Path:
    """A folder whose `nnslim` package is the checkout of `rev` (compiler/ and training/ linked in),
    to run the code as it was with the full install's dependencies."""
    tree = OUT / f"baseline-{rev}"
    if not tree.is_dir():
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", tree, rev], check=True, capture_output=True)
    shim = OUT / f"baseline-{rev}-path"
    package = shim / "nnslim"
    if not package.is_dir():
        package.mkdir(parents=True)
        for entry in (tree / "nnslim").iterdir():
            (package / entry.name).symlink_to(entry)
        for folder in ("compiler", "training"):
            (package / folder).symlink_to(tree / folder)
    return shim


def run_infer(python: Path, args: list[str], path: Path | None = None) -> dict[str, float]:
    """One `nnslim infer` in a fresh process (`path`: a baseline checkout first on sys.path); its wall
    time and the child's marks."""
    env = {**os.environ, "NNSLIM_BENCH_SPAWN": repr(time.time())}
    env.pop("PYTHONPATH", None)
    if path is not None:
        env["PYTHONPATH"] = str(path)
    started = time.perf_counter()
    done = subprocess.run([python, "-c", CHILD, "infer", *args], capture_output=True, text=True, env=env, cwd=OUT)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{python} infer {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    marks = eval(next(line for line in done.stderr.splitlines() if line.startswith("BENCH "))[6:])  # noqa: S307
    return {"wall": wall, **marks}


def prepare(engine: Path, volume: Path, folder: Path) -> None:
    import nibabel as nib
    import numpy as np

    from nnslim.compiler.stages.pipeline import BuildConfig, build_engine

    if not (engine / "manifest.json").is_file():
        build_engine(BuildConfig(checkpoint=MODEL, out_dir=engine, parity_volume=volume, overwrite=True))
    folder.mkdir(parents=True, exist_ok=True)
    t1 = nib.load(volume)
    data = np.asarray(t1.dataobj, dtype=np.float32)
    crops = [(slice(None),) * 3, (slice(10, 190), slice(20, 220), slice(10, 180)), (slice(30, 170), slice(None), slice(None)),
             (slice(None), slice(40, 200), slice(20, 160)), (slice(0, 120), slice(0, 150), slice(0, 150)),
             (slice(60, 197), slice(60, 233), slice(40, 189))]
    for i, crop in enumerate(crops):
        nib.save(nib.Nifti1Image(data[crop], t1.affine), folder / f"case{i}_0000.nii.gz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", default=None, metavar="REV",
                        help="Also time the code of this git revision (today's runtime) with the full install.")
    args = parser.parse_args()
    from nnslim.training.data import write_mni_tissue_raw

    OUT.mkdir(parents=True, exist_ok=True)
    data = write_mni_tissue_raw(OUT / "mni") if not (OUT / "mni" / "imagesTr").is_dir() else OUT / "mni"
    volume = data / "imagesTr" / "mni_0000.nii.gz"
    engine, folder = OUT / "engine", OUT / "cases"
    prepare(engine, volume, folder)
    lean, full = lean_python(), Path(sys.executable)
    manifest = json.loads((engine / "manifest.json").read_text())
    base = baseline_path(args.baseline) if args.baseline else None
    singles = [("lean", lean, [], None), ("full", full, [], None),
               ("torch", full, ["--torch-checkpoint", str(MODEL), "--batch", "1"], None)]
    folders = [("lean folder", lean, None), ("full folder", full, None)]
    if base is not None:
        singles.append(("baseline", full, [], base))
        folders.append(("baseline folder", full, base))
    runs: dict[str, list[dict[str, float]]] = {k[0]: [] for k in [*singles, *folders]}
    for repeat in range(args.repeats):
        for name, python, extra, path in singles:
            out = OUT / f"seg_{name}.nii.gz"
            out.unlink(missing_ok=True)
            runs[name].append(run_infer(python, [str(engine), str(volume), "-o", str(out), "--no-progress", *extra],
                                        path))
            print(f"[{repeat + 1}/{args.repeats}] {name}: {runs[name][-1]}", file=sys.stderr)
    for repeat in range(max(1, args.repeats // 2)):
        for name, python, path in folders:
            out, log = OUT / f"segs_{name.split()[0]}", OUT / f"log_{name.split()[0]}.jsonl"
            shutil.rmtree(out, ignore_errors=True)
            log.unlink(missing_ok=True)
            result = run_infer(python, [str(engine), str(folder), "-o", str(out), "--no-progress", "--log-jsonl", str(log)],
                               path)
            cases = [json.loads(line) for line in log.read_text().splitlines()]
            result["per_case"] = statistics.median(c["seconds"] for c in cases)
            runs[name].append(result)
            print(f"[{repeat + 1}] {name}: {result}", file=sys.stderr)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    def labels(name: str):
        import nibabel as nib

        return nib.load(OUT / f"seg_{name}.nii.gz").get_fdata()

    same = [(labels("lean") == labels("full")).all()]
    if base is not None:
        same.append((labels("lean") == labels("baseline")).mean())
    singles_names = [s[0] for s in singles]
    report = {
        "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version()},
        "engine": {"backend": manifest["backend"], "precision": manifest["precision"]},
        "site_packages_mb": {"lean": site_packages_mb(lean), "full": site_packages_mb(full)},
        "startup_s": {k: {"engine_loaded": med(k, "engine_loaded"), "first_tile": med(k, "first_tile")}
                      for k in singles_names if k != "torch"},
        "whole_command_s": {k: med(k, "wall") for k in singles_names},
        "folder_per_case_s": {k.split()[0]: med(k, "per_case") for k, *_ in folders},
        "folder_wall_s": {k.split()[0]: med(k, "wall") for k, *_ in folders},
        "lean_labels_equal_full": bool(same[0]),
        "lean_labels_agree_with_baseline": float(same[1]) if base is not None else None,
        "baseline": args.baseline,
        "repeats": args.repeats, "runs": runs,
    }
    target = ROOT / "artifacts" / "bench" / "lean_runtime.json"
    target.write_text(json.dumps(report, indent=2) + "\n")
    s, w = report["startup_s"], report["whole_command_s"]
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; engine "
          f"{report['engine']['backend']} {report['engine']['precision']}")
    print(f"{'':34} {'lean':>9} {'full':>9} {'PyTorch':>9}")
    print(f"{'site-packages (MB)':34} {report['site_packages_mb']['lean']:>9.0f} {report['site_packages_mb']['full']:>9.0f}")
    print(f"{'start-up to engine loaded (s)':34} {s['lean']['engine_loaded']:>9.2f} {s['full']['engine_loaded']:>9.2f}")
    print(f"{'start-up to first tile (s)':34} {s['lean']['first_tile']:>9.2f} {s['full']['first_tile']:>9.2f}")
    print(f"{'whole command, MNI (s)':34} {w['lean']:>9.2f} {w['full']:>9.2f} {w['torch']:>9.2f}")
    print(f"{'folder of 6: s per case':34} {report['folder_per_case_s']['lean']:>9.2f} "
          f"{report['folder_per_case_s']['full']:>9.2f}")
    print(f"{'folder of 6: whole command (s)':34} {report['folder_wall_s']['lean']:>9.2f} "
          f"{report['folder_wall_s']['full']:>9.2f}")
    if base is not None:
        b = report["startup_s"]["baseline"]
        print(f"{'baseline ' + args.baseline + ' (full install)':34} start-up {b['engine_loaded']:.2f} / "
              f"{b['first_tile']:.2f} s, whole command {w['baseline']:.2f} s, per case "
              f"{report['folder_per_case_s']['baseline']:.2f} s, folder {report['folder_wall_s']['baseline']:.2f} s")
        print(f"lean vs baseline whole command: {w['baseline'] / w['lean']:.2f}x faster; labels agree on "
              f"{report['lean_labels_agree_with_baseline']:.6f} of voxels")
    print(f"lean/full whole command: {w['full'] / w['lean']:.2f}x; vs PyTorch: {w['torch'] / w['lean']:.2f}x faster; "
          f"labels identical: {report['lean_labels_equal_full']}")
    print(f"written {target}")


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
