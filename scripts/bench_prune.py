"""Benchmark: what pruning buys on a trained model, side by side in one run (ONNX Runtime CPU).

For each checkpoint:
  magnitude   global magnitude pruning without retraining (seed 001) at several sparsities:
              proxy Dice (pruned vs unpruned segmentation of the whole volume), true Dice, and the
              ONNX file size raw and zlib-compressed; the largest sparsity at proxy Dice >= 0.95
  structured  whole channels removed at several ratios (optionally fine-tuned): proxy Dice and
              ONNX Runtime latency per tile relative to the dense model

Prints tables and writes artifacts/bench/prune.json.

    .venv/bin/python scripts/bench_prune.py --checkpoint artifacts/models/mni-tissue-tiny.pt \\
        --volume artifacts/data/mni-tissue/imagesTr/mni_0000.nii.gz \\
        --labels artifacts/data/mni-tissue/labelsTr/mni.nii.gz --finetune-steps 60
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from nnslim.compiler.workflows.bench import onnx_latency
from nnslim.compiler.stages.model_stats import conv_macs
from nnslim.compiler.stages.prune import apply_masks, magnitude_masks
from nnslim.files import write_json_atomic
from nnslim.compiler.workflows.prune_sweep import SweepConfig, run_sweep
from nnslim.compiler.runtime.metrics import dice_scores
from nnslim.compiler.runtime.backends.torch_module import TorchPredictor
from nnslim.compiler.runtime.preprocessing import normalize
from nnslim.compiler.runtime.window.config import SlidingWindowConfig
from nnslim.compiler.runtime.window.walk import sliding_window_inference
from nnslim.compiler.runtime.volumes.volume import load_volume
from nnslim.compiler.stages.structured import apply_structured, finetune, structured_keep
from nnslim.training.checkpoint import load_model
from nnslim.training.fusion import reparameterize_model
from nnslim.parameters import count_parameters

ROOT = Path(__file__).resolve().parent.parent


def bench_checkpoint(args: argparse.Namespace, checkpoint: Path, workdir: Path) -> dict:
    model, metadata = load_model(checkpoint)
    model = reparameterize_model(model)
    patch = tuple(metadata["patch_size"])
    shape = (model.config.in_channels, *patch)
    labels = metadata["label_names"]
    print(f"\n{checkpoint} ({count_parameters(model):,} parameters, patch {patch})", flush=True)

    sweep = run_sweep(SweepConfig(
        checkpoint=checkpoint, volume=args.volume, labels=args.labels, mask=args.mask,
        out_dir=args.out.parent / f"prune-sweep-{checkpoint.stem}", sparsities=tuple(args.sparsities), progress=False,
    ))
    dense_seconds, _, dense_size = onnx_latency(model, shape, args.repeats, workdir)
    print(f"  magnitude pruning (no retraining); dense ONNX {dense_size['bytes']:,} B, "
          f"{dense_size['compressed_bytes']:,} B compressed")
    print(f"  {'sparsity':>9} {'proxy Dice':>11} {'true Dice':>10} {'compressed size':>16}")
    magnitude = []
    for row in sweep["levels"]:
        pruned = copy.deepcopy(model)
        apply_masks(pruned, magnitude_masks(pruned, threshold=row["threshold"]))
        _, _, size = onnx_latency(pruned, shape, 1, workdir)
        entry = {**row, "onnx_bytes": size["bytes"], "onnx_compressed_bytes": size["compressed_bytes"],
                 "compressed_ratio": size["compressed_bytes"] / dense_size["compressed_bytes"]}
        magnitude.append(entry)
        print(f"  {row['sparsity']:>9.3f} {row['proxy_mean_dice']:>11.4f} {row.get('true_mean_dice', float('nan')):>10.4f} "
              f"{entry['compressed_ratio']:>15.2f}x", flush=True)
    best = sweep["largest_sparsity_at_min_proxy_dice"]
    print(f"  largest sparsity at proxy Dice >= 0.95: {best}")

    volume = load_volume(args.volume, model.config.in_channels)
    image = torch.from_numpy(normalize(volume.data, metadata["normalization"]))
    window = SlidingWindowConfig(patch_size=patch, batch_size=2)
    region = np.ones(volume.data.shape[1:], dtype=bool)
    if args.mask:
        import nibabel as nib

        region = np.asarray(nib.load(args.mask).dataobj) != 0
    baseline = sliding_window_inference(image, TorchPredictor(model), len(labels), window).argmax(0).numpy()
    print(f"  structured pruning: dense latency {dense_seconds * 1e3:.0f} ms per tile")
    print(f"  {'ratio':>6} {'finetune':>8} {'params':>9} {'MACs':>7} {'proxy Dice':>11} {'latency':>9}")
    structured = []
    for ratio in args.ratios:
        for steps in sorted({0, args.finetune_steps}):
            pruned = apply_structured(model, structured_keep(model, ratio))
            if steps:
                finetune(pruned, args.finetune_dataset, steps, patch)
            seg = sliding_window_inference(image, TorchPredictor(pruned), len(labels), window).argmax(0).numpy()
            proxy = float(np.nanmean(dice_scores(seg[region], baseline[region], list(range(1, len(labels))))))
            seconds, _, _ = onnx_latency(pruned, shape, args.repeats, workdir)
            entry = {"ratio": ratio, "finetune_steps": steps, "parameters": count_parameters(pruned),
                     "macs": conv_macs(pruned, shape), "proxy_mean_dice": proxy, "seconds": seconds,
                     "latency_ratio": seconds / dense_seconds}
            structured.append(entry)
            print(f"  {ratio:>6.3f} {steps:>8d} {entry['parameters']:>9,} {entry['macs'] / 1e9:>6.2f}G "
                  f"{proxy:>11.4f} {entry['latency_ratio']:>8.2f}x", flush=True)
    passing = [e for e in structured if e["proxy_mean_dice"] >= 0.95]
    fastest = min(passing, key=lambda e: e["latency_ratio"]) if passing else None
    print("  fastest structured model at proxy Dice >= 0.95: "
          + (f"ratio {fastest['ratio']} (+{fastest['finetune_steps']} steps), {fastest['latency_ratio']:.2f}x latency"
             if fastest else "none"))
    return {
        "checkpoint": str(checkpoint), "parameters": count_parameters(model), "patch_size": list(patch),
        "dense_seconds": dense_seconds, "dense_onnx_size": dense_size,
        "magnitude": magnitude, "largest_sparsity_at_proxy_dice_0_95": best,
        "region_sparsity_at_best": (sweep["best_level"] or {}).get("region_sparsity"),
        "structured": structured, "fastest_structured_at_proxy_dice_0_95": fastest,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, action="append", required=True)
    parser.add_argument("--volume", type=Path, required=True)
    parser.add_argument("--labels", type=Path, default=None)
    parser.add_argument("--mask", type=Path, default=None)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.125, 0.25, 0.5])
    parser.add_argument("--finetune-steps", type=int, default=0)
    parser.add_argument("--finetune-dataset", default="mni-tissue")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench" / "prune.json")
    args = parser.parse_args()
    report = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "onnxruntime": ort.__version__},
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "checkpoint"},
              "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        for checkpoint in args.checkpoint:
            report["models"].append(bench_checkpoint(args, checkpoint, Path(tmp)))
    write_json_atomic(args.out, report, default=str)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
