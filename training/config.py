"""Architecture records: frozen dataclasses held as data (the named presets are in `training.presets`).

A configuration is plain data (ints, tuples, strings) so that it round-trips through JSON and a
checkpoint can rebuild its network without pickled classes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from nnslim.errors import NnslimError

Triple = tuple[int, int, int]
Sizes = tuple[int, ...]  # one entry per spatial axis (2 or 3)

NORMS = ("instance", "batch", "group")
MEMORY_MODES = ("reversible", "plain", "checkpoint")  # how reversible sequences train (`training.reversible`)
UNITS = ("conv", "mbconv")  # F and G of a reversible block
ENCODERS = ("plain", "residual")


class ConfigError(NnslimError, ValueError):
    """An architecture configuration or preset name that cannot be built."""


def known_fields(cls: type, data: dict[str, Any], int_tuples: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config dataclass's fields from JSON data: unknown keys are an error (a newer format is
    not half-read), and the named list fields become tuples of ints."""
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"unknown architecture fields {sorted(unknown)}; was this written by a newer nnslim?")
    values = dict(data)
    for key in int_tuples:
        if key in values:
            values[key] = tuple(int(v) for v in values[key])
    return values


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
        n = len(self.features_per_stage)
        if n < 2:
            raise ConfigError(f"a U-Net needs at least 2 stages, got features_per_stage={self.features_per_stage}")
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
        dims = {len(k) for k in self.kernel_sizes} | {len(s) for s in self.strides}
        if len(dims) != 1 or not dims <= {2, 3}:
            raise ConfigError(
                f"kernel sizes and strides must all have 2 or all have 3 entries (2D or 3D), "
                f"got kernel_sizes={self.kernel_sizes}, strides={self.strides}"
            )
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
        if self.in_channels < 1 or self.num_classes < 2:
            raise ConfigError(
                f"need in_channels >= 1 and num_classes >= 2, got {self.in_channels} and {self.num_classes}"
            )

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
        values = known_fields(cls, data, int_tuples=("features_per_stage", "convs_per_stage", "convs_per_decoder_stage"))
        if values.get("blocks") is not None:
            values["blocks"] = tuple(values["blocks"])
        for key in ("kernel_sizes", "strides"):
            if key in values:
                values[key] = tuple(tuple(int(v) for v in triple) for triple in values[key])
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
        n = len(self.widths)
        if n < 2 or len(self.encoder_depths) != n or len(self.decoder_depths) != n - 1:
            raise ConfigError(
                f"need >= 2 levels, one encoder depth per level and one decoder depth per level below the top; got "
                f"widths {self.widths}, encoder_depths {self.encoder_depths}, decoder_depths {self.decoder_depths}"
            )
        if any(w % 2 for w in self.widths):
            raise ConfigError(f"reversible blocks split channels in two, so widths must be even; got {self.widths}")
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
        return cls(**known_fields(cls, data, int_tuples=("widths", "encoder_depths", "decoder_depths")))
