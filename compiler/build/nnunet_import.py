"""Import a trained nnU-Net v2 model folder, without the `nnunetv2` package.

A results folder (`nnUNet_results/DatasetXXX/Trainer__Plans__Configuration`) holds
`dataset.json`, `plans.json` and `fold_N/checkpoint_final.pth` (or `checkpoint_best.pth`). A
checkpoint is a dict: `network_weights` (the state dict), `init_args` (with `configuration`),
`trainer_name`, `inference_allowed_mirroring_axes`, plus optimizer state and training logs.

What this module does:
- loads checkpoints with `torch.load(weights_only=True)` and an explicit allow-list (numpy scalars,
  arrays and dtypes, `torch.device`); a checkpoint holding any other global is refused before
  anything is unpickled;
- rebuilds the network from the plans (`PlainConvUNet` or `ResidualEncoderUNet`, 2D or 3D) as an
  nnslim `UNet` and maps the state dict onto it strictly (nnU-Net saves every conv twice, as
  `...convs.0.conv.weight` and `...convs.0.all_modules.0.weight`, and the whole encoder a second
  time under `decoder.encoder.`; those aliases are checked to be copies and dropped);
- turns several folds into one network averaging their logits (nnU-Net's ensemble), and a 2D
  network into one that takes `[B, C, 1, H, W]` tiles, so the runtime always walks 3D windows;
- describes preprocessing (axis order, transpose, crop to nonzero, per-channel normalization,
  spacing), mirroring and label/region postprocessing as plain data for the engine manifest.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nnslim.compiler.runtime.errors import NnslimError
from nnslim.training.config import ConfigError, UNetConfig
from nnslim.training.unet import UNet

CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth")
ARCHITECTURES = ("PlainConvUNet", "ResidualEncoderUNet")
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


class NnUNetImportError(NnslimError):
    """A model folder or checkpoint that nnslim cannot import (or will not, for safety)."""


def _allowed_globals() -> list[Any]:
    """What nnU-Net checkpoints legitimately pickle besides tensors and containers."""
    multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray  # numpy 2 / numpy 1
    scalar, reconstruct = multiarray.scalar, multiarray._reconstruct
    dtype_classes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType") and n[0].isupper()]
    return [
        scalar, (scalar, "numpy.core.multiarray.scalar"),  # numpy 2 and numpy 1 spellings
        reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray, np.dtype, *dtype_classes,
        torch.device,
    ]


def _allowed_names() -> set[str]:
    names = set()
    for item in _allowed_globals():
        if isinstance(item, tuple):
            names.add(item[1])
        else:
            names.add(f"{item.__module__}.{item.__qualname__}")
    return names


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read an nnU-Net checkpoint safely (see module docstring) and check its entries."""
    if not path.is_file():
        raise NnUNetImportError(f"checkpoint not found: {path}")
    try:
        found = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception as exc:  # not a zip-format torch file
        raise NnUNetImportError(f"cannot read {path} as a torch checkpoint ({type(exc).__name__}: {exc})") from exc
    refused = sorted(found - _allowed_names())
    if refused:
        raise NnUNetImportError(
            f"refusing to load {path}: it pickles {', '.join(refused)}, which is outside the allow-list for "
            "nnU-Net checkpoints (numpy scalars/arrays/dtypes, torch.device). Unpickling it could run "
            "arbitrary code. If you trust the file, re-save just its 'network_weights', 'init_args' and "
            "'inference_allowed_mirroring_axes' with plain types."
        )
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise NnUNetImportError(f"cannot load {path} with weights_only=True: {str(exc).splitlines()[0][:300]}") from exc
    if not isinstance(checkpoint, dict):
        raise NnUNetImportError(f"{path} holds a {type(checkpoint).__name__}, not an nnU-Net checkpoint dict")
    missing = [k for k in ("network_weights", "init_args") if k not in checkpoint]
    if missing:
        raise NnUNetImportError(f"{path} lacks {missing}; is it an nnU-Net v2 checkpoint (checkpoint_final.pth)?")
    return checkpoint


