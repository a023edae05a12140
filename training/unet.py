"""UNet: nnU-Net v2's PlainConvUNet and ResidualEncoderUNet, 2D or 3D, written from their description.

Plain encoder stage s: `convs_per_stage[s]` units of Conv(k, padding (k-1)//2) -> Norm -> LeakyReLU,
the first with `strides[s]` (strided-conv downsampling).
Residual encoder: a stem (one conv unit at the first stage's kernel, stride 1), then per stage
`convs_per_stage[s]` ResNet-D basic blocks: conv unit -> conv + norm (no activation), plus a skip
that average-pools (kernel = stride) when the block strides and projects with a 1x1 conv + norm
(no bias) when the width changes; LeakyReLU after the sum.
Decoder stage s (lowest resolution first), the same for both: ConvTranspose (kernel = stride) to
the skip's width, concatenation [up, skip], then conv units. A 1x1 head per decoder stage; only
the last (full resolution) one is used unless deep supervision is on, in which case the outputs
come highest resolution first.

Module names follow nnU-Net's (`encoder.stages.0.0.convs.0.conv`, `encoder.stem.convs.0.conv`,
`encoder.stages.1.blocks.0.skip.1.conv`, `decoder.transpconvs.0`, `decoder.seg_layers.3`), so its
checkpoints map onto this model key for key (less its aliases, see `compiler.stages.nnunet_checkpoint`).
"""

from __future__ import annotations

import dataclasses

from typing import Callable

import torch
from torch import nn

from nnslim.training.blocks import ConvNormAct, FasterFusionBlock, NormFactory, conv_class
from nnslim.training.config import UNetConfig
from nnslim.training.fusion import Reparameterizable

UnitFactory = Callable[[int, int, tuple[int, ...], tuple[int, ...]], nn.Module]


def norm_factory(config: UNetConfig) -> NormFactory:
    """The norm layer for `config.norm` (2D or 3D per the config), as a function of the channel count."""
    dims = config.spatial_dims
    if config.norm == "instance":
        instance = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims]
        return lambda channels: instance(channels, eps=1e-5, affine=True)
    if config.norm == "batch":
        batch = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        return lambda channels: batch(channels, eps=1e-5, momentum=0.1)
    groups = config.group_norm_groups
    return lambda channels: nn.GroupNorm(min(groups, channels), channels, eps=1e-5)


