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

from typing import Any, Sequence

from nnslim.compiler.runtime.window.blending import Blending


class SlabAccumulator:
    """Weighted logit and weight sums for `depth` slices of the padded volume (module docstring).

    Args:
        arrays: the namespace the buffers live in (`arrays.arrays_for`: numpy, or torch on a GPU).
        num_classes: K, the logit channels.
        slab_shape: `(depth, *in-plane)` of the padded volume, walk axis first.
        length: the padded volume's size along the walk axis.
        tile_weight: `[*patch]` blending weight, in the accumulation dtype.
        on_host: allocate the buffers in host memory (a device that could not hold them).
    """

    def __init__(self, arrays: Any, num_classes: int, slab_shape: Sequence[int], length: int, tile_weight: Any) -> None:
        self.arrays, self.tile_weight = arrays, tile_weight
        dtype = arrays.dtype_name(tile_weight)
        self.logits = arrays.zeros_or_host((num_classes, *slab_shape), dtype, "the accumulators")
        self.weights = arrays.zeros_or_host(tuple(slab_shape), dtype, "the accumulators")
        self.tile_weight = arrays.beside(tile_weight, self.logits)  # the host, if the device was full
        self.length = length
        self.start = 0  # padded slice index of logits[:, 0]
        self.scratch: dict = {}  # the namespace's reusable buffers (`arrays.add_weighted`)

    @classmethod
    def allocate(cls, arrays: Any, num_classes: int, slab_shape: Sequence[int], length: int, blending: Blending,
                 patch_size: Sequence[int], dtype: str) -> SlabAccumulator:
        """Buffers in `dtype`, on the device of `arrays`; in host memory when a GPU cannot hold them
        (nnU-Net's fallback)."""
        return cls(arrays, num_classes, slab_shape, length, blending.weights(patch_size, dtype, arrays))

    @property
    def device(self) -> Any:
        return getattr(self.logits, "device", "cpu")

    @property
    def dtype(self) -> str:
        return self.arrays.dtype_name(self.logits)

    def add(self, windows: Sequence[tuple[slice, ...]], prediction: Any) -> None:
        """Add `prediction [B, K, *patch]` (on this device, in this dtype) for the B `windows`
        (padded coordinates, walk axis first), each weighted by the tile weight."""
        for window, tile_logits in zip(windows, prediction):
            rows = slice(window[0].start - self.start, window[0].stop - self.start)
            region = (rows, *window[1:])
            self.arrays.add_weighted(self.logits[(slice(None), *region)], tile_logits, self.tile_weight, self.scratch)
            self.weights[region] += self.tile_weight

    def finish(self, stop: int, region: tuple[slice, ...]) -> tuple[int, Any, int] | None:
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
            logits = self.arrays.where(covered, summed / self.arrays.where(covered, weights, 1), 0)
            result = (first - region[0].start, logits, int((~covered).sum()))
        arrays = self.arrays
        self.logits = arrays.concat((self.logits[:, n:], arrays.zeros_like(self.logits[:, :n])), axis=1)
        self.weights = arrays.concat((self.weights[n:], arrays.zeros_like(self.weights[:n])), axis=0)
        self.start += n
        return result
