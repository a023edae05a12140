"""nnU-Net v2 plans -> nnslim's `UNetConfig`: the network a configuration of plans.json describes.

Reads both plans formats: nnU-Net >= 2.3 (`architecture` with `network_class_name` and
`arch_kwargs`) and the older flat keys (`UNet_class_name`, `conv_kernel_sizes`, ...). Anything
nnslim cannot rebuild exactly (other blocks, norms, activations, options) is refused by name.
`resampling_rule` reads the configuration's resampling functions for the manifest.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from nnslim.compiler.runtime.manifest.schema import MAX_PATCH
from nnslim.compiler.runtime.safety import MAX_SPACING_MM
from nnslim.compiler.stages.nnunet_checkpoint import NnUNetImportError
from nnslim.training.config import MAX_FEATURES, MAX_STAGES, ConfigError, UNetConfig, as_int

ARCHITECTURES = ("PlainConvUNet", "ResidualEncoderUNet")

logger = logging.getLogger(__name__)


def _refuse(key: str, value: Any, expected: str) -> NnUNetImportError:
    """The error for a plans.json entry of the wrong shape: the key, the value seen, what was expected."""
    return NnUNetImportError(f"plans.json: `{key}` is {value!r:.80}, expected {expected}; the plans are damaged or "
                             "not nnU-Net v2's (use the plans.json nnU-Net wrote beside the folds)")


def resolve_configuration(plans: dict[str, Any], name: str) -> dict[str, Any]:
    """A configuration from plans.json with its `inherits_from` chain applied."""
    configurations = plans.get("configurations", {})
    if not isinstance(configurations, dict):
        raise _refuse("configurations", configurations, "an object of named configurations")
    chain, current = [], name
    while current is not None:
        if not isinstance(current, str) or current not in configurations:
            raise NnUNetImportError(
                f"configuration {current!r} is not in plans.json (it has {sorted(map(str, configurations))})"
            )
        if current in chain:
            raise NnUNetImportError(f"plans.json configurations inherit in a cycle: {chain + [current]}")
        if not isinstance(configurations[current], dict):
            raise _refuse(f"configurations.{current}", configurations[current], "an object")
        chain.append(current)
        current = configurations[current].get("inherits_from")
    resolved: dict[str, Any] = {}
    for entry in reversed(chain):
        resolved.update(configurations[entry])
    resolved.pop("inherits_from", None)
    return resolved


def _per_stage(value: Any, n: int, dims: int) -> tuple[Any, ...]:
    """nnU-Net accepts an int, a list of ints or a list of lists for kernels and strides (the
    values are checked by `UNetConfig`)."""
    if not isinstance(value, (list, tuple)):
        value = [value] * n
    return tuple(tuple(v) if isinstance(v, (list, tuple)) else (v,) * dims for v in value)


def _counts(value: Any, n: int) -> tuple[Any, ...]:
    """An int for every stage, or one per stage (checked by `UNetConfig`)."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


def _short(name: Any) -> str:
    return str(name).rsplit(".", 1)[-1] if name else "None"