def resolve_configuration(plans: dict[str, Any], name: str) -> dict[str, Any]:
    """A configuration from plans.json with its `inherits_from` chain applied."""
    configurations = plans.get("configurations", {})
    chain, current = [], name
    while current is not None:
        if current not in configurations:
            raise NnUNetImportError(
                f"configuration {current!r} is not in plans.json (it has {sorted(configurations)})"
            )
        if current in chain:
            raise NnUNetImportError(f"plans.json configurations inherit in a cycle: {chain + [current]}")
        chain.append(current)
        current = configurations[current].get("inherits_from")
    resolved: dict[str, Any] = {}
    for entry in reversed(chain):
        resolved.update(configurations[entry])
    resolved.pop("inherits_from", None)
    return resolved


def _per_stage(value: Any, n: int, dims: int) -> tuple[tuple[int, ...], ...]:
    """nnU-Net accepts an int, a list of ints or a list of lists for kernels and strides."""
    if isinstance(value, int):
        value = [value] * n
    return tuple((int(v),) * dims if isinstance(v, int) else tuple(int(x) for x in v) for v in value)


def _counts(value: Any, n: int) -> tuple[int, ...]:
    return (int(value),) * n if isinstance(value, int) else tuple(int(v) for v in value)


def _short(name: Any) -> str:
    return str(name).rsplit(".", 1)[-1] if name else "None"


