"""Benchmark: `nnUNetv2_predict` against `nnslim-predict-nnunet` on the same folder of cases (CPU).

A model folder is written as nnU-Net writes one (tests/compiler/stages/nnunet_folder.py: plans.json,
dataset.json, fold_0/checkpoint_final.pth; nnU-Net's PlainConvUNet with 5 stages of 32..320
features, 2 convolutions per stage, 64^3 patch, CT normalization) under a $nnUNet_results, and a
folder of CT-like cases. The weights (--weights): "trained" (default) trains the network briefly
on such cases, whose labels are intensity bands inside the body, so that its logits are decisive as
a trained model's are (random weights leave classes within a hair of each other, where bf16 and
int8 engines fail their agreement gates and `--precision auto` keeps fp32); "random" keeps them
random. Both commands run whole, as a user runs them, on the
same arguments (`-d 901 -c 3d_fullres -f 0 -device cpu`), with TTA and with --disable_tta:
  cold   nnslim's first run, with an empty engine cache (the engine build included)
  warm   later runs: nnslim reuses the cached engine
Rounds alternate the order of the two commands; the table gives medians, the speed-up, and the voxel
agreement of the two output folders.

nnU-Net runs in its own environment (a Python with nnunetv2: torch==2.13.0 first, then nnunetv2,
so pip keeps that torch): --nnunet-python, or $NNSLIM_NNUNET_PYTHON.

Prints a table and writes artifacts/bench/nnunet_predict-WEIGHTS.json.

    .venv/bin/python scripts/bench_nnunet_predict.py --nnunet-python /tmp/nnunet-ref/bin/python
    .venv/bin/python scripts/bench_nnunet_predict.py --nnunet-python ... --cases 3 --rounds 3
    .venv/bin/python scripts/bench_nnunet_predict.py --nnunet-python ... --precision fp32 --reuse-model
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "artifacts" / "bench" / "nnunet_predict"

from scripts.bench_serve import cpu_name  # noqa: E402
from tests.compiler.stages.nnunet_folder import write_model_folder  # noqa: E402

DATASET = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2}, "numTraining": 100,
           "file_ending": ".nii.gz"}
NNUNET = ("import sys; from nnunetv2.inference.predict_from_raw_data import predict_entry_point as f; "
          "sys.argv = ['nnUNetv2_predict', *sys.argv[1:]]; f()")


def ct_case(seed: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like volume (smooth random tissue inside a body, air at -1000 HU around it) and its labels:
    1 where the smooth tissue is above 80 HU, 2 above 115 HU (the noise is not part of the label)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    body = (grid[0] ** 2 + grid[1] ** 2) < 0.85
    smooth = 60 + 40 * np.sin(3 * grid[0] + seed) * np.cos(2 * grid[2] + 0.5 * seed)
    data = np.where(body, smooth + 15 * rng.normal(size=shape), -1000).astype(np.float32)
    labels = (body & (smooth > 80)).astype(np.int64) + (body & (smooth > 115))
    return data, labels


def write_cases(folder: Path, count: int, shape: tuple[int, int, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        data, _ = ct_case(i, shape)
        nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0])), folder / f"case{i:02d}_0000.nii.gz")


def train_weights(model: Path, steps: int, shape: tuple[int, int, int]) -> float:
    """Train fold 0's network (nnslim's UNet, which carries nnU-Net's module names) on CT-like cases
    normalized as nnU-Net does, and write its weights back under nnU-Net's names and aliases; returns
    the last loss."""
    import torch

    from nnslim.compiler.stages.nnunet_import import unet_config
    from nnslim.training.unet import UNet
    from tests.compiler.stages.nnunet_folder import CT_PROPERTIES

    checkpoint_file = model / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(checkpoint_file, weights_only=False)  # the bench's own file, written just now
    plans = json.loads((model / "plans.json").read_text())
    net = UNet(unet_config(plans["configurations"]["3d_fullres"], 1, 3))
    cases = [ct_case(100 + i, shape) for i in range(4)]  # other cases than the benchmark's
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    rng = np.random.default_rng(0)
    net.train()
    loss = torch.zeros(())
    for step in range(steps):
        batch, target = [], []
        for _ in range(2):
            data, labels = cases[int(rng.integers(len(cases)))]
            start = [int(rng.integers(0, s - 64 + 1)) for s in shape]
            crop = tuple(slice(a, a + 64) for a in start)
            image = (np.clip(data[crop], CT_PROPERTIES["percentile_00_5"], CT_PROPERTIES["percentile_99_5"])
                     - CT_PROPERTIES["mean"]) / CT_PROPERTIES["std"]
            batch.append(image[None].astype(np.float32))
            target.append(labels[crop])
        out = net(torch.from_numpy(np.stack(batch)))
        out = out[0] if isinstance(out, (list, tuple)) else out
        loss = torch.nn.functional.cross_entropy(out, torch.from_numpy(np.stack(target)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 0:
            print(f"training step {step}: loss {loss.item():.3f}", file=sys.stderr)
    trained = net.state_dict()
    weights = checkpoint["network_weights"]
    for key in weights:  # nnU-Net's aliases name the same tensors (all_modules.0 is conv, .1 norm)
        source = key.replace(".all_modules.0.", ".conv.").replace(".all_modules.1.", ".norm.")
        source = source[len("decoder."):] if source.startswith("decoder.encoder.") else source
        weights[key] = trained[source].detach().clone()
    torch.save(checkpoint, checkpoint_file)
    return float(loss.item())


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{command[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def agreement(a: Path, b: Path) -> float:
    votes = [np.mean(np.asarray(nib.load(f).dataobj) == np.asarray(nib.load(b / f.name).dataobj))
             for f in sorted(a.glob("*.nii.gz"))]
    return float(min(votes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nnunet-python", default=os.environ.get("NNSLIM_NNUNET_PYTHON"))
    parser.add_argument("--cases", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs=3, default=(128, 128, 96))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--weights", choices=("trained", "random"), default="trained")
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--precision", default="auto", help="nnslim-predict-nnunet --precision (default auto)")
    parser.add_argument("--reuse-model", action="store_true",
                        help="keep the model folder and cases of the last run with these weights (no training)")
    parser.add_argument("--out", type=Path, default=None, help="[default: artifacts/bench/nnunet_predict-WEIGHTS.json]")
    args = parser.parse_args()
    suffix = args.weights if args.precision == "auto" else f"{args.weights}-{args.precision}"
    args.out = args.out or ROOT / "artifacts" / "bench" / f"nnunet_predict-{suffix}.json"
    if not args.nnunet_python:
        raise SystemExit("give --nnunet-python (a Python with nnunetv2) or set NNSLIM_NNUNET_PYTHON")
    model = OUT / "results" / "Dataset901_Bench" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    marker = OUT / f"model-{args.weights}.json"  # what the kept model folder and cases are
    reuse = args.reuse_model and marker.is_file() and json.loads(marker.read_text())["shape"] == list(args.shape)
    if reuse:
        final_loss = json.loads(marker.read_text())["final_loss"]
        for stale in [p for p in OUT.iterdir() if p.name not in ("results", "imagesTs", marker.name)]:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    else:
        shutil.rmtree(OUT, ignore_errors=True)
        write_model_folder(model, patch=[64, 64, 64], spacing=[1.0, 1.0, 1.0], features=(32, 64, 128, 256, 320),
                           n_stages=5, decoder_convs=2, dataset=DATASET)
        final_loss = train_weights(model, args.train_steps, tuple(args.shape)) if args.weights == "trained" else None
        write_cases(OUT / "imagesTs", args.cases, tuple(args.shape))
        marker.write_text(json.dumps({"shape": list(args.shape), "final_loss": final_loss}))
    env = {**os.environ, "nnUNet_results": str(OUT / "results"), "nnUNet_raw": str(OUT),
           "nnUNet_preprocessed": str(OUT), "NNSLIM_CACHE": str(OUT / "cache")}
    common = ["-i", str(OUT / "imagesTs"), "-d", "901", "-c", "3d_fullres", "-f", "0", "-device", "cpu",
              "--disable_progress_bar"]
    nnslim_cmd = [str(ROOT / ".venv" / "bin" / "nnslim-predict-nnunet"), "--precision", args.precision]
    nnunet_cmd = [args.nnunet_python, "-c", NNUNET]
    seconds: dict[str, list[float]] = {}
    agree: dict[str, float] = {}
    for tta in (True, False):
        flags = [] if tta else ["--disable_tta"]
        mode = "tta" if tta else "no_tta"
        if tta:  # cold: the engine is built (once: the no-TTA runs reuse it, as a user's would)
            seconds["nnslim cold"] = [timed([*nnslim_cmd, *common, "-o", str(OUT / "nnslim-cold")], env)]
        for round_ in range(args.rounds):
            order = ("nnunet", "nnslim") if round_ % 2 == 0 else ("nnslim", "nnunet")
            for tool in order:
                command = nnunet_cmd if tool == "nnunet" else nnslim_cmd
                out = OUT / f"{tool}-{mode}-{round_}"
                seconds.setdefault(f"{tool} {mode}", []).append(timed([*command, *common, *flags, "-o", str(out)], env))
                print(f"[{mode} {round_ + 1}/{args.rounds}] {tool}: {seconds[f'{tool} {mode}'][-1]:.1f} s", file=sys.stderr)
        agree[mode] = agreement(OUT / f"nnslim-{mode}-0", OUT / f"nnunet-{mode}-0")
    engine = next(p for p in (OUT / "cache" / "engines").iterdir() if p.is_dir())
    manifest = json.loads((engine / "manifest.json").read_text())
    chosen = f"{manifest['backend']} {manifest['precision']}"
    rows = []
    for mode in ("tta", "no_tta"):
        nnunet_s, nnslim_s = statistics.median(seconds[f"nnunet {mode}"]), statistics.median(seconds[f"nnslim {mode}"])
        rows.append({"mode": mode, "nnunet_seconds": nnunet_s, "nnslim_warm_seconds": nnslim_s,
                     "speedup_warm": nnunet_s / nnslim_s, "voxel_agreement": agree[mode]})
    cold = seconds["nnslim cold"][0]
    print(f"\n{'mode':<8}{'nnUNetv2_predict s':>20}{'nnslim warm s':>15}{'speed-up':>10}{'agreement':>11}")
    for row in rows:
        print(f"{row['mode']:<8}{row['nnunet_seconds']:>20.1f}{row['nnslim_warm_seconds']:>15.1f}"
              f"{row['speedup_warm']:>9.2f}x{row['voxel_agreement']:>11.6f}")
    print(f"nnslim cold (engine build included, TTA): {cold:.1f} s; engine chosen: {chosen}; weights: {args.weights}"
          f"{f' (final loss {final_loss:.3f})' if final_loss is not None else ''}; {args.cases} cases of "
          f"{list(args.shape)}; CPU: {cpu_name()} ({os.cpu_count()} cores)")
    record = {"cpu": {"name": cpu_name(), "cores": os.cpu_count()}, "machine": platform.machine(),
              "engine": chosen, "weights": args.weights, "final_loss": final_loss, "candidates": [
                  {k: c.get(k) for k in ("backend", "precision", "passed", "seconds_per_batch", "speedup_vs_torch")}
                  | {"argmax_agreement": (c.get("parity") or {}).get("argmax_agreement")}
                  for c in manifest["selection"]["candidates"]],
              "cases": args.cases, "shape": list(args.shape), "rounds": args.rounds,
              "nnslim_cold_seconds": cold, "seconds": seconds, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
