"""Where `nnslim infer`'s time goes besides the network: a breakdown of one whole-volume case.

Runs `segment_files` (what `nnslim infer` runs, file to file) under cProfile, once with the
engine's own predictor and once with a predictor that returns zeros (the runtime's overhead
alone), after one warm-up run each, and splits the time into:

    read        load_volume (NIfTI read and decompress, checks)
    preprocess  prepare (crop, normalization, resampling)
    network     the predictor calls
    labels      logits -> labels (argmax, resampling back)
    write       save_segmentation (NIfTI compress and write, atomically)
    window      the rest of the sliding window: tile gathering, Gaussian accumulation, division

Prints a table and writes artifacts/bench/profile_infer.json.

    .venv/bin/python scripts/profile_infer.py [--engine DIR] [--volume FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PARTS = {"read": "load_volume", "preprocess": "prepare", "labels": "logits_to_labels",
         "write": "save_segmentation"}


def cumulative(stats: pstats.Stats, function: str) -> float:
    """Cumulative seconds of every function named `function` (outermost calls only)."""
    return sum(row[3] for (_, _, name), row in stats.stats.items() if name == function)


class Timed:
    """A predictor that adds up the seconds spent in it."""

    def __init__(self, predict) -> None:
        self.predict, self.seconds = predict, 0.0

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        out = self.predict(tiles)
        self.seconds += time.perf_counter() - started
        return out


def profile_once(engine, volume: Path, predict, out: Path) -> dict[str, float]:
    from nnslim.compiler.runtime.engine import InferenceOptions
    from nnslim.compiler.runtime.cases.run import segment_files

    options = InferenceOptions(progress=False)
    predictor = Timed(predict)
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    segment_files(engine, [volume], out, options, predictor=predictor)
    profiler.disable()
    total = time.perf_counter() - started
    stats = pstats.Stats(profiler)
    parts = {name: cumulative(stats, function) for name, function in PARTS.items()}
    parts["network"] = predictor.seconds
    parts["window"] = total - sum(parts.values())
    return {"total": total, **parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", type=Path, default=ROOT / "artifacts" / "engines" / "mni-tissue-tiny")
    parser.add_argument("--volume", type=Path, default=ROOT / "artifacts/data/mni-tissue/imagesTr/mni_0000.nii.gz")
    args = parser.parse_args()

    from nnslim.compiler.runtime.engine import load_engine
    from nnslim.files import write_json_atomic

    engine = load_engine(args.engine)
    classes = engine.spec.num_classes

    def zeros(tiles: torch.Tensor) -> torch.Tensor:
        return torch.zeros((tiles.shape[0], classes, *tiles.shape[2:]))

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, predictor in (("engine", engine.predictor), ("zeros (overhead alone)", zeros)):
            profile_once(engine, args.volume, predictor, Path(tmp) / "warmup.nii.gz")
            rows[name] = profile_once(engine, args.volume, predictor, Path(tmp) / f"{len(rows)}.nii.gz")
    columns = ["total", "read", "preprocess", "network", "window", "labels", "write"]
    print(f"nnslim infer breakdown, {args.volume.name} with {engine.runtime.label} "
          f"({engine.spec.patch_size} tiles), seconds")
    print(f"{'predictor':24}" + "".join(f"{c:>11}" for c in columns))
    for name, row in rows.items():
        print(f"{name:24}" + "".join(f"{row[c]:11.2f}" for c in columns))
    out = ROOT / "artifacts" / "bench" / "profile_infer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, {"engine": str(args.engine), "runtime": engine.runtime.label, "volume": str(args.volume),
                            "rows": rows})


if __name__ == "__main__":
    main()
