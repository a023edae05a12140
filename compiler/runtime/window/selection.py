"""Which windows of nnU-Net's grid to evaluate: all of them, or an opt-in approximation.

One vocabulary, the CLI's `--skip`, and one table of it (`SKIP_MODES`): each mode is a sequence
of strategies applied to every slab of windows in turn. A strategy owns its counter in the
`WindowReport`. Adding a mode is one entry in the table (and a strategy class if it is new).
- "none": the full grid (nnU-Net's result);
- "mask": skip windows holding no voxel of a cheap body mask (`mask.body_mask`);
- "roi": seed 003 (FLARE22): per slab of windows along the walk axis, predict the in-plane
  centre window first and skip the slab's other windows when it predicts fewer than
  `roi_threshold` foreground voxels;
- "roi+mask": both.

Unlike seed 003's published code, an active slab is evaluated on the full in-plane grid (no fixed
3x3 that drops the periphery), and voxels no evaluated window covers are not left undefined: they
get logits 0 (background) and are counted in the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

from nnslim.compiler.runtime.window.arrays import to_numpy
from nnslim.errors import InputError

Window = tuple[slice, ...]


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


class SlabContext(Protocol):
    """What a strategy may use of the walk: the padded body mask (walk order) and the network."""

    mask: np.ndarray | None

    def predict(self, windows: list[Window]) -> Any: ...


class MaskSkip:
    """Keep the windows that hold at least one voxel of the body mask.

    A strategy: `counter` (its field of `WindowReport`), `needs_mask`, and `keep(slab, walk)`, which
    returns the windows to evaluate and how many it skipped.
    """

    counter = "skipped_by_mask"
    needs_mask = True

    def __init__(self, selection: WindowSelection) -> None:
        pass

    def keep(self, slab: list[Window], walk: SlabContext) -> tuple[list[Window], int]:
        kept = [s for s in slab if bool(walk.mask[s].any())]
        return kept, len(slab) - len(kept)


class RoiSkip:
    """Seed 003: predict the slab's centre window; keep the rest only if it finds enough foreground."""

    counter = "skipped_by_roi"
    needs_mask = False

    def __init__(self, selection: WindowSelection) -> None:
        self.threshold = selection.roi_threshold

    def keep(self, slab: list[Window], walk: SlabContext) -> tuple[list[Window], int]:
        centre = centre_window(slab)  # evaluated (and accumulated) here, whatever the verdict
        found = foreground_voxels(walk.predict([centre]), None if walk.mask is None else walk.mask[centre])
        rest = [s for s in slab if s is not centre]
        return (rest, 0) if found >= self.threshold else ([], len(rest))


# --skip's modes: the strategies each applies, in order
SKIP_MODES: dict[str, tuple[type, ...]] = {
    "none": (),
    "mask": (MaskSkip,),
    "roi": (RoiSkip,),
    "roi+mask": (MaskSkip, RoiSkip),
}


@dataclass(frozen=True)
class WindowSelection:
    """Which windows to evaluate (module docstring).

    Attributes:
        mode: a key of `SKIP_MODES`.
        roi_threshold: foreground voxels (label != 0) the centre window must predict (seed 003: 1000),
            counted inside `mask` when one is given.
        mask: `[*spatial]` bool, the body mask (`mask.body_mask`): required for the mask modes,
            optional for "roi".
    """

    mode: str = "none"
    roi_threshold: int = 1000
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.mode not in SKIP_MODES:
            raise InputError(f"window skipping must be one of {', '.join(SKIP_MODES)}; got {self.mode!r}")
        if self.needs_mask and self.mask is None:
            raise InputError(f"window skipping {self.mode!r} needs a body mask (see window.mask.body_mask)")

    @property
    def needs_mask(self) -> bool:
        return any(s.needs_mask for s in SKIP_MODES[self.mode])

    @property
    def active_mask(self) -> np.ndarray | None:
        """The mask the walk uses: none for the full grid, even if one was given."""
        return None if self.mode == "none" else self.mask

    def strategies(self) -> list:
        return [strategy(self) for strategy in SKIP_MODES[self.mode]]


def apply_strategies(strategies: list, slab: list[Window], walk: SlabContext, report: WindowReport,
                     progress: Callable[[int], None]) -> list[Window]:
    """The windows of `slab` every strategy keeps; each counts what it skipped in its own counter."""
    for strategy in strategies:
        if not slab:
            break
        slab, skipped = strategy.keep(slab, walk)
        setattr(report, strategy.counter, getattr(report, strategy.counter) + skipped)
        if skipped:
            progress(skipped)
    return slab


def centre_window(slab: list[Window]) -> Window:
    """The window whose in-plane centre is nearest the slab's in-plane centre (axes 1 and 2)."""
    lo = [min(s[a].start for s in slab) for a in (1, 2)]
    hi = [max(s[a].stop for s in slab) for a in (1, 2)]
    middle = [(a + b) / 2 for a, b in zip(lo, hi)]
    return min(slab, key=lambda s: sum(((s[a].start + s[a].stop) / 2 - middle[a - 1]) ** 2 for a in (1, 2)))


def foreground_voxels(logits: Any, inside: np.ndarray | None = None) -> int:
    """Voxels whose argmax is not background in one tile's logits `[1, K, ...]` (numpy, or a tensor
    on a GPU), counted only `inside` the body mask when one is given (a network with instance
    normalization can predict tissue in an all-air tile, whose features normalize to zero)."""
    foreground = to_numpy(logits[0].argmax(0)) != 0
    if inside is not None:
        foreground &= np.asarray(inside)
    return int(foreground.sum())
