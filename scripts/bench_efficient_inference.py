"""Benchmark (seed 003, issue 8): fewer windows, bounded memory, faster preprocessing; one run, CPU.

1. The MNI T1 padded to a whole-body-like field of view (anatomy in the middle of a large empty
   volume), segmented by the bundled model's engine with the full nnU-Net grid, mask skipping,
   ROI skipping and both: windows evaluated (and seed 003 eq. (2)), seconds, peak RSS, and Dice
   of each against the full grid.
2. A synthetic 512 x 512 x 600 CT-like volume: peak RSS of whole-volume logit accumulation
   (the usual way) against nnslim's slab streaming, both with mask skipping.
3. Preprocessing of the padded volume resampled to 1.5 mm and back: scipy spline resampling of the
   image (order 3) and of the logits (order 1), as nnU-Net does it on the CPU, against torch
   trilinear interpolation.

Every segmentation runs in a fresh process so its peak RSS is its own. Prints tables and writes
artifacts/bench/efficient_inference.json.

    .venv/bin/python scripts/bench_efficient_inference.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import in_fresh_process, peak_rss_mb  # noqa: E402
from nnslim.files import write_json_atomic  # noqa: E402
from nnslim.compiler.runtime.metrics import mean_dice  # noqa: E402

MODEL = ROOT / "artifacts" / "models" / "mni-tissue-tiny.pt"
OUT = ROOT / "artifacts" / "bench" / "efficient_inference.json"


def _segment(job: dict) -> dict:
    """In a child process: segment one volume one way; labels go to a file."""
    from nnslim.compiler.runtime.engine import InferenceOptions, load_engine
    from nnslim.compiler.runtime.segmentation import segment_volume
    from nnslim.compiler.runtime.window.selection import WindowReport, WindowSelection
    from nnslim.compiler.runtime.window.walk import sliding_window_inference
    from nnslim.compiler.runtime.window.mask import body_mask
    from nnslim.compiler.runtime.volumes.volume import load_volume

    engine = load_engine(job["engine"])
    volume = load_volume(Path(job["volume"]), 1)
    started = time.perf_counter()
    if job["way"] == "whole-volume logits":  # the usual way: the same preprocessing, all logits in memory
        from nnslim.compiler.runtime.preprocessing import prepare
        from nnslim.compiler.runtime.postprocessing import to_labels
        from nnslim.compiler.runtime.window.config import SlidingWindowConfig

        prepared = prepare(volume.data, volume.spacing, engine.spec.preprocessing)
        report = WindowReport()
        config = SlidingWindowConfig(patch_size=engine.spec.patch_size, batch_size=engine.spec.max_batch)
        logits = sliding_window_inference(prepared.image, engine.predictor, engine.spec.num_classes, config,
                                          report=report,
                                          selection=WindowSelection("mask", mask=body_mask(prepared.image)))
        labels = to_labels(logits, prepared)
    else:
        options = InferenceOptions(progress=False, skip=job["skip"])
        labels, report = segment_volume(volume, engine.predictor, engine.spec, options)
    seconds = time.perf_counter() - started
    np.save(job["labels"], labels)
    return {"seconds": seconds, "windows": report.to_dict(), "peak_rss_mb": peak_rss_mb()}


def _run(job: dict) -> dict:
    return in_fresh_process(_segment, job)


def _build_engine(out: Path, patch: tuple[int, int, int]) -> Path:
    from nnslim.compiler.stages.pipeline import BuildConfig, build_engine

    build_engine(BuildConfig(checkpoint=MODEL, out_dir=out, patch_size=patch, batch_size=2, pass_parity=False,
                             parity_tiles=1, precision="fp32"))
    return out


def padded_mni(path: Path, field_of_view: tuple[int, int, int]) -> tuple[Path, np.ndarray]:
    """The T1 centred in a larger zero field of view, and its tissue labels padded alike."""
    from nnslim.training.data import mni_tissue_volumes

    t1, label, _ = mni_tissue_volumes()
    data = np.asarray(t1.dataobj, dtype=np.float32)
    out = np.zeros(field_of_view, dtype=np.float32)
    labels = np.zeros(field_of_view, dtype=np.uint8)
    start = [(f - s) // 2 for f, s in zip(field_of_view, data.shape)]
    box = tuple(slice(a, a + s) for a, s in zip(start, data.shape))
    out[box], labels[box] = data, label
    nib.save(nib.Nifti1Image(out, t1.affine), path)
    return path, labels


def synthetic_ct(path: Path, shape=(512, 512, 600)) -> Path:
    """Air (-1000 HU) around an elliptic-cylinder body (0..100 HU) running along z."""
    x, y = np.ogrid[: shape[0], : shape[1]]
    body = ((x - shape[0] / 2) / 200) ** 2 + ((y - shape[1] / 2) / 150) ** 2 <= 1
    data = np.full(shape, -1000, dtype=np.float32)
    rng = np.random.default_rng(0)
    data[body] = rng.normal(50, 20, (int(body.sum()), shape[2])).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 1.0, 1.0])), path)
    return path


def preprocessing_times(volume: Path, classes: int = 3, target: float = 1.5) -> dict:
    from scipy.ndimage import zoom

    from nnslim.compiler.runtime.preprocessing import resample, resampled_shape

    data = np.asarray(nib.load(volume).dataobj, dtype=np.float32)
    spacing = (1.0, 1.0, 1.0)
    shape = resampled_shape(data.shape, spacing, (target,) * 3)
    factors = [n / o for n, o in zip(shape, data.shape)]
    started = time.perf_counter()
    down = zoom(data, factors, order=3)
    logits = np.repeat(down[None], classes, axis=0)
    back = np.stack([zoom(c, [o / n for o, n in zip(data.shape, down.shape)], order=1) for c in logits])
    scipy_seconds = time.perf_counter() - started
    started = time.perf_counter()
    down_t = resample(torch.from_numpy(data)[None], shape)
    back_t = resample(down_t.expand(classes, *shape).contiguous(), data.shape)
    torch_seconds = time.perf_counter() - started
    assert back.shape[1:] == tuple(back_t.shape[1:]) == data.shape
    return {"volume": list(data.shape), "resampled": list(shape), "scipy_seconds": scipy_seconds,
            "torch_seconds": torch_seconds, "speedup": scipy_seconds / torch_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--field-of-view", type=int, nargs=3, default=[300, 320, 450])
    parser.add_argument("--skip-synthetic", action="store_true", help="only the padded MNI part")
    parser.add_argument("--skip-preprocessing", action="store_true", help="no resampling comparison")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    results: dict = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        engine = _build_engine(tmp / "engine96", (96, 96, 96))
        volume, truth = padded_mni(tmp / "padded_0000.nii.gz", tuple(args.field_of_view))
        rows, labels = [], {}
        for skip in ("none", "mask", "roi", "roi+mask"):
            job = {"engine": str(engine), "volume": str(volume), "skip": skip, "way": "streamed",
                   "labels": str(tmp / f"{skip}.npy")}
            row = {"skip": skip, **_run(job)}
            labels[skip] = np.load(job["labels"])
            row["dice_vs_full_grid"] = mean_dice(labels[skip], labels["none"], 3)
            row["dice_vs_reference"] = mean_dice(labels[skip], truth, 3)
            row["foreground_outside_head"] = int((labels[skip][truth == 0] != 0).sum())
            rows.append(row)
            print(f"padded MNI {args.field_of_view}, skip={skip}: {row['windows']['evaluated']} windows, "
                  f"{row['seconds']:.1f} s", flush=True)
        results["padded_mni"] = {"field_of_view": args.field_of_view, "patch": [96, 96, 96], "rows": rows}
        if not args.skip_preprocessing:
            results["preprocessing"] = preprocessing_times(volume)

        if not args.skip_synthetic:
            engine128 = _build_engine(tmp / "engine128", (128, 128, 128))
            ct = synthetic_ct(tmp / "ct_0000.nii.gz")
            memory = []
            for way in ("whole-volume logits", "streamed"):
                job = {"engine": str(engine128), "volume": str(ct), "skip": "mask", "way": way,
                       "labels": str(tmp / "ct.npy")}
                memory.append({"way": way, **_run(job)})
                print(f"512x512x600, {way}: peak RSS {memory[-1]['peak_rss_mb']:.0f} MB", flush=True)
            results["synthetic_512x512x600"] = {"patch": [128, 128, 128], "rows": memory}

    base = rows[0]
    print(f"\nPadded MNI {tuple(args.field_of_view)} (bundled model, 96^3 tiles, batch 2, ONNX Runtime CPU)")
    print(f"{'skip':<10}{'windows':>9}{'of grid':>9}{'eq.(2)':>8}{'fewer':>8}{'seconds':>9}{'x':>7}"
          f"{'peak RSS MB':>13}{'Dice vs full':>14}{'Dice vs labels':>16}{'fg in air':>11}")
    for r in rows:
        w = r["windows"]
        print(f"{r['skip']:<10}{w['evaluated']:>9}{w['grid']:>9}{w['eq2']:>8}{w['grid'] / w['evaluated']:>7.2f}x"
              f"{r['seconds']:>9.1f}{base['seconds'] / r['seconds']:>6.2f}x{r['peak_rss_mb']:>13.0f}"
              f"{r['dice_vs_full_grid']:>14.4f}{r['dice_vs_reference']:>16.4f}{r['foreground_outside_head']:>11}")
    if "preprocessing" in results:
        p = results["preprocessing"]
        print(f"\nResampling {tuple(p['volume'])} -> {tuple(p['resampled'])} and 3-class logits back: scipy spline "
              f"{p['scipy_seconds']:.1f} s, torch trilinear {p['torch_seconds']:.2f} s ({p['speedup']:.0f}x)")
    if "synthetic_512x512x600" in results:
        print("\nSynthetic 512x512x600 CT-like volume (128^3 tiles, mask skipping)")
        print(f"{'accumulation':<22}{'windows':>9}{'seconds':>9}{'peak RSS MB':>13}")
        for r in results["synthetic_512x512x600"]["rows"]:
            print(f"{r['way']:<22}{r['windows']['evaluated']:>9}{r['seconds']:>9.1f}{r['peak_rss_mb']:>13.0f}")
    write_json_atomic(args.out, results)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
