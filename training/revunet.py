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

import torch
from torch import nn

from nnslim.training.config import RevUNetConfig
from nnslim.training.reversible import ConvUnit, MBConv3d, ReversibleBlock, ReversibleSequence

__all__ = ["RevDecoder", "RevUNet", "RevUNetConfig"]  # RevUNetConfig lives in training.config


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