def _legacy_arch_kwargs(configuration: dict[str, Any]) -> dict[str, Any]:
    """The `arch_kwargs` equal to a plans configuration written before nnU-Net 2.3."""
    needed = ("conv_kernel_sizes", "pool_op_kernel_sizes", "UNet_base_num_features", "unet_max_num_features",
              "n_conv_per_stage_encoder", "n_conv_per_stage_decoder")
    missing = [k for k in needed if k not in configuration]
    if missing:
        raise NnUNetImportError(f"plans.json: the configuration (pre-2.3 format) lacks {missing}; the plans are "
                                "incomplete (use the plans.json nnU-Net wrote beside the folds)")
    kernels = configuration["conv_kernel_sizes"]
    if (not isinstance(kernels, list) or not 2 <= len(kernels) <= MAX_STAGES
            or not all(isinstance(k, list) and len(k) in (2, 3) for k in kernels)):
        raise _refuse("conv_kernel_sizes", kernels, f"a list of kernel sizes, one [x, y(, z)] per stage (2 to {MAX_STAGES})")
    n, dims = len(kernels), len(kernels[0])
    base = as_int("UNet_base_num_features", configuration["UNet_base_num_features"], 1, MAX_FEATURES)
    cap = as_int("unet_max_num_features", configuration["unet_max_num_features"], 1, MAX_FEATURES)
    return {
        "n_stages": n, "features_per_stage": [min(base * 2**i, cap) for i in range(n)],
        "conv_op": f"torch.nn.Conv{dims}d", "kernel_sizes": kernels,
        "strides": configuration["pool_op_kernel_sizes"],
        "n_conv_per_stage": configuration["n_conv_per_stage_encoder"],
        "n_conv_per_stage_decoder": configuration["n_conv_per_stage_decoder"],
        "conv_bias": True, "norm_op": f"torch.nn.InstanceNorm{dims}d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }


def _architecture(configuration: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The network class name and its keyword arguments, from new or pre-2.3 plans."""
    if "architecture" in configuration:
        arch = configuration["architecture"]
        if not isinstance(arch, dict):
            raise _refuse("architecture", arch, "an object with network_class_name and arch_kwargs")
        if not isinstance(arch.get("arch_kwargs", {}), dict):
            raise _refuse("architecture.arch_kwargs", arch["arch_kwargs"], "an object of the network's arguments")
        class_name, kwargs = _short(arch.get("network_class_name")), dict(arch.get("arch_kwargs", {}))
    elif "UNet_class_name" in configuration:  # plans written before nnU-Net 2.3
        class_name, kwargs = configuration["UNet_class_name"], _legacy_arch_kwargs(configuration)
    else:
        raise NnUNetImportError("the configuration has neither 'architecture' nor 'UNet_class_name'; not nnU-Net v2 plans")
    if class_name not in ARCHITECTURES:
        raise NnUNetImportError(
            f"network architecture {class_name!r} is not supported; nnslim rebuilds {', '.join(ARCHITECTURES)} "
            "(nnU-Net's default and residual-encoder presets)"
        )
    return class_name, kwargs


def _layers(kwargs: dict[str, Any]) -> tuple[int, str, float]:
    """Spatial dims, nnslim's norm name and the activation's negative slope; unsupported layers refused."""
    conv = _short(kwargs.get("conv_op"))
    if conv not in ("Conv2d", "Conv3d"):
        raise NnUNetImportError(f"conv_op {kwargs.get('conv_op')!r} is not supported (Conv2d or Conv3d)")
    dims = int(conv[-2])
    norm_name, norm_kwargs = _short(kwargs.get("norm_op")), _options(kwargs, "norm_op_kwargs", "eps")
    norms = {f"InstanceNorm{dims}d": "instance", f"BatchNorm{dims}d": "batch"}
    if norm_name not in norms:
        raise NnUNetImportError(f"norm_op {kwargs.get('norm_op')!r} is not supported ({', '.join(norms)})")
    if float(norm_kwargs.get("eps", 1e-5)) != 1e-5 or (norm_name.startswith("Instance") and not norm_kwargs.get("affine")):
        raise NnUNetImportError(f"norm_op_kwargs {norm_kwargs} not supported (nnslim norms use eps 1e-5, affine)")
    nonlin, nonlin_kwargs = _short(kwargs.get("nonlin")), _options(kwargs, "nonlin_kwargs", "negative_slope")
    if nonlin == "LeakyReLU":
        slope = float(nonlin_kwargs.get("negative_slope", 0.01))
    elif nonlin == "ReLU":
        slope = 0.0
    else:
        raise NnUNetImportError(f"nonlin {kwargs.get('nonlin')!r} is not supported (LeakyReLU or ReLU)")
    return dims, norms[norm_name], slope


def _options(kwargs: dict[str, Any], key: str, number: str) -> dict[str, Any]:
    """A layer's keyword arguments (an object; `number`, when given, a number), refused by name otherwise."""
    options = kwargs.get(key) or {}
    value = options.get(number, 0.0) if isinstance(options, dict) else None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise _refuse(f"arch_kwargs.{key}", options, f"an object whose {number!r} is a number")
    return options


def _refuse_unsupported_options(kwargs: dict[str, Any]) -> None:
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


def unet_config(configuration: dict[str, Any], in_channels: int, num_outputs: int) -> UNetConfig:
    """The nnslim `UNetConfig` equal to the configuration's network (new or pre-2.3 plans)."""
    try:  # a value of the wrong shape, here or in pre-2.3 plans' keys, is an error of the plans
        class_name, kwargs = _architecture(configuration)
    except ConfigError as exc:
        raise NnUNetImportError(f"cannot read the network from the plans: {exc}") from exc
    dims, norm, slope = _layers(kwargs)
    _refuse_unsupported_options(kwargs)
    residual = class_name == "ResidualEncoderUNet"
    try:
        n = as_int("n_stages", kwargs["n_stages"], 2, MAX_STAGES)
        units = "n_blocks_per_stage" if residual else "n_conv_per_stage"
        return UNetConfig(
            in_channels=in_channels,
            num_classes=num_outputs,
            features_per_stage=_counts(kwargs["features_per_stage"], n),
            kernel_sizes=_per_stage(kwargs["kernel_sizes"], n, dims),
            strides=_per_stage(kwargs["strides"], n, dims),
            convs_per_stage=_counts(kwargs[units], n),
            convs_per_decoder_stage=_counts(kwargs["n_conv_per_stage_decoder"], n - 1),
            conv_bias=bool(kwargs.get("conv_bias", False)),
            norm=norm,
            negative_slope=slope,
            encoder="residual" if residual else "plain",
            stem_channels=kwargs.get("stem_channels"),
        )
    except KeyError as exc:
        raise NnUNetImportError(f"cannot build {class_name}: the plans' arch_kwargs lack {exc}") from exc
    except ConfigError as exc:
        raise NnUNetImportError(f"cannot build {class_name} from the plans' arch_kwargs: {exc}") from exc


def check_configuration(configuration: dict[str, Any], name: str, dims: int, channels: int) -> None:
    """The entries of a configuration the engine is made from (patch, spacing, normalization),
    each refused by key and value when missing or of another shape; bounds are the runtime's."""
    where = f"configurations.{name}"
    for key in ("patch_size", "spacing", "normalization_schemes"):
        if key not in configuration:
            raise NnUNetImportError(f"plans.json: configuration {name!r} lacks `{key}`, which the engine needs; the "
                                    "plans are incomplete (use the plans.json nnU-Net wrote beside the folds)")
    patch = configuration["patch_size"]
    if not isinstance(patch, list) or len(patch) != dims or not all(
            type(p) is int and 1 <= p <= MAX_PATCH for p in patch):
        raise _refuse(f"{where}.patch_size", patch, f"{dims} integers in [1, {MAX_PATCH}] (a {dims}D network)")
    spacing = configuration["spacing"]
    if not isinstance(spacing, list) or len(spacing) != dims or not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and 0 < s <= MAX_SPACING_MM
            for s in spacing):
        raise _refuse(f"{where}.spacing", spacing, f"{dims} voxel sizes in mm, each in (0, {MAX_SPACING_MM:g}]")
    schemes = configuration["normalization_schemes"]
    if not isinstance(schemes, list) or len(schemes) != channels or not all(isinstance(s, str) for s in schemes):
        raise _refuse(f"{where}.normalization_schemes", schemes,
                      f"a list of {channels} scheme name(s), one per channel of dataset.json")
    masks = configuration.get("use_mask_for_norm")
    if masks is not None and (not isinstance(masks, list) or len(masks) != channels
                              or not all(isinstance(m, bool) for m in masks)):
        raise _refuse(f"{where}.use_mask_for_norm", masks, f"a list of {channels} true/false")


SIGNATURE_DEFAULTS = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": False}  # the function's own


def resampling_rule(configuration: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest's `preprocessing.resampling` (`runtime.nnunet.resampling`): nnU-Net's rule with the
    configuration's orders (a missing keyword takes `resample_data_or_seg_to_shape`'s own default,
    as nnU-Net's call does), when its functions are nnU-Net's default; None (nnslim's trilinear rule,
    warned) for another function or a label map resampled as an image, which nnslim does not reproduce."""
    record: dict[str, Any] = {"rule": "nnunet"}
    for kind in ("data", "seg", "probabilities"):
        function = configuration.get(f"resampling_fn_{kind}", "resample_data_or_seg_to_shape")
        kwargs = configuration.get(f"resampling_fn_{kind}_kwargs") or {}
        if function != "resample_data_or_seg_to_shape" or not isinstance(kwargs, dict):
            logger.warning("plans.json: resampling_fn_%s is %r; nnslim reproduces nnU-Net's "
                           "resample_data_or_seg_to_shape only and resamples this model trilinearly", kind, function)
            return None
        kwargs = {**SIGNATURE_DEFAULTS, **kwargs}
        unknown = sorted(set(kwargs) - {*SIGNATURE_DEFAULTS, "separate_z_anisotropy_threshold"})
        if unknown:
            logger.warning("plans.json: resampling_fn_%s_kwargs has %s, which nnslim does not reproduce; it "
                           "resamples this model trilinearly", kind, ", ".join(map(str, unknown)))
            return None
        if kwargs["is_seg"] is not (kind == "seg"):
            logger.warning("plans.json: resampling_fn_%s_kwargs has is_seg %r; nnslim reproduces label maps resampled "
                           "as labels and images as images only, and resamples this model trilinearly", kind,
                           kwargs["is_seg"])
            return None
        record[kind] = {k: kwargs[k] for k in ("order", "order_z", "force_separate_z",
                                               "separate_z_anisotropy_threshold") if k in kwargs}
    from nnslim.compiler.runtime.nnunet.resampling import settings

    try:
        for kind in ("data", "seg", "probabilities"):
            settings(record, kind)
    except Exception as exc:  # an order nnslim does not reproduce: said at build time, not at the first case
        raise NnUNetImportError(f"plans.json: {exc}") from exc
    return record
