"""Import a trained nnU-Net v2 model folder, without the `nnunetv2` package.

A results folder (`nnUNet_results/DatasetXXX/Trainer__Plans__Configuration`) holds
`dataset.json`, `plans.json` and `fold_N/checkpoint_final.pth` (or `checkpoint_best.pth`). A
checkpoint is a dict: `network_weights` (the state dict), `init_args` (with `configuration`),
`trainer_name`, `inference_allowed_mirroring_axes`, plus optimizer state and training logs.

What this module does:
- loads checkpoints safely (`nnunet_checkpoint`: weights only, an allow-list of globals);
- rebuilds the network from the plans (`nnunet_plans`: `PlainConvUNet` or `ResidualEncoderUNet`,
  2D or 3D) as an nnslim `UNet` and maps the state dict onto it strictly (`nnunet_checkpoint`);
- turns several folds into one network averaging their logits (nnU-Net's ensemble), and a 2D
  network into one that takes `[B, C, 1, H, W]` tiles, so the runtime always walks 3D windows;
- describes preprocessing (axis order, transpose, crop to nonzero, per-channel normalization,
  spacing), mirroring and label/region postprocessing as plain data for the engine manifest.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnslim.compiler.runtime.manifest.schema import MAX_CHANNELS, MAX_CLASSES, parse_json
from nnslim.compiler.stages.nnunet_checkpoint import NnUNetImportError, load_checkpoint, map_state_dict
from nnslim.compiler.stages.nnunet_plans import (
    check_configuration,
    resampling_rule,
    resolve_configuration,
    unet_config,
)
from nnslim.training.config import UNetConfig
from nnslim.training.unet import UNet

__all__ = ["NnUNetImportError", "NnUNetModel", "is_model_folder", "load_checkpoint", "read_model_folder", "unet_config"]

CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth")  # nnU-Net's own; -chk takes any file name
# nnU-Net's intensity normalization classes -> the runtime's per-channel scheme names
NORMALIZATIONS = {
    "CTNormalization": "ct",
    "ZScoreNormalization": "zscore",
    "NoNormalization": "none",
    "RescaleTo01Normalization": "rescale01",
    "RGBTo01Normalization": "rgb01",
}
# image readers whose arrays are the NIfTI voxel array with its axes reversed (SimpleITK order)
READERS = ("SimpleITKIO", "NibabelIO")

logger = logging.getLogger(__name__)


class FoldEnsemble(nn.Module):
    """The mean of several folds' logits (nnU-Net averages logits over folds)."""

    def __init__(self, folds: list[nn.Module]) -> None:
        super().__init__()
        self.folds = nn.ModuleList(folds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = self.folds[0](x)
        for fold in self.folds[1:]:
            total = total + fold(x)
        return total / len(self.folds)


class SliceNetwork(nn.Module):
    """A 2D network driven with `[B, C, 1, H, W]` tiles: one slice along the first image axis."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x.squeeze(2)).unsqueeze(2)


@dataclass
class LabelScheme:
    """Output heads and how logits become a label map (nnU-Net's LabelManager, for inference)."""

    head_names: list[str]
    regions_class_order: list[int] | None = None  # region-based training: sigmoid heads
    label_values: list[int] | None = None  # region-based: every foreground label value of the dataset

    @classmethod
    def from_dataset(cls, dataset: dict[str, Any]) -> LabelScheme:
        labels = dataset.get("labels")
        if not isinstance(labels, dict) or not labels:
            raise NnUNetImportError("dataset.json has no 'labels' mapping")
        labels = {k: _label_values(k, v) for k, v in labels.items() if k != "ignore"}
        if len(labels) > MAX_CLASSES:
            raise NnUNetImportError(f"dataset.json has {len(labels)} labels; nnslim writes uint8 label maps, so at "
                                    f"most {MAX_CLASSES}")
        region_based = any(len(v) > 1 for v in labels.values())
        if not region_based:
            values = {name: v[0] for name, v in labels.items()}
            ordered = sorted(values, key=values.get)
            if [values[n] for n in ordered] != list(range(len(ordered))):
                raise NnUNetImportError(f"dataset.json labels must be consecutive from 0, got {values}")
            return cls(head_names=ordered)
        order = dataset.get("regions_class_order")
        heads = [name for name, v in labels.items() if v != [0]]
        if not isinstance(order, list) or len(order) != len(heads):
            raise NnUNetImportError(
                f"region-based labels need 'regions_class_order' with one entry per region ({len(heads)}), got {order}"
            )
        known = sorted({value for v in labels.values() for value in v} - {0})
        if not all(type(c) is int and c in known for c in order):
            raise NnUNetImportError(f"dataset.json: `regions_class_order` is {order}, expected label values of the "
                                    f"dataset's regions ({known}), one per region; fix dataset.json")
        return cls(head_names=heads, regions_class_order=order, label_values=known)

    @property
    def foreground(self) -> list[int]:
        """nnU-Net's `foreground_labels`: every label value but background (a cascade's input channels)."""
        return list(self.label_values) if self.label_values else list(range(1, len(self.head_names)))

    def to_manifest(self) -> dict[str, Any]:
        if self.regions_class_order is None:
            return {"kind": "argmax"}
        return {"kind": "regions", "class_order": self.regions_class_order, "threshold_logit": 0.0,
                "label_values": self.label_values}


def _label_values(name: str, value: Any) -> list[int]:
    """A dataset.json label's value(s): an int, or a list of ints for a region (nnU-Net's two forms)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values or not all(type(v) is int and 0 <= v <= MAX_CLASSES for v in values):
        raise NnUNetImportError(f"dataset.json: label {name!r} is {value!r:.60}, expected a label value in "
                                f"[0, {MAX_CLASSES}] or a list of them (a region); fix dataset.json")
    return list(values)


@dataclass
class NnUNetModel:
    """An nnU-Net v2 model folder, read and checked."""

    folder: Path
    configuration_name: str
    configuration: dict[str, Any]
    plans: dict[str, Any]
    dataset: dict[str, Any]
    architecture: UNetConfig
    labels: LabelScheme
    folds: dict[str, dict[str, torch.Tensor]]  # fold name -> mapped state dict
    trainer: str
    mirror_axes: tuple[int, ...]  # in the network's spatial axes
    checkpoint_files: dict[str, Path] = field(default_factory=dict)

    @property
    def spatial_dims(self) -> int:
        return self.architecture.spatial_dims

    @property
    def previous_stage(self) -> str | None:
        """A cascade stage's previous configuration (`3d_lowres` for `3d_cascade_fullres`), else None."""
        return self.configuration.get("previous_stage") or None

    @property
    def image_channels(self) -> int:
        """The dataset's image channels (a cascade's network also takes the previous stage's labels)."""
        return self.architecture.in_channels - (len(self.labels.foreground) if self.previous_stage else 0)

    def network(self) -> nn.Module:
        """The deployable network: `[B, C, *patch3d] -> [B, K, *patch3d]`, folds averaged."""
        nets = []
        for name, weights in self.folds.items():
            net = UNet(self.architecture)
            net.load_state_dict(weights, strict=True)
            nets.append(net.eval())
        network: nn.Module = nets[0] if len(nets) == 1 else FoldEnsemble(nets)
        return SliceNetwork(network).eval() if self.spatial_dims == 2 else network

    @property
    def patch_size(self) -> tuple[int, int, int]:
        patch = tuple(int(p) for p in self.configuration["patch_size"])
        return (1, *patch) if self.spatial_dims == 2 else patch  # type: ignore[return-value]

    @property
    def total_stride(self) -> tuple[int, int, int]:
        stride = self.architecture.total_stride
        return (1, *stride) if self.spatial_dims == 2 else stride  # type: ignore[return-value]

    def window_mirror_axes(self) -> list[int]:
        """Mirror axes in the runtime's 3D window (a 2D network's axes shift by one)."""
        return [a + 1 for a in self.mirror_axes] if self.spatial_dims == 2 else list(self.mirror_axes)

    def normalization(self) -> dict[str, Any]:
        schemes = self.configuration.get("normalization_schemes") or []
        use_mask = self.configuration.get("use_mask_for_norm") or [False] * len(schemes)
        properties = self.plans.get("foreground_intensity_properties_per_channel") or {}
        channels = []
        for c, scheme in enumerate(schemes):
            if scheme not in NORMALIZATIONS:
                raise NnUNetImportError(
                    f"normalization {scheme!r} (channel {c}) is not supported; nnslim knows {sorted(NORMALIZATIONS)}"
                )
            entry: dict[str, Any] = {"scheme": NORMALIZATIONS[scheme]}
            if scheme == "CTNormalization":
                stats = _ct_statistics(properties, c)
                entry.update(clip=[stats["percentile_00_5"], stats["percentile_99_5"]], mean=stats["mean"],
                             std=stats["std"])
            if scheme == "ZScoreNormalization":
                entry["mask"] = "nonzero-region" if use_mask[c] else "none"
            channels.append(entry)
        if len(channels) != self.image_channels:
            raise NnUNetImportError(
                f"plans.json gives {len(channels)} normalization schemes but the dataset has "
                f"{self.image_channels} channels"
            )
        return {"scheme": "per-channel", "channels": channels}

    def preprocessing(self) -> dict[str, Any]:
        """The manifest's preprocessing entry (see `nnslim.compiler.runtime.preprocessing`)."""
        return {
            "normalization": self.normalization(),
            "spacing": [float(s) for s in self.configuration["spacing"]],
            "mirror_axes": self.window_mirror_axes(),
            "axis_order": "reversed",  # nnU-Net's arrays are the NIfTI voxel array with axes reversed
            "transpose_forward": _permutation(self.plans, "transpose_forward"),
            "transpose_backward": _permutation(self.plans, "transpose_backward"),
            "crop_to_nonzero": True,
            "resample": True,
            "tta_default": bool(self.mirror_axes),
            "image_reader_writer": self.plans.get("image_reader_writer", "SimpleITKIO"),  # nnU-Net's .pkl form
            **({"resampling": rule} if (rule := resampling_rule(self.configuration)) else {}),
            **({"previous_stage": {"configuration": self.previous_stage, "labels": self.labels.foreground}}
               if self.previous_stage else {}),
        }

    def metadata(self) -> dict[str, Any]:
        """What the build pipeline needs, in the shape of an nnslim checkpoint's metadata."""
        return {
            "patch_size": list(self.patch_size),
            "spacing": [float(s) for s in self.configuration["spacing"]],
            "normalization": self.normalization(),
            "label_names": self.labels.head_names,
            "mirror_axes": self.window_mirror_axes(),
            "dataset": {"name": self.dataset.get("name") or self.plans.get("dataset_name")},
        }


def _ct_statistics(properties: Any, channel: int) -> dict[str, float]:
    """The intensity statistics CT normalization of `channel` uses, as finite numbers, or an error naming them."""
    key = f"foreground_intensity_properties_per_channel.{channel}"
    stats = properties.get(str(channel)) if isinstance(properties, dict) else None
    if not stats:
        raise NnUNetImportError(f"CT normalization of channel {channel} needs its intensity statistics, "
                                "which plans.json lacks (foreground_intensity_properties_per_channel)")
    names = ("percentile_00_5", "percentile_99_5", "mean", "std")
    values = {n: stats.get(n) for n in names} if isinstance(stats, dict) else {}
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                             for v in values.values()):
        raise NnUNetImportError(f"plans.json: `{key}` is {stats!r:.120}, expected numbers for {', '.join(names)}; "
                                "the plans are damaged (use the plans.json nnU-Net wrote beside the folds)")
    if values["percentile_00_5"] > values["percentile_99_5"] or values["std"] < 0:
        raise NnUNetImportError(f"plans.json: `{key}` clips to [{values['percentile_00_5']}, "
                                f"{values['percentile_99_5']}] with std {values['std']}: the lower percentile must not "
                                "exceed the upper one and std must not be negative (every voxel would get one value); "
                                "the plans are damaged (use the plans.json nnU-Net wrote beside the folds)")
    return {n: float(v) for n, v in values.items()}


def _read_json(path: Path) -> dict[str, Any]:
    """plans.json or dataset.json as an object (`schema.parse_json` names what is wrong with the text)."""
    if not path.is_file():
        raise NnUNetImportError(f"{path.name} not found in {path.parent}; is this an nnU-Net v2 model folder?")
    value = parse_json(path.read_bytes(), path, NnUNetImportError,
                       f"use the {path.name} nnU-Net wrote beside the folds")
    if not isinstance(value, dict):
        raise NnUNetImportError(f"{path} holds a JSON {type(value).__name__}, not an object; it is not nnU-Net's "
                                f"{path.name} (use the one nnU-Net wrote beside the folds)")
    return value


def _permutation(plans: dict[str, Any], key: str) -> list[int]:
    """`transpose_forward` / `transpose_backward`: an order of the axes 0, 1, 2 (identity when absent)."""
    value = plans.get(key, [0, 1, 2])
    if not isinstance(value, list) or sorted(value) != [0, 1, 2] or not all(type(a) is int for a in value):
        raise NnUNetImportError(f"plans.json: `{key}` is {value!r:.60}, expected an order of the axes 0, 1, 2 "
                                "(e.g. [0, 1, 2]); the plans are damaged")
    return value


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "plans.json").is_file() and (path / "dataset.json").is_file()