class StackedConvBlocks(nn.Module):
    """`n` units; only the first one strides."""

    def __init__(
        self,
        n: int,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, ...],
        first_stride: tuple[int, ...],
        unit: UnitFactory,
    ) -> None:
        super().__init__()
        units = [unit(in_channels, out_channels, kernel_size, first_stride)]
        units += [unit(out_channels, out_channels, kernel_size, (1,) * len(kernel_size)) for _ in range(n - 1)]
        self.convs = nn.Sequential(*units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


def conv_unit(config: UNetConfig) -> UnitFactory:
    """Conv -> norm -> LeakyReLU (`ConvNormAct`), nnU-Net's unit."""
    norm = norm_factory(config)
    return lambda cin, cout, kernel, stride: ConvNormAct(
        cin, cout, kernel, stride, config.conv_bias, norm, config.negative_slope, deploy=config.reparameterized
    )


def faster_fusion_unit(config: UNetConfig) -> UnitFactory:
    """Seed 000's FasterFusion unit (`FasterFusionBlock`)."""
    return lambda cin, cout, kernel, stride: FasterFusionBlock(
        cin, cout, kernel, stride, config.negative_slope, deploy=config.reparameterized
    )


# Block type name (as `UNetConfig.blocks` gives it) -> the builder of its units, in train or deploy
# form per the config: the one table of block types (`UNetConfig.blocks` is checked against it). A
# new block type is its unit (`blocks`) and one entry here.
BLOCK_TYPES: dict[str, Callable[[UNetConfig], UnitFactory]] = {
    "conv": conv_unit,
    "faster_fusion": faster_fusion_unit,
}


def unit_factory(config: UNetConfig, block: str) -> UnitFactory:
    """Builds one unit of the given block type (a name of `BLOCK_TYPES`)."""
    return BLOCK_TYPES[block](config)


def stage_blocks(config: UNetConfig) -> tuple[str, ...]:
    return config.blocks or ("conv",) * len(config.features_per_stage)


class ResidualBlock(nn.Module):
    """nnU-Net's BasicBlockD (ResNet-D): see the module docstring."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: tuple[int, ...], stride: tuple[int, ...],
        config: UNetConfig,
    ) -> None:
        super().__init__()
        norm, deploy, slope = norm_factory(config), config.reparameterized, config.negative_slope
        ones = (1,) * len(kernel_size)
        self.conv1 = ConvNormAct(in_channels, out_channels, kernel_size, stride, config.conv_bias, norm, slope, deploy)
        self.conv2 = ConvNormAct(out_channels, out_channels, kernel_size, ones, config.conv_bias, norm, None, deploy)
        skip: list[nn.Module] = []
        if tuple(stride) != ones:
            pool = {2: nn.AvgPool2d, 3: nn.AvgPool3d}[len(kernel_size)]
            skip.append(pool(stride, stride))
        if in_channels != out_channels:
            skip.append(ConvNormAct(in_channels, out_channels, ones, ones, False, norm, None, deploy))
        self.skip = nn.Sequential(*skip) if skip else nn.Identity()
        self.nonlin2 = nn.LeakyReLU(slope, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlin2(self.conv2(self.conv1(x)) + self.skip(x))


class StackedResidualBlocks(nn.Module):
    """`n` residual blocks; only the first one strides."""

    def __init__(
        self, n: int, in_channels: int, out_channels: int, kernel_size: tuple[int, ...], first_stride: tuple[int, ...],
        config: UNetConfig,
    ) -> None:
        super().__init__()
        ones = (1,) * len(kernel_size)
        blocks = [ResidualBlock(in_channels, out_channels, kernel_size, first_stride, config)]
        blocks += [ResidualBlock(out_channels, out_channels, kernel_size, ones, config) for _ in range(n - 1)]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResidualEncoder(nn.Module):
    """nnU-Net's ResidualEncoder: a stem, then stacked residual blocks per stage."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        stem_channels = config.stem_channels or config.features_per_stage[0]
        ones = (1,) * config.spatial_dims
        self.stem = StackedConvBlocks(
            1, config.in_channels, stem_channels, config.kernel_sizes[0], ones, unit_factory(config, "conv")
        )
        stages, channels = [], stem_channels
        for features, kernel, stride, n in zip(
            config.features_per_stage, config.kernel_sizes, config.strides, config.convs_per_stage
        ):
            stages.append(StackedResidualBlocks(n, channels, features, kernel, stride, config))
            channels = features
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


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
        conv = conv_class(config.spatial_dims)
        transpose = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[config.spatial_dims]
        ones = (1,) * config.spatial_dims
        transpconvs, stages, seg_layers = [], [], []
        for s in range(1, n):
            below, skip = features[-s], features[-(s + 1)]
            stride = config.strides[-s]
            transpconvs.append(transpose(below, skip, stride, stride, bias=config.conv_bias))
            stages.append(
                StackedConvBlocks(
                    config.convs_per_decoder_stage[s - 1],
                    2 * skip,
                    skip,
                    config.kernel_sizes[-(s + 1)],
                    ones,
                    unit_factory(config, stage_blocks(config)[-(s + 1)]),
                )
            )
            seg_layers.append(conv(skip, config.num_classes, 1, bias=True))
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


class UNet(nn.Module):
    """A 2D or 3D U-Net built from a `UNetConfig`.

    Returns logits `[B, num_classes, *spatial]`, or with deep supervision a list of logits from
    full resolution down. Spatial sizes must be multiples of `config.total_stride`.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ResidualEncoder(config) if config.encoder == "residual" else Encoder(config)
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
    if isinstance(module, nn.modules.conv._ConvNd):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)

