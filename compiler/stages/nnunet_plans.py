"""nnU-Net v2 plans -> nnslim's `UNetConfig`: the network a configuration of plans.json describes.

Reads both plans formats: nnU-Net >= 2.3 (`architecture` with `network_class_name` and
`arch_kwargs`) and the older flat keys (`UNet_class_name`, `conv_kernel_sizes`, ...). Anything
nnslim cannot rebuild exactly (other blocks, norms, activations, options) is refused by name.
"""

from __future__ import annotations

from typing import Any

from nnslim.compiler.stages.nnunet_checkpoint import NnUNetImportError
from nnslim.training.config import ConfigError, UNetConfig

ARCHITECTURES = ("PlainConvUNet", "ResidualEncoderUNet")


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


def _legacy_arch_kwargs(configuration: dict[str, Any]) -> dict[str, Any]:
    """The `arch_kwargs` equal to a plans configuration written before nnU-Net 2.3."""
    kernels = configuration["conv_kernel_sizes"]
    n, dims = len(kernels), len(kernels[0])
    base, cap = configuration["UNet_base_num_features"], configuration["unet_max_num_features"]
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
    return dims, norms[norm_name], slope


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
    class_name, kwargs = _architecture(configuration)
    dims, norm, slope = _layers(kwargs)
    _refuse_unsupported_options(kwargs)
    residual = class_name == "ResidualEncoderUNet"
    try:
        n = int(kwargs["n_stages"])
        return UNetConfig(
            in_channels=in_channels,
            num_classes=num_outputs,
            features_per_stage=_counts(kwargs["features_per_stage"], n),
            kernel_sizes=_per_stage(kwargs["kernel_sizes"], n, dims),
            strides=_per_stage(kwargs["strides"], n, dims),
            convs_per_stage=_counts(kwargs["n_blocks_per_stage" if residual else "n_conv_per_stage"], n),
            convs_per_decoder_stage=_counts(kwargs["n_conv_per_stage_decoder"], n - 1),
            conv_bias=bool(kwargs.get("conv_bias", False)),
            norm=norm,
            negative_slope=slope,
            encoder="residual" if residual else "plain",
            stem_channels=kwargs.get("stem_channels"),
        )
    except (ConfigError, KeyError) as exc:
        raise NnUNetImportError(f"cannot build {class_name} from the plans' arch_kwargs: {exc}") from exc