def check_checkpoint_name(name: str) -> str:
    """A checkpoint file name (nnU-Net's `-chk`: any file in the fold folder), never a path."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise NnUNetImportError(f"checkpoint name {name!r} must be a file name inside each fold folder (e.g. "
                                f"{CHECKPOINT_NAMES[0]}, {CHECKPOINT_NAMES[1]}), not a path")
    return name


def available_folds(folder: Path, checkpoint_name: str = "checkpoint_final.pth") -> tuple[str, ...]:
    """nnslim's default folds: every `fold_N` holding the checkpoint, in order; `all` when there is no
    numbered one. An error names what is there when there is neither."""
    folder = Path(folder)
    check_checkpoint_name(checkpoint_name)
    numbered = sorted((int(m.group(1)) for p in folder.glob("fold_*")
                       if (m := re.fullmatch(r"fold_(\d+)", p.name)) and (p / checkpoint_name).is_file()))
    if numbered:
        return tuple(str(n) for n in numbered)
    if (folder / "fold_all" / checkpoint_name).is_file():
        return ("all",)
    present = sorted(p.name for p in folder.glob("fold_*") if p.is_dir())
    raise NnUNetImportError(f"{folder.name} has no fold folder holding {checkpoint_name} (fold folders: "
                            f"{present or 'none'}); train a fold, or pass the checkpoint name its folds hold")


def _fold_checkpoints(folder: Path, folds: tuple[str, ...], checkpoint_name: str) -> tuple[dict, dict]:
    """Each fold's checkpoint (loaded weights-only) and its file, or an error naming what is there."""
    checkpoints, files = {}, {}
    for fold in folds:
        fold_dir = folder / f"fold_{fold}"
        path = fold_dir / checkpoint_name
        if not path.is_file():
            present = sorted(p.name for p in folder.glob("fold_*") if p.is_dir())
            raise NnUNetImportError(
                f"fold {fold!r}: {path} not found (folds present: {present or 'none'}; "
                f"checkpoints in fold_{fold}: {sorted(p.name for p in fold_dir.glob('*.pth')) if fold_dir.is_dir() else 'none'})"
            )
        checkpoints[fold], files[fold] = load_checkpoint(path), path
    return checkpoints, files


