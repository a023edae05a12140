"""The window's inputs: the predictor it drives and the settings of one walk.

The predictor is any callable `tiles [B, C, *patch] -> logits [B, K, *patch]` with a `device`
attribute: on "cpu" it takes and returns numpy arrays, on a CUDA device torch tensors on that
device (`arrays`); the window never knows which engine it drives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from nnslim.compiler.runtime.window.blending import Blending


class Predictor(Protocol):
    """`tiles [B, C, *patch] -> logits [B, K, *patch]` on one device (every backend's adapter):
    numpy arrays on "cpu", torch tensors on "cuda:N"."""

    device: Any  # "cpu", "cuda:0" (a torch.device is read as its string)

    def __call__(self, tiles: Any) -> Any: ...


@dataclass(frozen=True)
class SlidingWindowConfig:
    """How the window walks the volume.

    Attributes:
        patch_size: tile size, the model's input size.
        step_fraction: step as a fraction of the patch (nnU-Net: 0.5).
        batch_size: tiles per predictor call.
        blending: the tile weight (default: nnU-Net's Gaussian, sigma P/8, maximum 10).
        grid: where the windows are, a key of `grid.GRID_RULES` ("nnunet", or MONAI's "monai").
        pad_value: what the image is padded with where it is smaller than the patch (MONAI's cval).
        mirror_axes: spatial axes (0..2) whose flips are averaged; empty disables TTA.
        accumulate_dtype: dtype of the logit accumulator, "float32" or "float16".
        memory_cap_mb: bound for the slab accumulators (None: no bound); over it they switch to
            fp16, and a slab that does not fit even then is an error (`plan.accumulator_dtype`).
    """

    patch_size: tuple[int, ...]
    step_fraction: float = 0.5
    batch_size: int = 1
    blending: Blending = Blending()
    grid: str = "nnunet"
    pad_value: float = 0.0
    mirror_axes: tuple[int, ...] = ()
    accumulate_dtype: str = "float32"
    memory_cap_mb: float | None = None
