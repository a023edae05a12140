"""Weighted logit sums over one slab of the padded volume, divided when a slice is final.

nnU-Net accumulates `sum_t w * logits_t` and `sum_t w` over every tile `t` covering a voxel and
divides at the end. Here the buffers cover only one slab: `depth` (the patch along the walk
axis) slices starting at `start`. The walker visits window rows in increasing order along that
axis, so when it reaches a row starting at `s`, every slice before `s` has all its tiles: those
slices are divided out (`finish`) and the buffers shift by that many slices. Peak memory grows
with the slab, not the volume.

Voxels that no evaluated window covered (window skipping) have weight 0: they get logits 0
(background after argmax) and are counted, never divided by zero.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from nnslim.compiler.runtime.window.blending import Blending

logger = logging.getLogger(__name__)


class SlabAccumulator:
    """Weighted logit and weight sums for `depth` slices of the padded volume (module docstring).

    Args:
        num_classes: K, the logit channels.
        slab_shape: `(depth, *in-plane)` of the padded volume, walk axis first.
        length: the padded volume's size along the walk axis.
        tile_weight: `[*patch]` blending weight, in the accumulation dtype.
    """

    def __init__(self, num_classes: int, slab_shape: Sequence[int], length: int, tile_weight: torch.Tensor) -> None:
        self.tile_weight = tile_weight
        self.logits = torch.zeros((num_classes, *slab_shape), device=tile_weight.device, dtype=tile_weight.dtype)
        self.weights = torch.zeros(tuple(slab_shape), device=tile_weight.device, dtype=tile_weight.dtype)
        self.length = length
        self.start = 0  # padded slice index of logits[:, 0]

    @classmethod
    def allocate(cls, num_classes: int, slab_shape: Sequence[int], length: int, blending: Blending,
                 patch_size: Sequence[int], dtype: torch.dtype, device: torch.device) -> SlabAccumulator:
        """Buffers in `dtype` on `device`; when the GPU cannot hold them, in host memory (nnU-Net's fallback)."""
        try:
            return cls(num_classes, slab_shape, length, blending.weights(patch_size, device, dtype))
        except torch.OutOfMemoryError:
            logger.warning("not enough GPU memory for the accumulators; accumulating on the CPU")
            torch.cuda.empty_cache()
            return cls(num_classes, slab_shape, length, blending.weights(patch_size, "cpu", dtype))

    @property
    def device(self) -> torch.device:
        return self.logits.device

    @property
    def dtype(self) -> torch.dtype:
        return self.logits.dtype

    def add(self, windows: Sequence[tuple[slice, ...]], prediction: torch.Tensor) -> None:
        """Add `prediction [B, K, *patch]` (on this device, in this dtype) for the B `windows`
        (padded coordinates, walk axis first), each weighted by the tile weight."""
        for window, tile_logits in zip(windows, prediction):
            rows = slice(window[0].start - self.start, window[0].stop - self.start)
            # in place into the slab's view: no temporary the size of a tile's logits
            self.logits[(slice(None), rows, *window[1:])].addcmul_(tile_logits, self.tile_weight)
            self.weights[(rows, *window[1:])] += self.tile_weight

    def finish(self, stop: int, region: tuple[slice, ...]) -> tuple[int, torch.Tensor, int] | None:
        """Divide out padded slices `[start, stop)` and shift the buffers to start at `stop`.

        Args:
            stop: the first slice still to receive tiles (the volume's end for the last call).
            region: spatial slices of the unpadded image inside the padded volume.

        Returns:
            `(first, logits [K, n, *in-plane], uncovered)` for the part of those slices inside
            `region` (`first` in unpadded coordinates, `uncovered` the voxels without weight), or
            None when none of them lies inside it.
        """
        n = min(stop, self.length) - self.start
        if n <= 0:
            return None
        result = None
        first, last = max(self.start, region[0].start), min(self.start + n, region[0].stop)  # unpadded rows
        if first < last:
            rows = slice(first - self.start, last - self.start)
            weights = self.weights[(rows, *region[1:])]
            covered = weights > 0
            summed = self.logits[(slice(None), rows, *region[1:])]
            logits = torch.where(covered, summed / torch.where(covered, weights, 1), 0)
            result = (first - region[0].start, logits, int((~covered).sum()))
        self.logits = torch.cat((self.logits[:, n:], torch.zeros_like(self.logits[:, :n])), dim=1)
        self.weights = torch.cat((self.weights[n:], torch.zeros_like(self.weights[:n])), dim=0)
        self.start += n
        return result

