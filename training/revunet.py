"""Partially reversible 3D U-Nets (seed 004) and reversible MBConv U-Nets (seed 002).

Level 0 opens with a 3x3x3 conv from the image channels to `widths[0]`; every lower level
max-pools by 2 and changes the width with a 1x1x1 conv; each level then runs one
`ReversibleSequence` of `encoder_depths[l]` blocks. The decoder, lowest level first, changes
the width with a 1x1x1 conv, upsamples trilinearly by 2 (in this order: the two commute, and the
conv runs at the lower resolution), adds the skip (additive skips, not
concatenation) and runs a sequence of `decoder_depths[l]` blocks. A 1x1x1 conv gives the logits.

F and G of every block work on half the level's channels: seed 004's GroupNorm -> LeakyReLU ->
conv 3x3x3 (`unit="conv"`) or seed 002's MBConv (`unit="mbconv"`, expand ratio 2). `memory`
says how the sequences are trained ("reversible", "plain", "checkpoint"; see
`training.reversible`): the same function and parameters, so the non-reversible baseline of a
preset has exactly its parameter count. Seed 002's decoder is not reversible
(`reversible_decoder=False`: its sequences always train "plain").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nnslim.training.config import ConfigError, known_fields
from nnslim.training.reversible import MEMORY_MODES, ConvUnit, MBConv3d, ReversibleBlock, ReversibleSequence

UNITS = ("conv", "mbconv")


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


def _sequence(config: RevUNetConfig, channels: int, depth: int, unit: str, memory: str) -> ReversibleSequence:
    half = channels // 2

    def make() -> nn.Module:
        if unit == "mbconv":
            return MBConv3d(half, config.expand_ratio, config.negative_slope, config.max_groups)
        return ConvUnit(half, config.negative_slope, config.max_groups)

    return ReversibleSequence([ReversibleBlock(make(), make()) for _ in range(depth)], memory)


class RevDecoder(nn.Module):
    def __init__(self, config: RevUNetConfig) -> None:
        super().__init__()
        widths = config.widths
        memory = config.memory if config.reversible_decoder else "plain"
        self.deep_supervision = False
        self.up = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)
        self.reduce = nn.ModuleList(nn.Conv3d(widths[l + 1], widths[l], 1) for l in reversed(range(len(widths) - 1)))
        self.stages = nn.ModuleList(
            _sequence(config, widths[l], d, config.decoder_unit, memory)
            for l, d in zip(reversed(range(len(widths) - 1)), config.decoder_depths)
        )
        self.head = nn.Conv3d(widths[0], config.num_classes, 1)

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        x = skips[-1]
        for i, (reduce, stage) in enumerate(zip(self.reduce, self.stages)):
            # 1x1 conv, then upsample: the same function (trilinear weights sum to 1, so the two
            # linear maps commute, bias included) without a 2x-wide full-resolution tensor, which
            # the conv would keep for backward; 8x fewer MACs in the conv
            x = stage(self.up(reduce(x)) + skips[-(i + 2)])
        return self.head(x)


class RevUNet(nn.Module):
    """See the module docstring. Input sizes must be multiples of `config.total_stride`."""

    def __init__(self, config: RevUNetConfig) -> None:
        super().__init__()
        self.config = config
        widths = config.widths
        self.stem = nn.Conv3d(config.in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList(
            nn.Sequential(nn.MaxPool3d(2), nn.Conv3d(widths[l - 1], widths[l], 1)) for l in range(1, len(widths))
        )
        self.encoder = nn.ModuleList(
            _sequence(config, w, d, config.encoder_unit, config.memory) for w, d in zip(widths, config.encoder_depths)
        )
        self.decoder = RevDecoder(config)

    def set_deep_supervision(self, enabled: bool) -> None:
        """Reversible U-Nets have no deep supervision heads; the training loop's request is ignored."""

    def set_memory(self, memory: str) -> None:
        """Train the same network reversibly, plainly or with checkpointing (benchmarks)."""
        self.config = dataclasses.replace(self.config, memory=memory)
        for module in self.encoder:
            module.memory = memory
        if self.config.reversible_decoder:
            for module in self.decoder.stages:
                module.memory = memory

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        x = self.encoder[0](self.stem(x))
        skips.append(x)
        for down, stage in zip(self.down, self.encoder[1:]):
            x = stage(down(x))
            skips.append(x)
        return self.decoder(skips)
