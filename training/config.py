"""Architecture records: frozen dataclasses held as data (the named presets are in `training.presets`).

A configuration is plain data (ints, tuples, strings) so that it round-trips through JSON and a
checkpoint can rebuild its network without pickled classes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from numbers import Integral
from typing import Any

from nnslim.compiler.runtime.manifest.schema import MAX_CHANNELS, MAX_CLASSES
from nnslim.errors import NnslimError

Triple = tuple[int, int, int]
Sizes = tuple[int, ...]  # one entry per spatial axis (2 or 3)

NORMS = ("instance", "batch", "group")
MEMORY_MODES = ("reversible", "plain", "checkpoint")  # how reversible sequences train (`training.reversible`)
UNITS = ("conv", "mbconv")  # F and G of a reversible block
ENCODERS = ("plain", "residual")

# Upper bounds of an architecture, far above any trained U-Net (nnU-Net: 32..320 features in 3D,
# 512 in 2D, 5-8 stages), so that a garbled or hostile checkpoint or plans.json is refused by name
# instead of asking the allocator for terabytes. Channels and classes are the runtime's limits
# (a label map is uint8), so nothing is built that no engine could carry.
MAX_FEATURES = 4096  # channels of one stage
MAX_STAGES = 12
MAX_KERNEL = 15  # voxels per axis of a conv kernel
MAX_STRIDE = 16
MAX_UNITS = 32  # conv units (or blocks) in one stage
MAX_PARAMETERS = 2**30  # conv weights of the whole network (4 GiB as float32)


class ConfigError(NnslimError, ValueError):
    """An architecture configuration or preset name that cannot be built."""


def as_int(key: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int in [low, high] (None: unbounded), or a ConfigError naming the key: records
    hold ints (an integral float is accepted), never strings, booleans or fractions, which `int()`
    would convert or truncate without a word."""
    integral = isinstance(value, Integral) or (isinstance(value, float) and value.is_integer())
    if (isinstance(value, bool) or not integral or (low is not None and value < low)
            or (high is not None and value > high)):
        expected = ("an integer" if low is None and high is None else f"an integer >= {low}" if high is None
                    else f"an integer in [{low}, {high}]")
        raise ConfigError(f"{key} is {value!r:.60}, expected {expected}; fix the architecture record "
                          "(the checkpoint's config, or the arch_kwargs of plans.json)")
    return int(value)


def listed(key: str, value: Any) -> list[Any]:
    """`value` when it is a list (or tuple), else a ConfigError naming the key."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key} is {value!r:.60}, expected a list; fix the architecture record "
                          "(the checkpoint's config, or the arch_kwargs of plans.json)")
    return list(value)


def int_tuple(key: str, value: Any, low: int | None = None, high: int | None = None) -> tuple[int, ...]:
    """A list of ints (`as_int` each), refused by name when it is not a list."""
    return tuple(as_int(f"{key}[{i}]", v, low, high) for i, v in enumerate(listed(key, value)))


def known_fields(cls: type, data: Any) -> dict[str, Any]:
    """A config dataclass's fields from JSON data: unknown or missing keys are an error (a newer
    format is not half-read); types and ranges are the dataclass's own checks."""
    if not isinstance(data, dict):
        raise ConfigError(f"the architecture config is {type(data).__name__} {data!r:.60}, expected an object of "
                          "fields; the checkpoint is damaged or not written by nnslim")
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"unknown architecture fields {sorted(map(str, unknown))}; was this written by a newer nnslim?")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"the architecture config lacks {missing}; the checkpoint is damaged or incomplete")
    return dict(data)


