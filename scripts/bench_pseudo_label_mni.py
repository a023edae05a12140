"""Seed 003's pseudo labeling on real volumes: the MNI T1 labeled, deformed copies unlabeled.

1. Labeled set: the MNI T1 with its tissue labels (`nnslim prepare-dataset mni-tissue`).
2. Unlabeled set: --cases copies of the T1 that this script generates, each with a random smooth
   elastic deformation plus a small rotation and scaling, and an intensity change (scale, gamma,
   a multiplicative bias field, noise inside the head). Each copy's true labels are the MNI labels
   deformed alike (nearest neighbour); they go to a separate `truth/` folder that training never reads.
3. `run_pseudo_labeling` (what `nnslim pseudo-label` runs) for --rounds rounds: eq. (1) per case,
   which cases were kept, the student.
4. The student and a model trained on the labeled set alone (the round-1 teacher: same preset, data,
   iterations and seed as the student, labeled cases only) segment every copy; Dice against the
   withheld truths.
Prints a table and writes artifacts/bench/pseudo_label_mni.json.

    .venv/bin/python scripts/bench_pseudo_label_mni.py --cases 6 --rounds 2 --epochs 12 --patch 64
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from nnslim.files import write_json_atomic  # noqa: E402
from nnslim.compiler.runtime.metrics import dice_scores  # noqa: E402


def deformed_copy(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random deformation (elastic + rotation about the centre + scaling) and an intensity change."""
    shape = np.array(image.shape, dtype=float)
    grid = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in image.shape), indexing="ij")
    centre = (shape - 1) / 2
    angle = np.deg2rad(rng.uniform(-8, 8))
    scale = rng.uniform(0.92, 1.08)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]) / scale
    offsets = np.stack([g - c for g, c in zip(grid, centre)])
    coords = np.einsum("ij,j...->i...", rotation, offsets) + centre[:, None, None, None]
    for axis in range(3):  # elastic: smoothed noise, up to a few voxels
        field = gaussian_filter(rng.normal(size=image.shape).astype(np.float32), sigma=10)
        coords[axis] += field / (np.abs(field).max() + 1e-8) * rng.uniform(2, 5)
    warped = map_coordinates(image.astype(np.float32), coords, order=1, mode="constant", cval=0.0)
    warped_label = map_coordinates(label, coords, order=0, mode="constant", cval=0).astype(np.uint8)
    inside = warped > 0
    top = float(warped.max())
    warped = (warped / top) ** rng.uniform(0.75, 1.35) * top * rng.uniform(0.85, 1.15)
    bias = gaussian_filter(rng.normal(size=image.shape).astype(np.float32), sigma=30)
    warped *= 1 + 0.15 * bias / (np.abs(bias).max() + 1e-8)
    warped[inside] += rng.normal(0, 0.02 * top, int(inside.sum())).astype(np.float32)
    warped[~inside] = 0.0  # the template is masked: air stays 0
    return warped.astype(np.float32), warped_label


def make_unlabeled(out: Path, count: int, seed: int) -> tuple[Path, Path]:
    from nnslim.training.data import mni_tissue_volumes

    t1, label, _ = mni_tissue_volumes()
    images, truths = out / "unlabeled", out / "truth"
    images.mkdir(parents=True, exist_ok=True)
    truths.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(count):
        image, truth = deformed_copy(np.asarray(t1.dataobj), label, rng)
        nib.save(nib.Nifti1Image(image, t1.affine), images / f"mnidef_{k:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(truth, t1.affine), truths / f"mnidef_{k:03d}.nii.gz")
    return images, truths


def score(checkpoint: Path, images: Path, truths: Path, out: Path) -> dict[str, dict]:
    from nnslim.compiler.runtime.volumes.layout import find_cases
    from nnslim.compiler.workflows.pseudo_labeling import _predict

    predicted = _predict(checkpoint, find_cases(images), out)
    scores = {}
    for name, path in sorted(predicted.items()):
        labels = np.asarray(nib.load(path).dataobj)
        truth = np.asarray(nib.load(truths / f"{name}.nii.gz").dataobj)
        grey, white = dice_scores(labels, truth, [1, 2])
        scores[name] = {"grey_matter": grey, "white_matter": white, "mean": (grey + white) / 2}
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "artifacts" / "pseudo-label-mni")
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=12, help="teacher and student epochs (25 iterations each)")
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench" / "pseudo_label_mni.json")
    args = parser.parse_args()
    from nnslim.compiler.workflows.pseudo_labeling import PseudoLabelConfig, run_pseudo_labeling
    from nnslim.training.data import write_mni_tissue_raw

    started = time.perf_counter()
    labeled = write_mni_tissue_raw(args.work / "labeled")
    images, truths = make_unlabeled(args.work, args.cases, args.seed + 1000)
    record = run_pseudo_labeling(PseudoLabelConfig(
        labeled=labeled, unlabeled=images, out_dir=args.work / "run", teacher_preset=args.preset,
        student_preset=args.preset, rounds=args.rounds, threshold=args.threshold, teacher_epochs=args.epochs,
        student_epochs=args.epochs, iterations_per_epoch=25, patch_size=(args.patch,) * 3, seed=args.seed,
    ))
    baseline = args.work / "run" / "round_1" / "teacher" / "checkpoint_final.pt"
    results = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "uncertainty": record["uncertainty"], "selected": record["selected"],
        "labeled_only": score(baseline, images, truths, args.work / "eval_labeled_only"),
        "student": score(Path(record["student"]), images, truths, args.work / "eval_student"),
        "seconds": time.perf_counter() - started,
    }
    print(f"\n{'case':<16}{'eq.(1) u':>10}{'kept':>6}{'labeled only':>14}{'student':>10}")
    for name in sorted(results["student"]):
        u = record["uncertainty"].get(name)
        print(f"{name:<16}{'inf' if u is None else f'{u:.4f}':>10}{'yes' if name in record['selected'] else 'no':>6}"
              f"{results['labeled_only'][name]['mean']:>14.4f}{results['student'][name]['mean']:>10.4f}")
    for key in ("labeled_only", "student"):
        results[f"{key}_mean_dice"] = float(np.mean([s["mean"] for s in results[key].values()]))
    print(f"{'mean':<32}{results['labeled_only_mean_dice']:>14.4f}{results['student_mean_dice']:>10.4f}")
    write_json_atomic(args.out, results)
    print(f"written {args.out} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
