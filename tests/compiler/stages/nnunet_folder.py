"""An nnU-Net v2 model folder written the way nnU-Net writes one, and nnU-Net's inference,
re-implemented here from nnU-Net's description, independently of nnslim's code.

- `write_model_folder`: plans.json, dataset.json and fold_N/checkpoint_final.pth with nnU-Net's
  keys and value types (the state dict with its `all_modules` and `decoder.encoder` aliases,
  optimizer state, numpy scalars in the logs, `torch.device` in init_args), random weights.
- `reference_forward`: the network as functions of that state dict, driven by the plans.
- `reference_predict`: nnU-Net's predictor for a NIfTI array (axis reversal, crop to nonzero,
  CT / z-score normalization, padding, Gaussian-weighted sliding window, mirroring, fold average).
"""

from __future__ import annotations

import itertools
import json
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import binary_fill_holes, gaussian_filter

CT_PROPERTIES = {"max": 1200.0, "mean": 60.0, "median": 55.0, "min": -1000.0,
                 "percentile_00_5": -100.0, "percentile_99_5": 250.0, "std": 45.0}


def arch_kwargs(dims: int, residual: bool, features=(8, 16, 24), n_stages: int = 3, decoder_convs: int = 1) -> dict:
    strides = [[1] * dims] + [[2] * dims] * (n_stages - 1)
    kwargs = {
        "n_stages": n_stages,
        "features_per_stage": list(features[:n_stages]),
        "conv_op": f"torch.nn.modules.conv.Conv{dims}d",
        "kernel_sizes": [[3] * dims] * n_stages,
        "strides": strides,
        "n_conv_per_stage_decoder": [decoder_convs] * (n_stages - 1),
        "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    kwargs["n_blocks_per_stage" if residual else "n_conv_per_stage"] = [1, 2, 2][:n_stages] if residual else [2] * n_stages
    return kwargs


def make_plans(configuration: str, kwargs: dict, patch: list[int], spacing: list[float], residual: bool,
               normalization: str = "CTNormalization") -> dict:
    name = "ResidualEncoderUNet" if residual else "PlainConvUNet"
    return {
        "dataset_name": "Dataset999_Synthetic",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [2.0, 1.0, 1.0],
        "original_median_shape_after_transp": [40, 48, 44],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            configuration: {
                "data_identifier": f"nnUNetPlans_{configuration}",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": patch,
                "median_image_size_in_voxels": [40, 48, 44][-len(patch):],
                "spacing": spacing,
                "normalization_schemes": [normalization],
                "use_mask_for_norm": [normalization == "ZScoreNormalization"],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                       "force_separate_z": None},
                "architecture": {
                    "network_class_name": f"dynamic_network_architectures.architectures.unet.{name}",
                    "arch_kwargs": kwargs,
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": False,
            },
            "3d_cascade_fullres_dummy": {"inherits_from": configuration, "previous_stage": "none"},
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": CT_PROPERTIES},
    }


DATASET = {
    "channel_names": {"0": "CT"},
    "labels": {"background": 0, "organ": 1, "lesion": 2},
    "numTraining": 12,
    "file_ending": ".nii.gz",
}


def nnunet_state_dict(kwargs: dict, residual: bool, in_channels: int, num_outputs: int, seed: int) -> OrderedDict:
    """Random weights under nnU-Net's module names, aliases included (the same tensors)."""
    gen = torch.Generator().manual_seed(seed)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    dims = int(kwargs["conv_op"][-2])

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    def unit(prefix: str, cin: int, cout: int, kernel: list[int], bias: bool) -> None:
        weight = randn(cout, cin, *kernel, scale=math.sqrt(2.0 / (cin * math.prod(kernel))))
        sd[f"{prefix}.conv.weight"] = weight
        if bias:
            sd[f"{prefix}.conv.bias"] = randn(cout, scale=0.1)
        sd[f"{prefix}.norm.weight"] = 1 + randn(cout, scale=0.2)
        sd[f"{prefix}.norm.bias"] = randn(cout, scale=0.2)
        sd[f"{prefix}.all_modules.0.weight"] = weight  # ConvDropoutNormReLU.all_modules: [conv, norm, nonlin]
        if bias:
            sd[f"{prefix}.all_modules.0.bias"] = sd[f"{prefix}.conv.bias"]
        sd[f"{prefix}.all_modules.1.weight"] = sd[f"{prefix}.norm.weight"]
        sd[f"{prefix}.all_modules.1.bias"] = sd[f"{prefix}.norm.bias"]

    features, kernels, strides = kwargs["features_per_stage"], kwargs["kernel_sizes"], kwargs["strides"]
    bias = kwargs["conv_bias"]
    channels = in_channels
    if residual:
        unit("encoder.stem.convs.0", channels, features[0], kernels[0], bias)
        channels = features[0]
        for s, n in enumerate(kwargs["n_blocks_per_stage"]):
            for b in range(n):
                p = f"encoder.stages.{s}.blocks.{b}"
                stride = strides[s] if b == 0 else [1] * dims
                unit(f"{p}.conv1", channels, features[s], kernels[s], bias)
                unit(f"{p}.conv2", features[s], features[s], kernels[s], bias)
                if channels != features[s]:
                    index = 1 if any(v != 1 for v in stride) else 0
                    unit(f"{p}.skip.{index}", channels, features[s], [1] * dims, False)
                channels = features[s]
    else:
        for s, n in enumerate(kwargs["n_conv_per_stage"]):
            for i in range(n):
                unit(f"encoder.stages.{s}.0.convs.{i}", channels if i == 0 else features[s], features[s], kernels[s], bias)
            channels = features[s]
    encoder_keys = [k for k in sd if k.startswith("encoder.")]
    for s in range(1, len(features)):
        below, skip = features[-s], features[-(s + 1)]
        sd[f"decoder.transpconvs.{s - 1}.weight"] = randn(below, skip, *strides[-s], scale=math.sqrt(1.0 / below))
        sd[f"decoder.transpconvs.{s - 1}.bias"] = randn(skip, scale=0.1)
        for i in range(kwargs["n_conv_per_stage_decoder"][s - 1]):
            unit(f"decoder.stages.{s - 1}.convs.{i}", 2 * skip if i == 0 else skip, skip, kernels[-(s + 1)], bias)
        sd[f"decoder.seg_layers.{s - 1}.weight"] = randn(num_outputs, skip, *[1] * dims, scale=math.sqrt(1.0 / skip))
        sd[f"decoder.seg_layers.{s - 1}.bias"] = randn(num_outputs, scale=0.1)
    for key in encoder_keys:  # UNetDecoder keeps a reference to the encoder
        sd[f"decoder.{key}"] = sd[key]
    return sd


def reference_forward(x: torch.Tensor, sd: dict, kwargs: dict, residual: bool) -> torch.Tensor:
    """The network as plain functions of the state dict (nnU-Net's forward, full-resolution head)."""
    dims = int(kwargs["conv_op"][-2])
    conv = {2: F.conv2d, 3: F.conv3d}[dims]
    transposed = {2: F.conv_transpose2d, 3: F.conv_transpose3d}[dims]
    avg_pool = {2: F.avg_pool2d, 3: F.avg_pool3d}[dims]

    def unit(x, prefix, stride, act=True):
        weight = sd[f"{prefix}.conv.weight"]
        padding = [(k - 1) // 2 for k in weight.shape[2:]]
        x = conv(x, weight, sd.get(f"{prefix}.conv.bias"), stride, padding)
        x = F.instance_norm(x, weight=sd[f"{prefix}.norm.weight"], bias=sd[f"{prefix}.norm.bias"], eps=1e-5)
        return F.leaky_relu(x, 0.01) if act else x

    strides, skips = kwargs["strides"], []
    if residual:
        x = unit(x, "encoder.stem.convs.0", 1)
        for s, n in enumerate(kwargs["n_blocks_per_stage"]):
            for b in range(n):
                p = f"encoder.stages.{s}.blocks.{b}"
                stride = strides[s] if b == 0 else 1
                residual_x = x
                if b == 0 and any(v != 1 for v in strides[s]):
                    residual_x = avg_pool(residual_x, strides[s], strides[s])
                projection = [k for k in sd if k.startswith(f"{p}.skip.") and k.endswith(".conv.weight")]
                if projection:
                    residual_x = unit(residual_x, projection[0][: -len(".conv.weight")], 1, act=False)
                out = unit(unit(x, f"{p}.conv1", stride), f"{p}.conv2", 1, act=False)
                x = F.leaky_relu(out + residual_x, 0.01)
            skips.append(x)
    else:
        for s, n in enumerate(kwargs["n_conv_per_stage"]):
            for i in range(n):
                x = unit(x, f"encoder.stages.{s}.0.convs.{i}", strides[s] if i == 0 else 1)
            skips.append(x)
    x = skips[-1]
    for s in range(len(skips) - 1):
        stride = strides[-(s + 1)]
        x = transposed(x, sd[f"decoder.transpconvs.{s}.weight"], sd[f"decoder.transpconvs.{s}.bias"], stride)
        x = torch.cat((x, skips[-(s + 2)]), 1)
        for i in range(kwargs["n_conv_per_stage_decoder"][s]):
            x = unit(x, f"decoder.stages.{s}.convs.{i}", 1)
    last = len(skips) - 2
    return conv(x, sd[f"decoder.seg_layers.{last}.weight"], sd[f"decoder.seg_layers.{last}.bias"])


def checkpoint_dict(sd: dict, plans: dict, configuration: str, fold: int, mirror_axes: tuple) -> dict:
    """What nnUNetTrainer.save_checkpoint writes, with the same value types."""
    first = next(iter(sd.values()))
    return {
        "network_weights": sd,
        "optimizer_state": {
            "state": {0: {"momentum_buffer": torch.zeros_like(first)}},
            "param_groups": [{"lr": 0.01, "momentum": 0.99, "dampening": 0, "weight_decay": 3e-05, "nesterov": True,
                              "maximize": False, "foreach": None, "differentiable": False, "fused": None,
                              "params": [0]}],
        },
        "grad_scaler_state": None,
        "logging": {
            "mean_fg_dice": [np.float64(0.41), np.float64(0.52)],
            "ema_fg_dice": [np.float64(0.41), np.float64(0.42)],
            "dice_per_class_or_region": [[np.float64(0.3), np.float64(0.5)], [np.float64(0.4), np.float64(0.6)]],
            "train_losses": [np.float32(-0.2), np.float32(-0.3)],
            "val_losses": [np.float32(-0.1), np.float32(-0.2)],
            "lrs": [0.01, 0.0099],
            "epoch_start_timestamps": [1.7e9, 1.7e9 + 60],
            "epoch_end_timestamps": [1.7e9 + 59, 1.7e9 + 119],
        },
        "_best_ema": np.float64(0.42),
        "current_epoch": 2,
        "init_args": {"plans": plans, "configuration": configuration, "fold": fold, "dataset_json": DATASET,
                      "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": mirror_axes,
    }


def write_model_folder(root: Path, *, dims: int = 3, residual: bool = False, folds=(0,), patch=None,
                       spacing=None, mirror_axes=None, normalization: str = "CTNormalization",
                       decisive: float = 1.0, features=(8, 16, 24), n_stages: int = 3, decoder_convs: int = 1,
                       dataset: dict | None = None) -> dict:
    """Write `root` as an nnU-Net results folder; returns what the test needs to check it.
    `decisive` scales the segmentation heads, so that argmax is rarely a near-tie (random weights
    otherwise give classes within 1% of each other, where nnU-Net's fp16 accumulator decides)."""
    configuration = "2d" if dims == 2 else "3d_fullres"
    patch = patch or ([32, 32] if dims == 2 else [16, 24, 24])
    spacing = spacing or ([1.0, 1.0] if dims == 2 else [2.0, 1.0, 1.0])
    mirror_axes = tuple(range(dims)) if mirror_axes is None else mirror_axes
    kwargs = arch_kwargs(dims, residual, features, n_stages, decoder_convs)
    plans = make_plans(configuration, kwargs, patch, spacing, residual, normalization)
    root.mkdir(parents=True, exist_ok=True)
    (root / "plans.json").write_text(json.dumps(plans, indent=2))
    (root / "dataset.json").write_text(json.dumps(dataset or DATASET, indent=2))
    weights = {}
    for fold in folds:
        sd = nnunet_state_dict(kwargs, residual, 1, 3, seed=100 + fold)
        for key in [k for k in sd if k.startswith("decoder.seg_layers.")]:
            sd[key] = sd[key] * decisive
        (root / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(checkpoint_dict(sd, plans, configuration, fold, mirror_axes),
                   root / f"fold_{fold}" / "checkpoint_final.pth")
        weights[fold] = sd
    return {"kwargs": kwargs, "plans": plans, "weights": weights, "residual": residual, "patch": patch,
            "mirror_axes": mirror_axes, "configuration": configuration}


def write_cascade(dataset_dir: Path, *, folds=(0,), lowres_spacing=(4.0, 2.0, 2.0), decisive: float = 8.0) -> dict:
    """Two model folders of one plans.json, as nnU-Net writes a cascade: `3d_lowres` (its own
    spacing, `next_stage`) and `3d_cascade_fullres` (inherits 3d_fullres, `previous_stage`, one more
    input channel per foreground label), random weights; returns the folders."""
    kwargs = arch_kwargs(3, False)
    plans = make_plans("3d_fullres", kwargs, [16, 24, 24], [2.0, 1.0, 1.0], False)
    configurations = plans["configurations"]
    del configurations["3d_cascade_fullres_dummy"]
    configurations["3d_lowres"] = {**configurations["3d_fullres"], "data_identifier": "nnUNetPlans_3d_lowres",
                                   "spacing": list(lowres_spacing), "next_stage": "3d_cascade_fullres"}
    configurations["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    folders = {}
    for configuration, channels in (("3d_lowres", 1), ("3d_cascade_fullres", 1 + 2)):
        root = dataset_dir / f"nnUNetTrainer__nnUNetPlans__{configuration}"
        root.mkdir(parents=True, exist_ok=True)
        (root / "plans.json").write_text(json.dumps(plans, indent=2))
        (root / "dataset.json").write_text(json.dumps(DATASET, indent=2))
        for fold in folds:
            sd = nnunet_state_dict(kwargs, False, channels, 3, seed=200 + fold + 10 * channels)
            for key in [k for k in sd if k.startswith("decoder.seg_layers.")]:
                sd[key] = sd[key] * decisive
            (root / f"fold_{fold}").mkdir(exist_ok=True)
            torch.save(checkpoint_dict(sd, plans, configuration, fold, (0, 1, 2)),
                       root / f"fold_{fold}" / "checkpoint_final.pth")
        folders[configuration] = root
    return folders


# ---- nnU-Net's predictor, for one 3D NIfTI array, written from nnU-Net v2's description ----

def _steps(image_size, patch, step=0.5):
    out = []
    for size, p in zip(image_size, patch):
        n = int(np.ceil((size - p) / (p * step))) + 1
        actual = (size - p) / (n - 1) if n > 1 else 99999999999
        out.append([int(np.round(actual * i)) for i in range(n)])
    return out


def _gaussian(patch):
    tmp = np.zeros(patch)
    tmp[tuple(p // 2 for p in patch)] = 1
    g = gaussian_filter(tmp, [p / 8 for p in patch], 0, mode="constant", cval=0)
    g = g / (g.max() / 10)
    g[g == 0] = g[g != 0].min()
    return torch.from_numpy(g).float()


def reference_predict(nifti_array: np.ndarray, folder_info: dict, use_tta: bool = True) -> np.ndarray:
    """nnU-Net's prediction of a 3D full-resolution model for one single-channel NIfTI array."""
    kwargs, residual, patch = folder_info["kwargs"], folder_info["residual"], folder_info["patch"]
    data = nifti_array.astype(np.float32).transpose(2, 1, 0)[None]  # SimpleITK axis order, one channel
    mask = binary_fill_holes(data[0] != 0)
    where = np.argwhere(mask)
    lo, hi = where.min(0), where.max(0) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    cropped = data[(slice(None), *box)].copy()
    image = cropped[0]  # CTNormalization
    np.clip(image, CT_PROPERTIES["percentile_00_5"], CT_PROPERTIES["percentile_99_5"], out=image)
    image -= CT_PROPERTIES["mean"]
    image /= max(CT_PROPERTIES["std"], 1e-8)
    x = torch.from_numpy(cropped)
    pads, region = [], []
    for size, p in zip(x.shape[1:], patch):
        before = max(p - size, 0) // 2
        after = max(p - size, 0) - before
        pads.append((before, after))
        region.append(slice(before, before + size))
    x = F.pad(x, [v for pair in reversed(pads) for v in pair])
    gaussian = _gaussian(patch)
    logits = torch.zeros((3, *x.shape[1:]))
    counts = torch.zeros(x.shape[1:])
    axes = folder_info["mirror_axes"] if use_tta else ()
    combos = [c for r in range(1, len(axes) + 1) for c in itertools.combinations([a + 2 for a in axes], r)]
    with torch.no_grad():
        for start in itertools.product(*_steps(x.shape[1:], patch)):
            sl = tuple(slice(s, s + p) for s, p in zip(start, patch))
            tile = x[(slice(None), *sl)][None]
            fold_sum = 0
            for sd in folder_info["weights"].values():
                prediction = reference_forward(tile, sd, kwargs, residual)
                for combo in combos:
                    prediction += torch.flip(reference_forward(torch.flip(tile, combo), sd, kwargs, residual), combo)
                fold_sum = fold_sum + prediction / (len(combos) + 1)
            logits[(slice(None), *sl)] += fold_sum[0] / len(folder_info["weights"]) * gaussian
            counts[sl] += gaussian
    logits = (logits / counts)[(slice(None), *region)]
    labels = np.zeros(data.shape[1:], dtype=np.uint8)
    labels[box] = logits.argmax(0).numpy()
    return labels.transpose(2, 1, 0)
