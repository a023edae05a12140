"""Which windows of nnU-Net's grid to evaluate: all of them, or an opt-in approximation.

One vocabulary, the CLI's `--skip`, used everywhere:
- "none": the full grid (nnU-Net's result);
- "mask": skip windows holding no voxel of a cheap body mask (`body_mask`);
- "roi": seed 003 (FLARE22): per slab of windows along the walk axis, predict the in-plane
  centre window first and skip the slab's other windows when it predicts fewer than
  `roi_threshold` foreground voxels;
- "roi+mask": both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nnslim.compiler.runtime.errors import InputError

SKIP_MODES = ("none", "mask", "roi", "roi+mask")


@dataclass(frozen=True)
class WindowSelection:
    """Which windows to evaluate (module docstring).

    Attributes:
        mode: one of `SKIP_MODES`.
        roi_threshold: foreground voxels (label != 0) the centre window must predict (seed 003: 1000),
            counted inside `mask` when one is given.
        mask: `[*spatial]` bool, the body mask (see `body_mask`): required for the mask modes,
            optional for "roi".

    Unlike seed 003's published code, an active slab is evaluated on the full in-plane grid (no
    fixed 3x3 that drops the periphery), and voxels no evaluated window covers are not left
    undefined: they get logits 0 (background) and are counted in the report.
    """

    mode: str = "none"
    roi_threshold: int = 1000
    mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.mode not in SKIP_MODES:
            raise InputError(f"window skipping must be one of {', '.join(SKIP_MODES)}; got {self.mode!r}")
        if "mask" in self.mode and self.mask is None:
            raise InputError(f"window skipping {self.mode!r} needs a body mask (see body_mask)")

    @property
    def skips_by_mask(self) -> bool:
        return "mask" in self.mode

    @property
    def skips_by_roi(self) -> bool:
        return "roi" in self.mode

    @property
    def active_mask(self) -> torch.Tensor | None:
        """The mask the walk uses: none for the full grid, even if one was given."""
        return None if self.mode == "none" else self.mask


@dataclass
class WindowReport:
    """What the window walk did. `grid` is the full nnU-Net grid; `eq2` is seed 003's eq. (2) as
    printed, prod(ceil((I - P) / (s P))), which omits nnU-Net's `+ 1` per axis."""

    grid: int = 0
    eq2: int = 0
    evaluated: int = 0
    skipped_by_mask: int = 0
    skipped_by_roi: int = 0
    uncovered_voxels: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(vars(self))


def body_mask(image: torch.Tensor, fraction: float = 0.1, constant_share: float = 0.2) -> torch.Tensor:
    """The body, cheaply: voxels whose 3x3x3 mean of the first channel exceeds
    `p1 + fraction * (p99 - p1)`; when one value fills more than `constant_share` of the volume
    (a constant background), voxels not surrounded by it (and, if it is the darkest value, also
    above the cut).

    On CT (air at about -1000 HU) the cut sits near -870 HU; on MRI with a zero background, at a
    tenth of the bright range. A constant background need not be the darkest value: nnslim's
    default normalization keeps the air at 0 while tissue runs negative (`preprocessing.SCHEMES`),
    and padding or a mask outside the body is constant too; a voxel counts as background there
    when more than 90% of its 3x3x3 neighbourhood holds that value. The local means keep isolated
    noise voxels out (and grow the body by about one voxel). Statistics come from a strided subsample.
    """
    channel = image[0].float()
    sample = channel.reshape(-1)[:: max(1, channel.numel() // 1_000_000)]
    low, high = torch.quantile(sample, torch.tensor([0.01, 0.99], device=sample.device, dtype=sample.dtype))
    body = _local_mean(channel) > low + fraction * (high - low)
    values, counts = torch.unique(sample, return_counts=True)
    if counts.max() <= constant_share * sample.numel():
        return body
    background = values[counts.argmax()]
    outside = _local_mean((channel != background).float()) > 0.1
    # darkest background (CT padding, masked raw MRI): both rules; a background amid the tissue values
    # (air kept at 0 by the normalization): the percentile cut means nothing, this rule alone
    return body & outside if background <= low else outside


def _local_mean(volume: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.avg_pool3d(volume[None, None], 3, stride=1, padding=1, count_include_pad=False)[0, 0]


def centre_window(slab: list[tuple[slice, ...]]) -> tuple[slice, ...]:
    """The window whose in-plane centre is nearest the slab's in-plane centre (axes 1 and 2)."""
    lo = [min(s[a].start for s in slab) for a in (1, 2)]
    hi = [max(s[a].stop for s in slab) for a in (1, 2)]
    middle = [(a + b) / 2 for a, b in zip(lo, hi)]
    return min(slab, key=lambda s: sum(((s[a].start + s[a].stop) / 2 - middle[a - 1]) ** 2 for a in (1, 2)))


def foreground_voxels(logits: torch.Tensor, inside: torch.Tensor | None = None) -> int:
    """Voxels whose argmax is not background in one tile's logits `[1, K, ...]`, counted only
    `inside` the body mask when one is given (a network with instance normalization can predict
    tissue in an all-air tile, whose features normalize to zero)."""
    foreground = logits[0].argmax(0) != 0
    if inside is not None:
        foreground &= inside.to(foreground.device)
    return int(foreground.sum())
