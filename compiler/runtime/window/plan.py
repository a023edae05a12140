"""The decisions of one walk, made once before the first tile: axis order, grid, accumulator dtype.

`plan_window` turns an image size and the window settings into a `WindowPlan`: the walk order
(`grid.walk_order`), the patch and mirror axes in that order, the grid (`config.grid`) over the padded
volume (walk order, padded coordinates), and the dtype of the slab accumulators under a memory cap.
The walk (`walk`), the progress bar and the report all read the plan; nothing is computed twice.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

from nnslim.compiler.runtime.window.arrays import itemsize
from nnslim.compiler.runtime.window.config import SlidingWindowConfig
from nnslim.compiler.runtime.window.grid import eq2_window_count, padded_size, tile_slices, walk_order
from nnslim.errors import InputError


@dataclass(frozen=True)
class WindowPlan:
    """One walk over one image size (module docstring).

    Attributes:
        order: the model's spatial axes in walk order (the slab axis first).
        config: the settings in walk order (patch, mirror axes) with the accumulator dtype decided.
        padded: the padded image size, in walk order.
        slices: every window, in walk order and padded coordinates, grouped by slab.
        eq2: seed 003's eq. (2) window count (for the report).
    """

    order: tuple[int, ...]
    config: SlidingWindowConfig
    padded: tuple[int, ...]
    slices: list[tuple[slice, ...]]
    eq2: int

    @property
    def tiles(self) -> int:
        """Windows per mirror pass (the progress bar's total before skipping)."""
        return len(self.slices)

    @property
    def to_model(self) -> tuple[int, ...]:
        """Walk-order spatial axes -> the model's (for `numpy.transpose`-style permutations)."""
        return tuple(int(i) for i in sorted(range(len(self.order)), key=lambda a: self.order[a]))


def plan_window(image_size: Sequence[int], num_classes: int, config: SlidingWindowConfig,
                slab_axis: int | None = None) -> WindowPlan:
    """The plan for an image of `image_size` (model axes, unpadded); see the module docstring.

    Raises:
        InputError: the accumulators do not fit under `config.memory_cap_mb`, even in fp16.
    """
    image_size = tuple(int(s) for s in image_size)
    order = walk_order(image_size, config.patch_size, config.step_fraction, slab_axis, config.grid)
    walked = dataclasses.replace(config, patch_size=tuple(config.patch_size[a] for a in order),
                                 mirror_axes=tuple(order.index(a) for a in config.mirror_axes))
    padded = padded_size(tuple(image_size[a] for a in order), walked.patch_size)
    dtype = _accumulator_dtype(padded, num_classes, walked)
    return WindowPlan(order, dataclasses.replace(walked, accumulate_dtype=dtype), padded,
                      tile_slices(padded, walked.patch_size, walked.step_fraction, walked.grid),
                      eq2_window_count(image_size, config.patch_size, config.step_fraction))


def accumulator_dtype(image_size: Sequence[int], num_classes: int, config: SlidingWindowConfig,
                      slab_axis: int | None = None) -> str:
    """The slab accumulators' dtype for this image: `config.accumulate_dtype`, or fp16 over the cap."""
    return plan_window(image_size, num_classes, config, slab_axis).config.accumulate_dtype


def _accumulator_dtype(padded: tuple[int, ...], num_classes: int, config: SlidingWindowConfig) -> str:
    """The accumulators hold K + 1 values (logits and the weight) per voxel of one slab: the patch
    along the walk axis times the padded in-plane size; over `config.memory_cap_mb` they go fp16."""
    cap = config.memory_cap_mb
    if cap is None:
        return config.accumulate_dtype
    slab = config.patch_size[0] * math.prod(padded[1:])

    def megabytes(dtype: str) -> float:
        return (num_classes + 1) * slab * itemsize(dtype) / 2**20

    if megabytes(config.accumulate_dtype) <= cap:
        return config.accumulate_dtype
    if megabytes("float16") > cap:
        raise InputError(
            f"the slab accumulators need {megabytes('float16'):.0f} MB even in fp16, over the cap of "
            f"{cap:.0f} MB; raise --memory-cap-mb or build the engine with a smaller patch"
        )
    return "float16"