def read_model_folder(
    folder: str | Path, folds: tuple[str, ...] | None = None, checkpoint_name: str = "checkpoint_final.pth"
) -> NnUNetModel:
    """Read and check an nnU-Net v2 model folder; `folds` like ("0", "1") or ("all",), None: every
    fold it has (`available_folds`); `checkpoint_name` any file name in the fold folders."""
    folder = Path(folder)
    plans, dataset = _read_json(folder / "plans.json"), _read_json(folder / "dataset.json")
    check_checkpoint_name(checkpoint_name)
    if folds is None:
        folds = available_folds(folder, checkpoint_name)
        logger.warning("folds: %s (every fold of %s holding %s)", " ".join(folds), folder.name, checkpoint_name)
    if not folds:
        raise NnUNetImportError("give at least one fold")
    reader = plans.get("image_reader_writer", "SimpleITKIO")
    if reader not in READERS:
        raise NnUNetImportError(
            f"the model was trained with image reader {reader!r}; nnslim reproduces {READERS} (NIfTI without "
            "reorientation). Other readers change the array axes and are not supported yet."
        )
    channels = dataset.get("channel_names") or dataset.get("modality")
    if not channels:
        raise NnUNetImportError("dataset.json has no 'channel_names'")
    if not isinstance(channels, (dict, list)) or len(channels) > MAX_CHANNELS:
        raise NnUNetImportError(f"dataset.json: `channel_names` is {channels!r:.80}, expected an object naming each "
                                f"input channel ({{\"0\": \"CT\"}}), at most {MAX_CHANNELS}; fix dataset.json")
    for key in ("transpose_forward", "transpose_backward"):
        _permutation(plans, key)
    labels = LabelScheme.from_dataset(dataset)
    checkpoints, files = _fold_checkpoints(folder, folds, checkpoint_name)
    first = checkpoints[folds[0]]
    configuration_name = first["init_args"].get("configuration")
    trainer = str(first.get("trainer_name", "unknown"))
    for fold, checkpoint in checkpoints.items():
        if checkpoint["init_args"].get("configuration") != configuration_name:
            raise NnUNetImportError(
                f"fold {fold} was trained as configuration {checkpoint['init_args'].get('configuration')!r}, "
                f"fold {folds[0]} as {configuration_name!r}; an ensemble needs one configuration"
            )
    configuration = resolve_configuration(plans, configuration_name)
    previous = configuration.get("previous_stage")
    if previous and previous not in (plans.get("configurations") or {}):
        raise NnUNetImportError(f"configuration {configuration_name!r} is a cascade stage after {previous!r}, which "
                                "plans.json does not define; the plans are damaged")
    extra = len(labels.foreground) if previous else 0  # a cascade also takes the previous stage's labels
    architecture = unet_config(configuration, len(channels) + extra, len(labels.head_names))
    check_configuration(configuration, configuration_name, architecture.spatial_dims, len(channels))
    reference = UNet(architecture)
    mapped = {fold: map_state_dict(c["network_weights"], reference, str(files[fold])) for fold, c in checkpoints.items()}
    axes = first.get("inference_allowed_mirroring_axes")
    mirror_axes = tuple(int(a) for a in axes) if axes else ()
    if any(a >= architecture.spatial_dims for a in mirror_axes):
        raise NnUNetImportError(f"mirroring axes {mirror_axes} do not fit a {architecture.spatial_dims}D network")
    return NnUNetModel(
        folder=folder, configuration_name=configuration_name, configuration=configuration, plans=plans,
        dataset=dataset, architecture=architecture, labels=labels, folds=mapped, trainer=trainer,
        mirror_axes=mirror_axes, checkpoint_files=files,
    )