def unet_config(configuration: dict[str, Any], in_channels: int, num_outputs: int) -> UNetConfig:
    """The nnslim `UNetConfig` equal to the configuration's network (new or pre-2.3 plans)."""
    if "architecture" in configuration:
        arch = configuration["architecture"]
        class_name, kwargs = _short(arch.get("network_class_name")), dict(arch.get("arch_kwargs", {}))
    elif "UNet_class_name" in configuration:  # plans written before nnU-Net 2.3
        class_name = configuration["UNet_class_name"]
        kernels = configuration["conv_kernel_sizes"]
        n = len(kernels)
        dims = len(kernels[0])
        base, cap = configuration["UNet_base_num_features"], configuration["unet_max_num_features"]
        kwargs = {
            "n_stages": n, "features_per_stage": [min(base * 2**i, cap) for i in range(n)],
            "conv_op": f"torch.nn.Conv{dims}d", "kernel_sizes": kernels,
            "strides": configuration["pool_op_kernel_sizes"],
            "n_conv_per_stage": configuration["n_conv_per_stage_encoder"],
            "n_conv_per_stage_decoder": configuration["n_conv_per_stage_decoder"],
            "conv_bias": True, "norm_op": f"torch.nn.InstanceNorm{dims}d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
        }
    else:
        raise NnUNetImportError("the configuration has neither 'architecture' nor 'UNet_class_name'; not nnU-Net v2 plans")
    if class_name not in ARCHITECTURES:
        raise NnUNetImportError(
            f"network architecture {class_name!r} is not supported; nnslim rebuilds {', '.join(ARCHITECTURES)} "
            "(nnU-Net's default and residual-encoder presets)"
        )
    conv = _short(kwargs.get("conv_op"))
    if conv not in ("Conv2d", "Conv3d"):
        raise NnUNetImportError(f"conv_op {kwargs.get('conv_op')!r} is not supported (Conv2d or Conv3d)")
    dims = int(conv[-2])
    norm_name, norm_kwargs = _short(kwargs.get("norm_op")), kwargs.get("norm_op_kwargs") or {}
    norms = {f"InstanceNorm{dims}d": "instance", f"BatchNorm{dims}d": "batch"}
    if norm_name not in norms:
        raise NnUNetImportError(f"norm_op {kwargs.get('norm_op')!r} is not supported ({', '.join(norms)})")
    if float(norm_kwargs.get("eps", 1e-5)) != 1e-5 or (norm_name.startswith("Instance") and not norm_kwargs.get("affine")):
        raise NnUNetImportError(f"norm_op_kwargs {norm_kwargs} not supported (nnslim norms use eps 1e-5, affine)")
    nonlin, nonlin_kwargs = _short(kwargs.get("nonlin")), kwargs.get("nonlin_kwargs") or {}
    if nonlin == "LeakyReLU":
        slope = float(nonlin_kwargs.get("negative_slope", 0.01))
    elif nonlin == "ReLU":
        slope = 0.0
    else:
        raise NnUNetImportError(f"nonlin {kwargs.get('nonlin')!r} is not supported (LeakyReLU or ReLU)")
    unsupported = {
        "nonlin_first": bool(kwargs.get("nonlin_first")),
        "block": _short(kwargs.get("block", "BasicBlockD")) != "BasicBlockD",
        "stochastic_depth_p": bool(kwargs.get("stochastic_depth_p")),
        "squeeze_excitation": bool(kwargs.get("squeeze_excitation")),
        "pool_type": kwargs.get("pool_type", "conv") != "conv",
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise NnUNetImportError(f"arch_kwargs {', '.join(f'{k}={kwargs[k]!r}' for k in bad)} are not supported")
    n = int(kwargs["n_stages"])
    blocks_key = "n_blocks_per_stage" if class_name == "ResidualEncoderUNet" else "n_conv_per_stage"
    try:
        return UNetConfig(
            in_channels=in_channels,
            num_classes=num_outputs,
            features_per_stage=_counts(kwargs["features_per_stage"], n),
            kernel_sizes=_per_stage(kwargs["kernel_sizes"], n, dims),
            strides=_per_stage(kwargs["strides"], n, dims),
            convs_per_stage=_counts(kwargs[blocks_key], n),
            convs_per_decoder_stage=_counts(kwargs["n_conv_per_stage_decoder"], n - 1),
            conv_bias=bool(kwargs.get("conv_bias", False)),
            norm=norms[norm_name],
            negative_slope=slope,
            encoder="residual" if class_name == "ResidualEncoderUNet" else "plain",
            stem_channels=kwargs.get("stem_channels"),
        )
    except (ConfigError, KeyError) as exc:
        raise NnUNetImportError(f"cannot build {class_name} from the plans' arch_kwargs: {exc}") from exc


def _is_alias(key: str) -> bool:
    return ".all_modules." in key or key.startswith("decoder.encoder.")


def _canonical(key: str) -> str | None:
    """The key an alias duplicates (None if it is not a known alias form)."""
    if key.startswith("decoder.encoder."):
        key = key[len("decoder."):]
    return key if ".all_modules." not in key else None


def map_state_dict(weights: dict[str, torch.Tensor], model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """nnU-Net's state dict as `model`'s, aliases dropped; any other mismatch is an error."""
    weights = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in weights.items()}  # DDP / compile
    for key, value in weights.items():
        target = _canonical(key) if key.startswith("decoder.encoder.") else None
        if target is not None and target in weights and not torch.equal(weights[target], value):
            raise NnUNetImportError(f"{source}: {key} differs from {target}; the checkpoint is inconsistent")
    kept = {k: v for k, v in weights.items() if not _is_alias(k)}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(kept))
    unexpected = sorted(set(kept) - set(expected))
    if missing or unexpected:
        raise NnUNetImportError(
            f"{source}: the weights do not match the network rebuilt from plans.json "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}); "
            "was the checkpoint trained with these plans?"
        )
    wrong = [(k, tuple(kept[k].shape), tuple(v.shape)) for k, v in expected.items() if kept[k].shape != v.shape]
    if wrong:
        raise NnUNetImportError(f"{source}: shapes differ from the plans' network, e.g. {wrong[:3]} (checkpoint, plans)")
    return kept


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

    @classmethod
    def from_dataset(cls, dataset: dict[str, Any]) -> LabelScheme:
        labels = dataset.get("labels")
        if not isinstance(labels, dict) or not labels:
            raise NnUNetImportError("dataset.json has no 'labels' mapping")
        labels = {k: v for k, v in labels.items() if k != "ignore"}
        region_based = any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values())
        if not region_based:
            values = {name: int(v[0] if isinstance(v, (list, tuple)) else v) for name, v in labels.items()}
            ordered = sorted(values, key=values.get)
            if [values[n] for n in ordered] != list(range(len(ordered))):
                raise NnUNetImportError(f"dataset.json labels must be consecutive from 0, got {values}")
            return cls(head_names=ordered)
        order = dataset.get("regions_class_order")
        heads = [name for name, v in labels.items() if v not in (0, [0], (0,))]
        if not order or len(order) != len(heads):
            raise NnUNetImportError(
                f"region-based labels need 'regions_class_order' with one entry per region ({len(heads)}), got {order}"
            )
        return cls(head_names=heads, regions_class_order=[int(c) for c in order])

    def to_manifest(self) -> dict[str, Any]:
        if self.regions_class_order is None:
            return {"kind": "argmax"}
        return {"kind": "regions", "class_order": self.regions_class_order, "threshold_logit": 0.0}


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
        properties = self.plans.get("foreground_intensity_properties_per_channel", {})
        channels = []
        for c, scheme in enumerate(schemes):
            if scheme not in NORMALIZATIONS:
                raise NnUNetImportError(
                    f"normalization {scheme!r} (channel {c}) is not supported; nnslim knows {sorted(NORMALIZATIONS)}"
                )
            entry: dict[str, Any] = {"scheme": NORMALIZATIONS[scheme]}
            if scheme == "CTNormalization":
                stats = properties.get(str(c))
                if not stats:
                    raise NnUNetImportError(f"CT normalization of channel {c} needs its intensity statistics, "
                                            "which plans.json lacks (foreground_intensity_properties_per_channel)")
                entry.update(clip=[float(stats["percentile_00_5"]), float(stats["percentile_99_5"])],
                             mean=float(stats["mean"]), std=float(stats["std"]))
            if scheme == "ZScoreNormalization":
                entry["mask"] = "nonzero-region" if use_mask[c] else "none"
            channels.append(entry)
        if len(channels) != self.architecture.in_channels:
            raise NnUNetImportError(
                f"plans.json gives {len(channels)} normalization schemes but the dataset has "
                f"{self.architecture.in_channels} channels"
            )
        return {"scheme": "per-channel", "channels": channels}

    def preprocessing(self) -> dict[str, Any]:
        """The manifest's preprocessing entry (see `compiler.runtime.preprocessing`)."""
        return {
            "normalization": self.normalization(),
            "spacing": [float(s) for s in self.configuration["spacing"]],
            "mirror_axes": self.window_mirror_axes(),
            "axis_order": "reversed",  # nnU-Net's arrays are the NIfTI voxel array with axes reversed
            "transpose_forward": [int(a) for a in self.plans.get("transpose_forward", [0, 1, 2])],
            "transpose_backward": [int(a) for a in self.plans.get("transpose_backward", [0, 1, 2])],
            "crop_to_nonzero": True,
            "resample": True,
            "tta_default": bool(self.mirror_axes),
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


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise NnUNetImportError(f"{path.name} not found in {path.parent}; is this an nnU-Net v2 model folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise NnUNetImportError(f"{path} is not valid JSON: {exc}") from exc


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "plans.json").is_file() and (path / "dataset.json").is_file()


def read_model_folder(
    folder: str | Path, folds: tuple[str, ...] = ("0",), checkpoint_name: str = "checkpoint_final.pth"
) -> NnUNetModel:
    """Read and check an nnU-Net v2 model folder; `folds` like ("0", "1") or ("all",)."""
    folder = Path(folder)
    plans, dataset = _read_json(folder / "plans.json"), _read_json(folder / "dataset.json")
    if checkpoint_name not in CHECKPOINT_NAMES:
        raise NnUNetImportError(f"checkpoint name must be one of {CHECKPOINT_NAMES}, got {checkpoint_name!r}")
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
    labels = LabelScheme.from_dataset(dataset)
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
    if configuration.get("previous_stage"):
        raise NnUNetImportError(
            f"configuration {configuration_name!r} is a cascade stage (it needs {configuration['previous_stage']!r}'s "
            "segmentation as input); cascades are not supported, deploy 3d_fullres or 3d_lowres instead"
        )
    architecture = unet_config(configuration, len(channels), len(labels.head_names))
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
