"""Benchmark: what FasterFusion re-parameterization (seed 000) buys on ONNX Runtime CPU.

Side by side in one run, each model exported to ONNX and timed in its own ONNX Runtime session
(CPU EP, batch 1, median of --repeats runs after one warm-up):

  units     plain conv-IN-LReLU | FasterFusion train form | fused | fused densified to one 3x3x3
            at 160 / 256 / 320 channels and the given spatial sizes
  networks  nnunet-3d-fullres | faster-nnunet (fused) | half-nnunet at the given patches
  training  (with --train-iterations N) tiny vs tiny-faster on mni-tissue, same budget: held-out Dice

Prints tables and writes artifacts/bench/reparam.json.

    .venv/bin/python scripts/bench_reparam.py
    .venv/bin/python scripts/bench_reparam.py --unit-sizes 16 --network-patches 64 --train-iterations 300
    .venv/bin/python scripts/bench_reparam.py --training-only --train-iterations 300 --train-seeds 0 1 --train-patch 64
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from nnslim.compiler.workflows.bench import onnx_latency
from nnslim.compiler.stages.model_stats import conv_macs
from nnslim.files import write_json_atomic
from nnslim.training.blocks import ConvNormAct, FasterFusionBlock
from nnslim.training.presets import get_preset
from nnslim.training.fusion import reparameterize_model
from nnslim.parameters import count_parameters
from nnslim.training.unet import UNet

ROOT = Path(__file__).resolve().parent.parent


def randomized_batchnorm(module: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm3d):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=generator) * 0.3)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)
    return module.eval()


def bench_units(channels: list[int], sizes: list[int], repeats: int, workdir: Path) -> list[dict]:
    rows = []
    for size in sizes:
        for c in channels:
            torch.manual_seed(0)
            plain = ConvNormAct(c, c, (3, 3, 3), (1, 1, 1), True, lambda n: nn.InstanceNorm3d(n, affine=True), 0.01).eval()
            train = randomized_batchnorm(FasterFusionBlock(c, c))
            fused = reparameterize_model(train)
            dense = nn.Sequential(fused.densified(), nn.LeakyReLU(0.01)).eval()
            shape = (c, size, size, size)
            results = {}
            for name, module in (("plain", plain), ("ff_train", train), ("ff_fused", fused), ("ff_dense", dense)):
                seconds, out, _ = onnx_latency(module, shape, repeats, workdir)
                results[name] = {"params": count_parameters(module), "macs": conv_macs(module, shape), "seconds": seconds, "out": out}
            error = np.abs(results["ff_fused"]["out"] - results["ff_train"]["out"]).max() / np.abs(results["ff_train"]["out"]).max()
            for name, r in results.items():
                del r["out"]
            rows.append({
                "channels": c, "size": size, **results,
                "fused_vs_train_max_rel_error": float(error),
                "fused_over_plain_latency": results["ff_fused"]["seconds"] / results["plain"]["seconds"],
                "dense_over_plain_latency": results["ff_dense"]["seconds"] / results["plain"]["seconds"],
            })
            print_unit_row(rows[-1])
    return rows


def print_unit_row(r: dict) -> None:
    cells = "  ".join(
        f"{name} {r[name]['params'] / 1e6:5.2f}M {r[name]['macs'] / 1e9:6.2f}G {r[name]['seconds'] * 1e3:7.1f}ms"
        for name in ("plain", "ff_train", "ff_fused", "ff_dense")
    )
    print(f"  C={r['channels']:3d} {r['size']:3d}^3  {cells}  fused/plain {r['fused_over_plain_latency']:.2f}x "
          f"dense/plain {r['dense_over_plain_latency']:.2f}x  rel.err {r['fused_vs_train_max_rel_error']:.1e}", flush=True)


def bench_networks(patches: list[int], repeats: int, workdir: Path) -> list[dict]:
    rows = []
    for patch in patches:
        baseline = None
        for preset in ("nnunet-3d-fullres", "faster-nnunet", "half-nnunet"):
            torch.manual_seed(0)
            model = reparameterize_model(randomized_batchnorm(UNet(get_preset(preset).build(1, 3))))
            shape = (1, patch, patch, patch)
            seconds, _, _ = onnx_latency(model, shape, repeats, workdir)
            row = {"preset": preset, "patch": patch, "params": count_parameters(model), "macs": conv_macs(model, shape), "seconds": seconds}
            baseline = baseline or row
            row["params_ratio"] = row["params"] / baseline["params"]
            row["latency_ratio"] = row["seconds"] / baseline["seconds"]
            rows.append(row)
            print(f"  {preset:<18} {patch:3d}^3  params {row['params'] / 1e6:6.2f}M ({row['params_ratio']:.2f}x)  "
                  f"MACs {row['macs'] / 1e9:7.1f}G  latency {seconds:6.2f}s ({row['latency_ratio']:.2f}x)", flush=True)
    return rows


def bench_training(iterations: int, seeds: list[int], patch: int, workdir: Path) -> dict:
    """Seed 000 at equal budget: tiny and tiny-faster trained on the same data, iterations, patch and
    seeds (interleaved per seed); held-out Dice per run and its mean and spread per preset."""
    from nnslim.training.checkpoint import load_model
    from nnslim.training.data import load_mni_tissue
    from nnslim.training.train import TrainConfig, train

    dataset = load_mni_tissue()
    rows = []
    epochs = max(1, iterations // 25)
    for seed in seeds:
        for preset in ("tiny", "tiny-faster"):
            started = time.perf_counter()
            result = train(TrainConfig(preset=preset, dataset="mni-tissue", out_dir=str(workdir / f"{preset}-{seed}"),
                                       epochs=epochs, iterations_per_epoch=25, validate_every=epochs,
                                       patch_size=(patch,) * 3, seed=seed), dataset=dataset)
            trained = load_model(result.checkpoint)[0]
            rows.append({
                "preset": preset, "seed": seed, "iterations": epochs * 25, "patch": patch,
                "held_out_mean_dice": result.final_validation_dice, "held_out_dice": result.history[-1].get("val_dice"),
                "train_params": count_parameters(trained),
                "deploy_params": count_parameters(reparameterize_model(trained)),
                "train_seconds": time.perf_counter() - started,
            })
            print(f"  seed {seed} {preset:<12} {epochs * 25} iterations at {patch}^3: held-out mean Dice "
                  f"{result.final_validation_dice:.4f}, deploy params {rows[-1]['deploy_params']:,}, "
                  f"{rows[-1]['train_seconds']:.0f} s", flush=True)
    summary = {}
    for preset in ("tiny", "tiny-faster"):
        scores = [r["held_out_mean_dice"] for r in rows if r["preset"] == preset]
        params = next(r["deploy_params"] for r in rows if r["preset"] == preset)
        summary[preset] = {"mean": float(np.mean(scores)), "min": min(scores), "max": max(scores),
                           "std": float(np.std(scores)), "deploy_params": params}
    gap = summary["tiny"]["mean"] - summary["tiny-faster"]["mean"]
    ratio = summary["tiny-faster"]["deploy_params"] / summary["tiny"]["deploy_params"]
    print(f"\n{'preset':<14}{'runs':>5}{'mean Dice':>11}{'min':>8}{'max':>8}{'deploy params':>15}")
    for preset, row in summary.items():
        print(f"{preset:<14}{len(seeds):>5}{row['mean']:>11.4f}{row['min']:>8.4f}{row['max']:>8.4f}"
              f"{row['deploy_params']:>15,}")
    print(f"plain - fused mean Dice {gap:+.4f} (target <= 0.01); deploy params {ratio:.2f}x (target <= 0.5x)")
    return {"runs": rows, "summary": summary, "dice_gap": gap, "deploy_params_ratio": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unit-channels", type=int, nargs="+", default=[160, 256, 320])
    parser.add_argument("--unit-sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--network-patches", type=int, nargs="+", default=[64, 96])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-iterations", type=int, default=0, help="0 skips the training comparison")
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--train-patch", type=int, default=64)
    parser.add_argument("--training-only", action="store_true", help="skip the unit and network timings")
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench" / "reparam.json")
    args = parser.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    report = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "onnxruntime": ort.__version__, "torch": torch.__version__},
        "settings": vars(args) | {"out": str(args.out)},
    }
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if not args.training_only:
            print("units (ONNX Runtime CPU, batch 1; params, conv MACs, median latency):")
            report["units"] = bench_units(args.unit_channels, args.unit_sizes, args.repeats, workdir)
            print("whole networks (deploy form):")
            report["networks"] = bench_networks(args.network_patches, args.repeats, workdir)
        if args.train_iterations:
            print("training on mni-tissue, same budget:")
            report["training"] = bench_training(args.train_iterations, args.train_seeds, args.train_patch, workdir)
    write_json_atomic(args.out, report)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
