"""Where the windows are: a grid rule over a (padded) volume, and the walk's axis order.

- Axes smaller than the patch are padded, centred (`below = diff // 2`) with the pad value (0 by
  default; MONAI's `cval`); the rest untouched. nnU-Net and MONAI pad the same way.
- The grid rules (`GRID_RULES`), per axis of padded size I, patch P and step fraction s:
  - "nnunet" (nnU-Net v2): `n = ceil((I - P) / (P * s)) + 1` windows, starts
    `round(i * (I - P) / (n - 1))` (only 0 when n == 1), spread evenly; Python's round, like
    numpy's, rounds halves to even. An axis with patch 1 (a 2D model's slice axis) visits every
    slice once.
  - "monai" (MONAI's `SlidingWindowInferer`, overlap `1 - s`): interval `int(P * s)` (at least 1;
    P when I == P), starts `0, interval, 2 * interval, ...` up to the first that reaches the end,
    which is moved back to `I - P`.
- Tiles in nnU-Net's order (last axis fastest); the walk takes one axis as its slab axis: the one
  with the most window positions (the long axis of a whole-body scan), the first of equals.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

from nnslim.compiler.runtime.window.arrays import NumpyArrays

GRID_RULES = ("nnunet", "monai")


def compute_steps(image_size: Sequence[int], patch_size: Sequence[int], step_fraction: float,
                  rule: str = "nnunet") -> list[list[int]]:
    """Start offsets per axis under a grid rule (module docstring); `image_size` must already be
    >= `patch_size` on every axis."""
    if not 0 < step_fraction <= 1:
        raise ValueError(f"step fraction must be in (0, 1], got {step_fraction}")
    if rule not in GRID_RULES:
        raise ValueError(f"grid rule must be one of {GRID_RULES}, got {rule!r}")
    if rule == "monai":
        return [_monai_starts(size, patch, step_fraction) for size, patch in zip(image_size, patch_size)]
    steps = []
    for size, patch in zip(image_size, patch_size):
        if size < patch:
            raise ValueError(f"image size {size} is smaller than the patch {patch}; pad first")
        if patch == 1:  # a 2D model walking slices: each slice once (nnU-Net's 2D loop)
            steps.append(list(range(size)))
            continue
        n = math.ceil((size - patch) / (patch * step_fraction)) + 1
        if n == 1:
            steps.append([0])
            continue
        actual = (size - patch) / (n - 1)
        steps.append([int(round(actual * i)) for i in range(n)])
    return steps


def _monai_starts(size: int, patch: int, step_fraction: float) -> list[int]:
    """MONAI's starts along one axis (`_get_scan_interval` and `dense_patch_slices`)."""
    if size < patch:
        raise ValueError(f"image size {size} is smaller than the patch {patch}; pad first")
    interval = patch if patch == size else max(int(patch * step_fraction), 1)
    starts = [0]
    while starts[-1] + patch < size:
        starts.append(min(starts[-1] + interval, size - patch))
    return starts


def padded_size(image_size: Sequence[int], patch_size: Sequence[int]) -> tuple[int, ...]:
    """The image size after `pad_to_patch`."""
    return tuple(max(s, p) for s, p in zip(image_size, patch_size))


def pad_to_patch(image: Any, patch_size: Sequence[int], arrays: Any = None,
                 value: float = 0.0) -> tuple[Any, tuple[slice, ...]]:
    """The image `[C, *spatial]` padded with `value`, centred, on the axes smaller than the patch, as
    a new array (contiguous in the image's axis order, so tiles are gathered from one block of
    memory), and the slices that cut the original region back out.

    Args:
        arrays: the namespace of `image` (`arrays.arrays_for`); default numpy.
    """
    arrays = arrays or NumpyArrays()
    spatial = tuple(image.shape[1:])
    before = [max(p - s, 0) // 2 for s, p in zip(spatial, patch_size)]
    region = (slice(None),) + tuple(slice(b, b + s) for b, s in zip(before, spatial))
    padded = arrays.zeros_beside((image.shape[0], *padded_size(spatial, patch_size)), image)
    if value:
        padded[...] = value
    padded[region] = image
    return padded, region


def tile_slices(padded: Sequence[int], patch_size: Sequence[int], step_fraction: float,
                rule: str = "nnunet") -> list[tuple[slice, ...]]:
    """Every tile's spatial slices over a padded volume, in nnU-Net's order (last axis fastest)."""
    steps = compute_steps(padded, patch_size, step_fraction, rule)
    return [tuple(slice(s, s + p) for s, p in zip(start, patch_size)) for start in itertools.product(*steps)]


def eq2_window_count(image_size: Sequence[int], patch_size: Sequence[int], step_fraction: float) -> int:
    """Seed 003's eq. (2) as printed (no `+ 1` per axis), for the report."""
    return math.prod(math.ceil((max(i, p) - p) / (step_fraction * p)) for i, p in zip(image_size, patch_size))


def walk_order(image_size: Sequence[int], patch_size: Sequence[int], step_fraction: float,
               slab_axis: int | None = None, rule: str = "nnunet") -> tuple[int, ...]:
    """Axis order of the walk: the slab axis first (None: the axis with the most window
    positions, the first of equals), then the others in order."""
    if slab_axis is None:
        counts = [len(s) for s in compute_steps(padded_size(image_size, patch_size), patch_size, step_fraction, rule)]
        slab_axis = counts.index(max(counts))
    return (slab_axis, *(a for a in range(len(image_size)) if a != slab_axis))