@dataclass(frozen=True)
class UNetConfig:
    """nnU-Net v2's PlainConvUNet (or ResidualEncoderUNet), 2D or 3D, described as data.

    The number of spatial axes is the length of the kernel sizes (2 or 3).

    Attributes:
        in_channels: image channels (modalities).
        num_classes: output classes, background included.
        features_per_stage: channels of each encoder stage, highest resolution first.
        kernel_sizes: conv kernel of each stage.
        strides: stride of the first conv of each stage (the first stage normally (1, 1, 1)).
        convs_per_stage: conv-norm-act units in each encoder stage (encoder="residual": residual
            blocks, each two convs).
        convs_per_decoder_stage: units in each decoder stage, lowest resolution first
            (one fewer entry than the encoder).
        conv_bias: whether convolutions carry a bias (nnU-Net: yes).
        norm: "instance", "batch" or "group".
        group_norm_groups: groups for norm="group".
        negative_slope: LeakyReLU slope (0: ReLU).
        deep_supervision: build the lower-resolution segmentation outputs (training only).
        blocks: conv unit of each encoder stage, "conv" (conv-norm-act) or "faster_fusion"
            (seed 000); a decoder stage uses the block of the encoder stage of its width.
            None: all "conv".
        reparameterized: the deploy form (FasterFusion fused, BatchNorm folded into convs).
        encoder: "plain" (PlainConvUNet: stacked conv units, strided first conv) or "residual"
            (ResidualEncoderUNet: a conv stem, then ResNet-D basic blocks; the decoder is the same).
        stem_channels: width of the residual encoder's stem (None: the first stage's width).
        preset: name of the preset this came from, if any.
        paper: citation of the paper a preset reproduces, if any.
    """

    in_channels: int
    num_classes: int
    features_per_stage: tuple[int, ...]
    kernel_sizes: tuple[Sizes, ...]
    strides: tuple[Sizes, ...]
    convs_per_stage: tuple[int, ...]
    convs_per_decoder_stage: tuple[int, ...]
    conv_bias: bool = True
    norm: str = "instance"
    group_norm_groups: int = 8
    negative_slope: float = 0.01
    deep_supervision: bool = False
    blocks: tuple[str, ...] | None = None
    reparameterized: bool = False
    preset: str | None = None
    paper: str | None = None
    encoder: str = "plain"
    stem_channels: int | None = None

    def __post_init__(self) -> None:
        self._check_sizes()
        n = len(self.features_per_stage)
        dims = {len(k) for k in self.kernel_sizes} | {len(s) for s in self.strides}
        if len(dims) != 1 or not dims <= {2, 3}:
            raise ConfigError(
                f"kernel sizes and strides must all have 2 or all have 3 entries (2D or 3D), "
                f"got kernel_sizes={self.kernel_sizes}, strides={self.strides}"
            )
        for name in ("kernel_sizes", "strides", "convs_per_stage"):
            if len(getattr(self, name)) != n:
                raise ConfigError(
                    f"{name} has {len(getattr(self, name))} entries but features_per_stage has {n}; "
                    "give one entry per stage"
                )
        if len(self.convs_per_decoder_stage) != n - 1:
            raise ConfigError(
                f"convs_per_decoder_stage needs {n - 1} entries (one per decoder stage), "
                f"got {len(self.convs_per_decoder_stage)}"
            )
        if self.conv_weights() > MAX_PARAMETERS:
            raise ConfigError(f"the architecture has about {self.conv_weights():,} conv weights (features_per_stage "
                              f"{self.features_per_stage}), more than the {MAX_PARAMETERS:,} nnslim builds; "
                              "the record is garbled, or the network is far larger than any U-Net it deploys")
        if self.blocks is not None:
            from nnslim.training.unet import BLOCK_TYPES  # the one table of block types (unet imports this module)

            if len(self.blocks) != n or any(b not in BLOCK_TYPES for b in self.blocks):
                raise ConfigError(f"blocks must give one of {tuple(BLOCK_TYPES)} per stage ({n}), got {self.blocks}")
            if "faster_fusion" in self.blocks and (self.spatial_dims != 3 or self.encoder != "plain"):
                raise ConfigError("FasterFusion blocks exist for 3D plain-encoder U-Nets only")
        if self.encoder not in ENCODERS:
            raise ConfigError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.norm not in NORMS:
            raise ConfigError(f"norm must be one of {NORMS}, got {self.norm!r}")

    def _check_sizes(self) -> None:
        """Every count an integer within the module's bounds (stored as ints), before anything is
        sized from it: a garbled record fails here by name, not in the allocator."""
        checked = {
            "in_channels": as_int("in_channels", self.in_channels, 1, MAX_CHANNELS),
            "num_classes": as_int("num_classes", self.num_classes, 2, MAX_CLASSES),
            "features_per_stage": int_tuple("features_per_stage", self.features_per_stage, 1, MAX_FEATURES),
            "kernel_sizes": tuple(int_tuple(f"kernel_sizes[{i}]", k, 1, MAX_KERNEL)
                                  for i, k in enumerate(listed("kernel_sizes", self.kernel_sizes))),
            "strides": tuple(int_tuple(f"strides[{i}]", s, 1, MAX_STRIDE)
                             for i, s in enumerate(listed("strides", self.strides))),
            "convs_per_stage": int_tuple("convs_per_stage", self.convs_per_stage, 1, MAX_UNITS),
            "convs_per_decoder_stage": int_tuple("convs_per_decoder_stage", self.convs_per_decoder_stage, 1, MAX_UNITS),
            "group_norm_groups": as_int("group_norm_groups", self.group_norm_groups, 1, MAX_FEATURES),
        }
        if self.stem_channels is not None:
            checked["stem_channels"] = as_int("stem_channels", self.stem_channels, 1, MAX_FEATURES)
        if not 2 <= len(checked["features_per_stage"]) <= MAX_STAGES:
            raise ConfigError(f"a U-Net needs 2 to {MAX_STAGES} stages, got features_per_stage={self.features_per_stage}")
        for name, value in checked.items():
            object.__setattr__(self, name, value)  # frozen: store the checked ints (1.0 -> 1)

    def conv_weights(self) -> int:
        """About how many conv weights the network holds (biases and norms aside): what the bound
        on absurd architectures counts, before anything is allocated."""
        features, total, previous = self.features_per_stage, 0, self.in_channels
        units = [2 * c for c in self.convs_per_stage] if self.encoder == "residual" else self.convs_per_stage
        for f, kernel, n in zip(features, self.kernel_sizes, units):
            total += math.prod(kernel) * (previous * f + (n - 1) * f * f)
            previous = f
        for s, n in zip(range(len(features) - 2, -1, -1), self.convs_per_decoder_stage):  # lowest resolution first
            skip, below = features[s], features[s + 1]
            total += math.prod(self.strides[s + 1]) * below * skip + math.prod(self.kernel_sizes[s]) * (n + 1) * skip * skip
        return total + self.num_classes * features[0]

    @property
    def spatial_dims(self) -> int:
        return len(self.kernel_sizes[0])

    @property
    def total_stride(self) -> Sizes:
        """Product of the strides per axis: input sizes must be multiples of it."""
        total = [1] * self.spatial_dims
        for stride in self.strides:
            total = [t * s for t, s in zip(total, stride)]
        return tuple(total)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        """Inverse of `to_dict`; unknown keys are an error so a newer format is not half-read."""
        values = known_fields(cls, data)
        if values.get("blocks") is not None:
            values["blocks"] = tuple(listed("blocks", values["blocks"]))
        return cls(**values)


