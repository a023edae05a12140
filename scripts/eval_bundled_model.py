"""Issue 20's targets for a bundled-model candidate, measured through the runtime (ONNX Runtime fp32).

For the checkpoint it builds fp32 engines at 96^3 and 160^3 tiles (no parity gate: the engines are
the model, checked elsewhere) and measures:
1. held-out Dice: mean grey/white-matter Dice on the held-out coronal band of the MNI volume, with
   the model's own training patch and with 160^3 tiles (target: >= 0.90, difference <= 0.01);
2. air on a padded field of view: the MNI T1 centred in a zero volume (scripts/bench_efficient_inference's
   300 x 320 x 450); air = voxels that are 0 in the padded T1 and background in the labels; the share
   of them labelled tissue (target < 0.1%), with the full nnU-Net grid;
3. window skipping on that volume: Dice of `--skip mask` and `--skip roi+mask` against the full grid
   (target >= 0.99), and each against the labels.
Prints a table and writes artifacts/bench/bundled_model.json (or --out).

    .venv/bin/python scripts/eval_bundled_model.py [--model artifacts/models/mni-tissue-tiny.pt]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from bench_efficient_inference import padded_mni  # noqa: E402
from nnslim.files import write_json_atomic  # noqa: E402
from nnslim.compiler.runtime.metrics import mean_dice  # noqa: E402

MODEL = ROOT.parent / "artifacts" / "models" / "mni-tissue-tiny.pt"
OUT = ROOT.parent / "artifacts" / "bench" / "bundled_model.json"


def build(model: Path, out: Path, patch: int) -> Path:
    from nnslim.compiler.stages.pipeline import BuildConfig, build_engine

    build_engine(BuildConfig(checkpoint=model, out_dir=out, patch_size=(patch,) * 3, batch_size=2,
                             pass_parity=False, parity_tiles=1, precision="fp32", backend="onnxruntime"))
    return out


def segment(engine_dir: Path, volume: Path, skip: str = "none") -> tuple[np.ndarray, dict, float]:
    from nnslim.compiler.runtime.engine import InferenceOptions, load_engine
    from nnslim.compiler.runtime.segmentation import segment_volume
    from nnslim.compiler.runtime.volumes.volume import load_volume

    engine = load_engine(engine_dir)
    started = time.perf_counter()
    labels, report = segment_volume(load_volume(volume, 1), engine.predictor, engine.spec,
                                    InferenceOptions(progress=False, skip=skip))
    return labels, report.to_dict(), time.perf_counter() - started


def band_dice(labels: np.ndarray, truth: np.ndarray, band: np.ndarray) -> dict:
    from nnslim.compiler.runtime.metrics import dice_scores

    grey, white = dice_scores(labels[band], truth[band], [1, 2])
    return {"grey_matter": grey, "white_matter": white, "mean": (grey + white) / 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--field-of-view", type=int, nargs=3, default=[300, 320, 450])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    import nibabel as nib

    from nnslim.training.data import mni_tissue_volumes

    t1, truth, holdout = mni_tissue_volumes()
    results: dict = {"model": str(args.model), "field_of_view": args.field_of_view}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mni = tmp / "mni_0000.nii.gz"
        nib.save(t1, mni)
        engines = {p: build(args.model, tmp / f"engine{p}", p) for p in (96, 160)}
        band = holdout.astype(bool)
        results["held_out"] = {}
        for patch, engine in engines.items():
            labels, windows, seconds = segment(engine, mni)
            results["held_out"][patch] = {**band_dice(labels, truth, band), "windows": windows["evaluated"],
                                          "seconds": seconds}
            print(f"held-out band, {patch}^3 tiles: {results['held_out'][patch]}", flush=True)
        padded, padded_truth = padded_mni(tmp / "padded_0000.nii.gz", tuple(args.field_of_view))
        air = (np.asarray(nib.load(padded).dataobj) == 0) & (padded_truth == 0)
        rows, full = [], None
        for skip in ("none", "mask", "roi+mask"):
            labels, windows, seconds = segment(engines[96], padded, skip)
            full = labels if full is None else full
            rows.append({
                "skip": skip, "windows": windows, "seconds": seconds,
                "air_voxels": int(air.sum()), "air_labelled_tissue": int((labels[air] != 0).sum()),
                "dice_vs_full_grid": mean_dice(labels, full, 3), "dice_vs_labels": mean_dice(labels, padded_truth, 3),
            })
            print(f"padded FOV, skip {skip}: {rows[-1]}", flush=True)
        results["padded"] = rows
    print(f"\nBundled model {args.model}")
    for patch, r in results["held_out"].items():
        print(f"  held-out band, {patch}^3 tiles: GM {r['grey_matter']:.4f}  WM {r['white_matter']:.4f}  "
              f"mean {r['mean']:.4f}  ({r['windows']} windows, {r['seconds']:.1f} s)")
    gap = abs(results["held_out"][96]["mean"] - results["held_out"][160]["mean"])
    print(f"  |Dice 96 - Dice 160| = {gap:.4f}")
    print(f"\nPadded field of view {tuple(args.field_of_view)}, 96^3 tiles")
    print(f"{'skip':<10}{'windows':>9}{'seconds':>9}{'air as tissue':>15}{'share':>9}{'Dice vs full':>14}"
          f"{'Dice vs labels':>16}")
    for r in rows:
        share = r["air_labelled_tissue"] / r["air_voxels"]
        print(f"{r['skip']:<10}{r['windows']['evaluated']:>9}{r['seconds']:>9.1f}{r['air_labelled_tissue']:>15}"
              f"{share:>8.4%}{r['dice_vs_full_grid']:>14.4f}{r['dice_vs_labels']:>16.4f}")
    results["dice_gap_96_160"] = gap
    write_json_atomic(args.out, results)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
