"""The named architecture presets: nnU-Net's, seed 000's FasterFusion and halved variants, the
FLARE22 winner's small nnU-Net, the tests' tiny one, and the reversible U-Nets (seeds 002, 004).

Each preset is data; `build(in_channels, num_classes)` turns it into an architecture record of
`training.config` for a dataset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from nnslim.training.config import ConfigError, RevUNetConfig, Sizes, Triple, UNetConfig


@dataclass(frozen=True)
class Preset:
    """A named architecture plus the patch and spacing it is trained at."""

    name: str
    description: str
    features_per_stage: tuple[int, ...]
    kernel_sizes: tuple[Sizes, ...]
    strides: tuple[Sizes, ...]
    convs_per_stage: tuple[int, ...]
    patch_size: Triple
    spacing: tuple[float, float, float] | None
    paper: str | None = None
    fusion_threshold: int | None = None  # FasterFusion in stages with at least this many channels

    def build(
        self, in_channels: int, num_classes: int, fusion_threshold: int | None = None, **overrides: Any
    ) -> UNetConfig:
        """The architecture for a dataset with these channels and classes.

        Args:
            fusion_threshold: overrides the preset's FasterFusion channel threshold.
        """
        threshold = fusion_threshold if fusion_threshold is not None else self.fusion_threshold
        blocks = None
        if threshold is not None:
            blocks = tuple("faster_fusion" if f >= threshold else "conv" for f in self.features_per_stage)
        fields = dict(
            in_channels=in_channels,
            num_classes=num_classes,
            features_per_stage=self.features_per_stage,
            kernel_sizes=self.kernel_sizes,
            strides=self.strides,
            convs_per_stage=self.convs_per_stage,
            convs_per_decoder_stage=tuple(self.convs_per_stage[:-1][::-1]),
            blocks=blocks,
            preset=self.name,
            paper=self.paper,
        )
        fields.update(overrides)
        return UNetConfig(**fields)


def _isotropic(n: int, value: int) -> tuple[Triple, ...]:
    return tuple((value, value, value) for _ in range(n))


def _strides(n: int) -> tuple[Triple, ...]:
    return ((1, 1, 1),) + _isotropic(n - 1, 2)


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            name="nnunet-3d-fullres",
            description="nnU-Net v2 3d_fullres default: 6 stages, 32..320 features, 2 convs per stage",
            features_per_stage=(32, 64, 128, 256, 320, 320),
            kernel_sizes=_isotropic(6, 3),
            strides=_strides(6),
            convs_per_stage=(2, 2, 2, 2, 2, 2),
            patch_size=(128, 128, 128),
            spacing=None,
            paper="Isensee et al., nnU-Net, Nature Methods 2021",
        ),
        Preset(
            # Seed 003 Table 1 gives the first-stage width, convs per stage, downsampling count,
            # patch and spacing (z, y, x). Kernels and strides are not published; these are what
            # nnU-Net's planner chooses for a 4.0 x 1.2 x 1.2 mm grid (no z pooling at first).
            name="flare22-small",
            description="FLARE22 winner's efficient nnU-Net: 16..256 features, 4 downsamplings, patch 32x128x192",
            features_per_stage=(16, 32, 64, 128, 256),
            kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
            strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)),
            convs_per_stage=(2, 2, 2, 2, 2),
            patch_size=(32, 128, 192),
            spacing=(4.0, 1.2, 1.2),
            paper="Huang et al., Revisiting nnU-Net for Iterative Pseudo Labeling and Efficient "
            "Sliding Window Inference, FLARE22 (Table 1, efficient setting)",
        ),
        Preset(
            name="tiny",
            description="4 stages, 8..64 features: for tests and the CPU demo",
            features_per_stage=(8, 16, 32, 64),
            kernel_sizes=_isotropic(4, 3),
            strides=_strides(4),
            convs_per_stage=(2, 2, 2, 2),
            patch_size=(96, 96, 96),
            spacing=None,
        ),
    )
}


SEED_000 = "Heinrich & Hagenah, Make nnUNets Small Again (FasterFusion, MIDL short paper)"


def _faster(base: Preset, name: str, threshold: int = 160) -> Preset:
    """The base with FasterFusion units in stages of >= `threshold` channels (seed 000: 160)."""
    return dataclasses.replace(
        base, name=name, fusion_threshold=threshold, paper=SEED_000,
        description=f"{base.name} with FasterFusion units in stages of >= {threshold} channels",
    )


def _half(base: Preset, name: str) -> Preset:
    """The base with every width halved: seed 000's small-model comparison."""
    return dataclasses.replace(
        base, name=name, features_per_stage=tuple(f // 2 for f in base.features_per_stage), paper=SEED_000,
        description=f"{base.name} with halved widths (seed 000's comparison)",
    )


for _name, _base in (("nnunet", PRESETS["nnunet-3d-fullres"]), ("flare22-small", PRESETS["flare22-small"])):
    for _derived in (_faster(_base, f"faster-{_name}"), _half(_base, f"half-{_name}")):
        PRESETS[_derived.name] = _derived
# tiny has no stage of 160 channels; this variant puts FasterFusion where tiny is widest, for
# training comparisons on a CPU
PRESETS["tiny-faster"] = _faster(PRESETS["tiny"], "tiny-faster", threshold=32)


@dataclass(frozen=True)
class RevPreset:
    """A named (partially) reversible U-Net (`training.revunet`) with its training patch."""

    name: str
    description: str
    widths: tuple[int, ...]
    encoder_depths: tuple[int, ...]
    decoder_depths: tuple[int, ...]
    encoder_unit: str
    reversible_decoder: bool
    memory: str
    patch_size: Triple
    spacing: tuple[float, float, float] | None = None
    paper: str | None = None

    def build(self, in_channels: int, num_classes: int, fusion_threshold: int | None = None, **overrides: Any):
        """The architecture for a dataset; `overrides` may set memory, encoder_depths, decoder_depths."""
        if fusion_threshold is not None:
            raise ConfigError("FasterFusion applies to nnU-Net presets, not reversible U-Nets")
        overrides.pop("deep_supervision", None)  # no deep supervision heads
        fields = dict(
            in_channels=in_channels, num_classes=num_classes, widths=self.widths,
            encoder_depths=self.encoder_depths, decoder_depths=self.decoder_depths, encoder_unit=self.encoder_unit,
            reversible_decoder=self.reversible_decoder, memory=self.memory, preset=self.name, paper=self.paper,
        )
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return RevUNetConfig(**fields)


SEED_004 = "Brügger et al., A Partially Reversible U-Net for Memory-Efficient Volumetric Image Segmentation, MICCAI 2019"
SEED_002 = "Pendse et al., Memory Efficient 3D U-Net with Reversible Mobile Inverted Bottlenecks, BrainLes 2020"
for _rev in (
    RevPreset(
        name="partially-reversible-unet",
        description="seed 004: one reversible sequence per level (encoder and decoder), 30..480 channels, GroupNorm",
        widths=(30, 60, 120, 240, 480), encoder_depths=(1, 1, 1, 1, 1), decoder_depths=(1, 1, 1, 1),
        encoder_unit="conv", reversible_decoder=True, memory="reversible", patch_size=(128, 128, 128), paper=SEED_004,
    ),
    RevPreset(
        name="rev-mbconv-unet",
        description="seed 002: reversible MBConv encoder (expand 2), plain conv decoder, 30..240 channels",
        widths=(30, 60, 120, 180, 240), encoder_depths=(1, 1, 1, 1, 1), decoder_depths=(1, 1, 1, 1),
        encoder_unit="mbconv", reversible_decoder=False, memory="reversible", patch_size=(128, 128, 128),
        paper=SEED_002,
    ),
):
    PRESETS[_rev.name] = _rev
    # the baseline: the same network and parameters, trained with ordinary autograd
    PRESETS[f"{_rev.name}-baseline"] = dataclasses.replace(
        _rev, name=f"{_rev.name}-baseline", memory="plain",
        description=f"{_rev.name} trained without reversibility (equal parameters; the memory baseline)",
    )


def get_preset(name: str) -> Preset | RevPreset:
    """Look up a preset by name, with the list of valid names in the error."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