@dataclass(frozen=True)
class RevUNetConfig:
    """A (partially) reversible U-Net as data.

    Attributes:
        widths: channels per level, highest resolution first (each even: blocks split them in two).
        encoder_depths: reversible blocks per encoder level.
        decoder_depths: blocks per decoder level, lowest resolution first (one fewer than levels).
        encoder_unit / decoder_unit: F and G of the blocks, "conv" or "mbconv".
        reversible_decoder: False trains the decoder's sequences with plain autograd (seed 002).
        memory: "reversible", "plain" (the baseline) or "checkpoint" (torch.utils.checkpoint).
        expand_ratio: MBConv expansion.
        max_groups: GroupNorm groups (the largest divisor of the channels up to this).
    """

    in_channels: int
    num_classes: int
    widths: tuple[int, ...]
    encoder_depths: tuple[int, ...]
    decoder_depths: tuple[int, ...]
    encoder_unit: str = "conv"
    decoder_unit: str = "conv"
    reversible_decoder: bool = True
    memory: str = "reversible"
    expand_ratio: int = 2
    max_groups: int = 8
    negative_slope: float = 0.01
    deep_supervision: bool = False  # not built; present so the training loop treats all models alike
    preset: str | None = None
    paper: str | None = None

    def __post_init__(self) -> None:
        checked = {
            "in_channels": as_int("in_channels", self.in_channels, 1, MAX_CHANNELS),
            "num_classes": as_int("num_classes", self.num_classes, 2, MAX_CLASSES),
            "widths": int_tuple("widths", self.widths, 2, MAX_FEATURES),
            "encoder_depths": int_tuple("encoder_depths", self.encoder_depths, 0, MAX_UNITS),
            "decoder_depths": int_tuple("decoder_depths", self.decoder_depths, 0, MAX_UNITS),
            "expand_ratio": as_int("expand_ratio", self.expand_ratio, 1, 16),
            "max_groups": as_int("max_groups", self.max_groups, 1, MAX_FEATURES),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)  # frozen: store the checked ints
        n = len(self.widths)
        if n > MAX_STAGES:
            raise ConfigError(f"a U-Net needs 2 to {MAX_STAGES} levels, got widths {self.widths}")
        if n < 2 or len(self.encoder_depths) != n or len(self.decoder_depths) != n - 1:
            raise ConfigError(
                f"need >= 2 levels, one encoder depth per level and one decoder depth per level below the top; got "
                f"widths {self.widths}, encoder_depths {self.encoder_depths}, decoder_depths {self.decoder_depths}"
            )
        if any(w % 2 for w in self.widths):
            raise ConfigError(f"reversible blocks split channels in two, so widths must be even; got {self.widths}")
        depths = [e + d for e, d in zip(self.encoder_depths, (*self.decoder_depths, 0))]
        weights = sum(27 * depth * w * w * self.expand_ratio for depth, w in zip(depths, self.widths))  # about
        if weights > MAX_PARAMETERS:
            raise ConfigError(f"the architecture has about {weights:,} conv weights (widths {self.widths}), more than "
                              f"the {MAX_PARAMETERS:,} nnslim builds; the record is garbled")
        if self.encoder_unit not in UNITS or self.decoder_unit not in UNITS:
            raise ConfigError(f"units must be one of {UNITS}, got {self.encoder_unit!r}, {self.decoder_unit!r}")
        if self.memory not in MEMORY_MODES:
            raise ConfigError(f"memory must be one of {MEMORY_MODES}, got {self.memory!r}")

    @property
    def spatial_dims(self) -> int:
        return 3

    @property
    def total_stride(self) -> tuple[int, int, int]:
        s = 2 ** (len(self.widths) - 1)
        return (s, s, s)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RevUNetConfig:
        return cls(**known_fields(cls, data))
