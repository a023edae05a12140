"""How overlapping tiles are blended: the per-voxel weight a tile's logits get (MONAI's `mode`).

Blending is data, a `Blending` record, with nnU-Net v2's values as the default:
- "gaussian": a delta at `P // 2` blurred by a Gaussian with sigma `sigma_scale * P` per axis
  (scipy's `gaussian_filter`, constant mode, truncate 4; nnU-Net: `sigma_scale = 1/8`), scaled so
  its maximum is `value_scaling` (nnU-Net: 10); then cast to the accumulation dtype, and voxels
  that are zero there get the smallest nonzero weight, so no voxel of a tile counts for nothing
  (this is nnU-Net's order: in fp16 the far corners underflow to zero and are clamped after the
  cast).
- "constant": every voxel of a tile weighs 1 (plain averaging of overlaps).

The Gaussian follows one of two rules (`Blending.rule`):
- "nnunet" (above).
- "monai" (MONAI's `compute_importance_map`): the product over axes of
  `exp(-x**2 / (2 * sigma**2))` at `x = -(P - 1) / 2 ... (P - 1) / 2` (centred between voxels on an
  even axis), in float32, its maximum 1 on an odd patch; values below `max(min, 1e-3)` are raised to it.

The window divides the weighted logit sum by the weight sum, so a constant factor on the weights
cancels; the scaling to 10 matters only for fp16 range.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

BLENDING_MODES = ("gaussian", "constant")
BLENDING_RULES = ("nnunet", "monai")


@dataclass(frozen=True)
class Blending:
    """The tile weight (see module docstring).

    Attributes:
        mode: "gaussian" (nnU-Net, MONAI's default too) or "constant".
        sigma_scale: Gaussian sigma as a fraction of the patch, per axis.
        value_scaling: the Gaussian's maximum (the "nnunet" rule).
        rule: how the Gaussian is drawn: "nnunet" or "monai" (module docstring).
    """

    mode: str = "gaussian"
    sigma_scale: float = 1.0 / 8
    value_scaling: float = 10.0
    rule: str = "nnunet"

    def __post_init__(self) -> None:
        if self.mode not in BLENDING_MODES:
            raise ValueError(f"blending mode must be one of {BLENDING_MODES}, got {self.mode!r}")
        if self.rule not in BLENDING_RULES:
            raise ValueError(f"blending rule must be one of {BLENDING_RULES}, got {self.rule!r}")
        if not (self.sigma_scale > 0 and self.value_scaling > 0):
            raise ValueError(f"blending needs sigma_scale > 0 and value_scaling > 0, got {self.sigma_scale}, "
                             f"{self.value_scaling}")

    def weights(self, patch_size: Sequence[int], dtype: str = "float32", arrays: Any = None) -> Any:
        """The weight of every voxel of a tile, `[*patch_size]` in `dtype`, in the namespace `arrays`
        (`arrays.arrays_for`; default: a numpy array)."""
        if self.mode == "constant":
            weights = np.ones(tuple(patch_size), dtype=dtype)
        elif self.rule == "monai":
            weights = monai_importance_map(patch_size, self.sigma_scale).astype(dtype)
        else:
            weights = gaussian_importance_map(patch_size, self.sigma_scale, self.value_scaling, dtype)
        if arrays is None:
            return weights
        return arrays.place(weights, "the tile weights")


@lru_cache(maxsize=8)
def _gaussian_numpy(patch_size: tuple[int, ...], sigma_scale: float, value_scaling: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    delta = np.zeros(patch_size, dtype=np.float64)
    delta[tuple(p // 2 for p in patch_size)] = 1.0
    blurred = gaussian_filter(delta, [p * sigma_scale for p in patch_size], order=0, mode="constant", cval=0)
    blurred = blurred / (blurred.max() / value_scaling)
    blurred.flags.writeable = False  # cached: shared by every caller
    return blurred


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8, value_scaling: float = 10.0,
                            dtype: str = "float32") -> np.ndarray:
    """nnU-Net's per-voxel tile weight in `dtype`, zeros (after the cast) clamped to the smallest nonzero."""
    weights = _gaussian_numpy(tuple(int(p) for p in patch_size), sigma_scale, value_scaling).astype(dtype)
    zero = weights == 0
    if zero.any():
        weights[zero] = weights[~zero].min()
    return weights


def monai_importance_map(patch_size: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """MONAI's Gaussian tile weight (`compute_importance_map`, mode "gaussian"), float32."""
    weights = np.ones((), dtype=np.float32)
    for size in patch_size:
        x = np.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=np.float32)
        sigma = np.float32(size * sigma_scale)
        weights = np.multiply.outer(weights, np.exp(x**2 / (np.float32(-2) * sigma**2)))
    return np.maximum(weights, max(float(weights.min()), 1e-3)).astype(np.float32)
