"""Architecture configuration: frozen dataclasses held as data, and the named presets.

A configuration is plain data (ints, tuples, strings) so that it round-trips through JSON and a
checkpoint can rebuild its network without pickled classes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

Triple = tuple[int, int, int]
Sizes = tuple[int, ...]  # one entry per spatial axis (2 or 3)

NORMS = ("instance", "batch", "group")
BLOCKS = ("conv", "faster_fusion")
ENCODERS = ("plain", "residual")


class ConfigError(ValueError):
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
            if len(self.blocks) != n or any(b not in BLOCKS for b in self.blocks):
                raise ConfigError(f"blocks must give one of {BLOCKS} per stage ({n}), got {self.blocks}")
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
        from nnslim.training.revunet import RevUNetConfig  # revunet imports this module

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
