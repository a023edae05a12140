"""UNet3d: nnU-Net v2's PlainConvUNet, written from its description.

Encoder stage s: `convs_per_stage[s]` units of Conv(k, padding k//2) -> Norm -> LeakyReLU, the
first with `strides[s]` (strided-conv downsampling). Decoder stage s (lowest resolution first):
ConvTranspose (kernel = stride) to the skip's width, concatenation [up, skip], then conv units.
A 1x1x1 head per decoder stage; only the last (full resolution) one is used unless deep
supervision is on, in which case the outputs come highest resolution first.

Module names follow nnU-Net's (`encoder.stages.0.0.convs.0.conv`, `decoder.transpconvs.0`,
`decoder.seg_layers.3`), so its checkpoints map onto this model key for key.
"""

from __future__ import annotations

import dataclasses

from typing import Callable

import torch
from torch import nn

from training.blocks import ConvNormAct, FasterFusionBlock, NormFactory
from training.config import UNetConfig
from training.reparam import Reparameterizable

UnitFactory = Callable[[int, int, tuple[int, int, int], tuple[int, int, int]], nn.Module]


def norm_factory(config: UNetConfig) -> NormFactory:
    """The norm layer for `config.norm`, as a function of the channel count."""
    if config.norm == "instance":
        return lambda channels: nn.InstanceNorm3d(channels, eps=1e-5, affine=True)
    if config.norm == "batch":
        return lambda channels: nn.BatchNorm3d(channels, eps=1e-5, momentum=0.1)
    groups = config.group_norm_groups
    return lambda channels: nn.GroupNorm(min(groups, channels), channels, eps=1e-5)


class StackedConvBlocks(nn.Module):
    """`n` units; only the first one strides."""

    def __init__(
        self,
        n: int,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int, int],
        first_stride: tuple[int, int, int],
        unit: UnitFactory,
    ) -> None:
        super().__init__()
        units = [unit(in_channels, out_channels, kernel_size, first_stride)]
        units += [unit(out_channels, out_channels, kernel_size, (1, 1, 1)) for _ in range(n - 1)]
        self.convs = nn.Sequential(*units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


def unit_factory(config: UNetConfig, block: str) -> UnitFactory:
    """Builds one unit of the given block type, in train or deploy form per the config."""
    norm = norm_factory(config)
    deploy = config.reparameterized
    if block == "faster_fusion":
        return lambda cin, cout, kernel, stride: FasterFusionBlock(
            cin, cout, kernel, stride, config.negative_slope, deploy=deploy
        )
    return lambda cin, cout, kernel, stride: ConvNormAct(
        cin, cout, kernel, stride, config.conv_bias, norm, config.negative_slope, deploy=deploy
    )


def stage_blocks(config: UNetConfig) -> tuple[str, ...]:
    return config.blocks or ("conv",) * len(config.features_per_stage)


class Encoder(nn.Module):
    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        stages = []
        channels = config.in_channels
        for features, kernel, stride, n, block_type in zip(
            config.features_per_stage, config.kernel_sizes, config.strides, config.convs_per_stage, stage_blocks(config)
        ):
            block = StackedConvBlocks(n, channels, features, kernel, stride, unit_factory(config, block_type))
            stages.append(nn.Sequential(block))  # the extra level mirrors nnU-Net's module names
            channels = features
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class Decoder(nn.Module):
    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        features = config.features_per_stage
        n = len(features)
        self.deep_supervision = config.deep_supervision
        transpconvs, stages, seg_layers = [], [], []
        for s in range(1, n):
            below, skip = features[-s], features[-(s + 1)]
            stride = config.strides[-s]
            transpconvs.append(nn.ConvTranspose3d(below, skip, stride, stride, bias=config.conv_bias))
            stages.append(
                StackedConvBlocks(
                    config.convs_per_decoder_stage[s - 1],
                    2 * skip,
                    skip,
                    config.kernel_sizes[-(s + 1)],
                    (1, 1, 1),
                    unit_factory(config, stage_blocks(config)[-(s + 1)]),
                )
            )
            seg_layers.append(nn.Conv3d(skip, config.num_classes, 1, bias=True))
        self.transpconvs = nn.ModuleList(transpconvs)
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(seg_layers)

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        x = skips[-1]
        outputs = []
        last = len(self.stages) - 1
        for s, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
            x = stage(torch.cat((up(x), skips[-(s + 2)]), dim=1))
            if self.deep_supervision:
                outputs.append(self.seg_layers[s](x))
            elif s == last:
                outputs.append(self.seg_layers[s](x))
        if not self.deep_supervision:
            return outputs[0]
        return outputs[::-1]


class UNet3d(nn.Module):
    """A 3D U-Net built from a `UNetConfig`.

    Returns logits `[B, num_classes, *spatial]`, or with deep supervision a list of logits from
    full resolution down. Spatial sizes must be multiples of `config.total_stride`.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.apply(_init_he)

    def reparameterize(self) -> None:
        """Collapse every unit into its deploy form in place (idempotent); the config follows."""
        for module in self.modules():
            if module is not self and isinstance(module, Reparameterizable):
                module.reparameterize()
        self.config = dataclasses.replace(self.config, reparameterized=True)

    def set_deep_supervision(self, enabled: bool) -> None:
        """Switch the training-only heads on or off (the weights always exist)."""
        self.decoder.deep_supervision = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.decoder(self.encoder(x))


def _init_he(module: nn.Module) -> None:
    # nnU-Net's InitWeights_He(1e-2): kaiming normal with the LeakyReLU slope, zero bias.
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def count_parameters(model: nn.Module) -> int:
    """Parameters counted once per storage (tied or shared tensors count once)."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    total = 0
    for p in model.parameters():
        key = (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape))
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total
