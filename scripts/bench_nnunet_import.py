"""Benchmark: an nnU-Net v2 model folder through nnslim, against PyTorch eager, in one run (CPU).

For each profile an nnU-Net v2 results folder is written the way nnU-Net writes one (plans.json,
dataset.json, fold_N/checkpoint_final.pth with nnU-Net's keys, aliases and value types; random
weights, so Dice against a ground truth means nothing here and is not reported). Then:
  import   read the folder (allow-listed weights-only load, rebuild, map the weights)
  build    nnslim build-engine (export, graph passes with per-pass parity, parity vs PyTorch)
  infer    the same volume through the same runtime (nnU-Net preprocessing and sliding-window
           numerics) with PyTorch eager (the usual way) and with the ONNX Runtime engine:
           seconds per case, ratio, and voxel agreement of the two label maps

Prints a table and writes artifacts/bench/nnunet_import.json.

    .venv/bin/python scripts/bench_nnunet_import.py                       # both profiles
    .venv/bin/python scripts/bench_nnunet_import.py --profiles hippocampus-like
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from nnslim.compiler.stages.nnunet_import import read_model_folder, unet_config
from nnslim.compiler.stages.pipeline import BuildConfig, build_engine
from nnslim.compiler.runtime.engine import InferenceOptions, load_engine
from nnslim.compiler.runtime.segmentation import segment_volume
from nnslim.files import write_json_atomic
from nnslim.compiler.runtime.backends.torch_module import TorchPredictor
from nnslim.compiler.runtime.volumes.volume import load_volume
from nnslim.parameters import count_parameters
from nnslim.training.unet import UNet

PROFILES = {
    # nnU-Net's plans for MSD Hippocampus (3d_fullres): small MRI crops, z-score, 5 folds, TTA
    "hippocampus-like": dict(
        patch=[40, 56, 40], spacing=[1.0, 1.0, 1.0], features=[32, 64, 128, 256],
        strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], normalization="ZScoreNormalization",
        volume=(36, 50, 35), folds=5, tta=True, labels=["background", "anterior", "posterior"],
    ),
    # nnU-Net's default 3d_fullres network for an abdominal CT task: 6 stages 32..320, 128^3 patch
    "ct-3d-fullres": dict(
        patch=[128, 128, 128], spacing=[1.0, 0.8, 0.8], features=[32, 64, 128, 256, 320, 320],
        strides=[[1, 1, 1]] + [[2, 2, 2]] * 5, normalization="CTNormalization",
        volume=(200, 200, 150), folds=1, tta=False, labels=["background", "liver", "tumour"],
    ),
}


def _plans(profile: dict) -> dict:
    n = len(profile["features"])
    kwargs = {
        "n_stages": n, "features_per_stage": profile["features"], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * n, "strides": profile["strides"], "n_conv_per_stage": [2] * n,
        "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }
    return {
        "dataset_name": "Dataset900_Bench", "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": {
            "patch_size": profile["patch"], "spacing": profile["spacing"],
            "normalization_schemes": [profile["normalization"]], "use_mask_for_norm": [False],
            "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                             "arch_kwargs": kwargs, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        }},
        "foreground_intensity_properties_per_channel": {"0": {
            "mean": 90.0, "std": 60.0, "percentile_00_5": -80.0, "percentile_99_5": 260.0,
            "min": -1000.0, "max": 2000.0, "median": 85.0}},
    }


def write_folder(root: Path, profile: dict) -> None:
    """plans.json, dataset.json and fold_N/checkpoint_final.pth as nnU-Net writes them."""
    plans = _plans(profile)
    dataset = {"channel_names": {"0": "CT" if profile["normalization"] == "CTNormalization" else "MRI"},
               "labels": {name: i for i, name in enumerate(profile["labels"])}, "file_ending": ".nii.gz"}
    root.mkdir(parents=True)
    (root / "plans.json").write_text(json.dumps(plans))
    (root / "dataset.json").write_text(json.dumps(dataset))
    config = unet_config(plans["configurations"]["3d_fullres"], 1, len(profile["labels"]))
    for fold in range(profile["folds"]):
        torch.manual_seed(fold)
        weights = UNet(config).state_dict()
        for key in [k for k in weights if k.endswith((".conv.weight", ".conv.bias", ".norm.weight", ".norm.bias"))]:
            # nnU-Net's ConvDropoutNormReLU also saves every conv and norm under all_modules.N
            prefix, module, name = key.rsplit(".", 2)
            weights[f"{prefix}.all_modules.{0 if module == 'conv' else 1}.{name}"] = weights[key]
        for key in [k for k in weights if k.startswith("encoder.")]:
            weights[f"decoder.{key}"] = weights[key]  # UNetDecoder keeps the encoder as an attribute
        (root / f"fold_{fold}").mkdir()
        torch.save({
            "network_weights": weights, "optimizer_state": None, "grad_scaler_state": None,
            "logging": {"mean_fg_dice": [np.float64(0.8)], "ema_fg_dice": [np.float64(0.8)]},
            "_best_ema": np.float64(0.8), "current_epoch": 1000,
            "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": fold, "dataset_json": dataset,
                          "device": torch.device("cpu")},
            "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2),
        }, root / f"fold_{fold}" / "checkpoint_final.pth")


def write_volume(path: Path, shape: tuple[int, int, int], spacing: list[float]) -> None:
    """A smooth random volume in the plans' intensity range; NIfTI spacing is the plans' reversed."""
    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.normal(90, 80, (1, 1, *(max(s // 8, 2) for s in shape))).astype(np.float32))
    data = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear")[0, 0].numpy()
    nib.save(nib.Nifti1Image(data, np.diag([*spacing[::-1], 1.0])), path)


def run_profile(name: str, profile: dict, workdir: Path, repeats: int) -> dict:
    folder = workdir / name / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    write_folder(folder, profile)
    volume_path = workdir / name / "case_0000.nii.gz"
    write_volume(volume_path, profile["volume"], profile["spacing"])
    folds = tuple(str(f) for f in range(profile["folds"]))

    started = time.perf_counter()
    imported = read_model_folder(folder, folds)
    import_seconds = time.perf_counter() - started
    started = time.perf_counter()
    build_engine(BuildConfig(checkpoint=folder, out_dir=workdir / name / "engine", batch_size=1, folds=folds,
                             parity_volume=volume_path, parity_tiles=2, precision="fp32"))
    build_seconds = time.perf_counter() - started

    engine = load_engine(workdir / name / "engine")
    volume = load_volume(volume_path, 1)
    options = InferenceOptions(progress=False, mirror=profile["tta"])
    torch_predictor = TorchPredictor(imported.network())
    runs = {"pytorch": [], "onnxruntime": []}
    labels = {}
    for _ in range(repeats):  # interleaved, so both see the same machine load
        for runner, predictor in (("pytorch", torch_predictor), ("onnxruntime", engine.predictor)):
            started = time.perf_counter()
            labels[runner], report = segment_volume(volume, predictor, engine.spec, options)
            tiles = report.evaluated * (8 if profile["tta"] else 1)
            runs[runner].append(time.perf_counter() - started)
    seconds = {k: float(np.median(v)) for k, v in runs.items()}
    return {
        "profile": name, "folds": profile["folds"], "tta": profile["tta"], "patch": profile["patch"],
        "volume": list(profile["volume"]), "parameters_per_fold": count_parameters(UNet(imported.architecture)),
        "checkpoint_bytes": (folder / "fold_0" / "checkpoint_final.pth").stat().st_size,
        "import_seconds": import_seconds, "build_seconds": build_seconds, "tiles": tiles,
        "pytorch_seconds": seconds["pytorch"], "onnxruntime_seconds": seconds["onnxruntime"],
        "speedup": seconds["pytorch"] / seconds["onnxruntime"],
        "voxel_agreement": float((labels["pytorch"] == labels["onnxruntime"]).mean()),
        "engine_parity": engine.manifest.parity.to_dict(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=list(PROFILES))
    parser.add_argument("--repeats", type=int, default=3, help="runs per runner (median reported)")
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench/nnunet_import.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.profiles:
            rows.append(run_profile(name, PROFILES[name], Path(tmp), args.repeats))
    print(f"\nnnU-Net v2 model folder -> nnslim engine (CPU, {os.cpu_count()} cores, torch {torch.__version__})")
    print(f"{'profile':<18}{'folds':>6}{'TTA':>5}{'params':>9}{'import s':>10}{'build s':>9}{'tiles':>7}"
          f"{'PyTorch s':>11}{'ORT s':>8}{'ratio':>7}{'agreement':>11}")
    for r in rows:
        print(f"{r['profile']:<18}{r['folds']:>6}{'on' if r['tta'] else 'off':>5}{r['parameters_per_fold'] / 1e6:>8.2f}M"
              f"{r['import_seconds']:>10.2f}{r['build_seconds']:>9.1f}{r['tiles']:>7}{r['pytorch_seconds']:>11.2f}"
              f"{r['onnxruntime_seconds']:>8.2f}{r['speedup']:>6.2f}x{r['voxel_agreement']:>11.6f}")
    write_json_atomic(args.out, {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "rows": rows})
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
