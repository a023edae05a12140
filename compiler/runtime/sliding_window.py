"""Tiled sliding-window inference with nnU-Net v2's numerics.

- Axes smaller than the patch are zero-padded, centred (`below = diff // 2`); the rest untouched.
- Steps per axis: `n = ceil((I - P) / (P * step)) + 1`, starts `round(i * (I - P) / (n - 1))`
  (only 0 when n == 1); Python's round, like numpy's, rounds halves to even. An axis with patch 1
  (a 2D model's slice axis) visits every slice once.
- Importance map: a delta at `P // 2` blurred by a Gaussian with sigma `P / 8` per axis (scipy's
  `gaussian_filter`, constant mode, truncate 4), scaled to a maximum of 10; zeros replaced by
  the smallest nonzero value so no voxel gets weight zero.
- Accumulate weighted logits and weights, divide at the end. Mirror TTA averages the logits over
  every combination of flips of the allowed axes.

The predictor is any callable `tiles [B, C, *patch] -> logits [B, K, *patch]` with a `device`
attribute (torch tensors in and out); the window never knows which engine it drives.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np
import torch
from scipy.ndimage import gaussian_filter


class Predictor(Protocol):
    device: torch.device

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor: ...


def compute_steps(image_size: Sequence[int], patch_size: Sequence[int], step_fraction: float) -> list[list[int]]:
    """Start offsets per axis; `image_size` must already be >= `patch_size` on every axis."""
    if not 0 < step_fraction <= 1:
        raise ValueError(f"step fraction must be in (0, 1], got {step_fraction}")
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


@lru_cache(maxsize=8)
def _gaussian_numpy(patch_size: tuple[int, ...], sigma_scale: float, value_scaling: float) -> np.ndarray:
    delta = np.zeros(patch_size, dtype=np.float64)
    delta[tuple(p // 2 for p in patch_size)] = 1.0
    blurred = gaussian_filter(delta, [p * sigma_scale for p in patch_size], order=0, mode="constant", cval=0)
    blurred = blurred / (blurred.max() / value_scaling)
    zero = blurred == 0
    if zero.any():
        blurred[zero] = blurred[~zero].min()
    return blurred


def gaussian_importance_map(
    patch_size: Sequence[int],
    sigma_scale: float = 1.0 / 8,
    value_scaling: float = 10.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """nnU-Net's per-voxel tile weight (see module docstring)."""
    array = _gaussian_numpy(tuple(int(p) for p in patch_size), sigma_scale, value_scaling)
    return torch.from_numpy(array).to(device=device, dtype=dtype)


def pad_to_patch(image: torch.Tensor, patch_size: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad spatial axes smaller than the patch, centred; returns the padded tensor and the
    slices that cut the original region back out (image is `[C, *spatial]`)."""
    spatial = image.shape[1:]
    before = [max(p - s, 0) // 2 for s, p in zip(spatial, patch_size)]
    after = [max(p - s, 0) - b for s, p, b in zip(spatial, patch_size, before)]
    if any(before) or any(after):
        # F.pad takes pairs for the last axis first
        pads = [v for b, a in zip(reversed(before), reversed(after)) for v in (b, a)]
        image = torch.nn.functional.pad(image, pads, mode="constant", value=0.0)
    region = (slice(None),) + tuple(slice(b, b + s) for b, s in zip(before, spatial))
    return image, region


@dataclass(frozen=True)
class SlidingWindowConfig:
    """How the window walks the volume.

    Attributes:
        patch_size: tile size, the model's input size.
        step_fraction: step as a fraction of the patch (nnU-Net: 0.5).
        batch_size: tiles per predictor call.
        gaussian: weight tiles with the importance map (otherwise uniform).
        mirror_axes: spatial axes (0..2) whose flips are averaged; empty disables TTA.
        accumulate_dtype: dtype of the logit accumulator.
    """

    patch_size: tuple[int, int, int]
    step_fraction: float = 0.5
    batch_size: int = 1
    gaussian: bool = True
    mirror_axes: tuple[int, ...] = ()
    accumulate_dtype: torch.dtype = torch.float32


def tile_slices(padded_size: Sequence[int], config: SlidingWindowConfig) -> list[tuple[slice, ...]]:
    """Every tile's spatial slices, in nnU-Net's order (last axis fastest)."""
    steps = compute_steps(padded_size, config.patch_size, config.step_fraction)
    return [
        tuple(slice(s, s + p) for s, p in zip(start, config.patch_size))
        for start in itertools.product(*steps)
    ]


def _mirror_combinations(axes: Iterable[int]) -> list[tuple[int, ...]]:
    axes = tuple(axes)
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


def sliding_window_inference(
    image: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    num_classes: int,
    config: SlidingWindowConfig,
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Predict logits for a whole volume.

    Args:
        image: `[C, *spatial]` normalized volume (any device; moved to `device`).
        predictor: callable tiles -> logits (see `Predictor`).
        num_classes: K, the predictor's output channels.
        config: patch, overlap, batching, TTA.
        device: where tiles are gathered and logits accumulated; defaults to the predictor's.
        progress: called with the number of tiles just done (for progress bars).

    Returns:
        Logits `[K, *spatial]` in `config.accumulate_dtype` on `device`.
    """
    if image.ndim != 4:
        raise ValueError(f"expected an image [C, X, Y, Z], got shape {tuple(image.shape)}")
    device = torch.device(device or getattr(predictor, "device", "cpu"))
    image = image.to(device=device)
    if not image.is_floating_point():
        image = image.float()
    padded, region = pad_to_patch(image, config.patch_size)
    slices = tile_slices(padded.shape[1:], config)
    weight = (
        gaussian_importance_map(config.patch_size, device=device, dtype=config.accumulate_dtype)
        if config.gaussian
        else torch.ones(config.patch_size, device=device, dtype=config.accumulate_dtype)
    )
    logits = torch.zeros((num_classes, *padded.shape[1:]), device=device, dtype=config.accumulate_dtype)
    weights = torch.zeros(padded.shape[1:], device=device, dtype=config.accumulate_dtype)
    mirrors = _mirror_combinations(config.mirror_axes)

    for first in range(0, len(slices), config.batch_size):
        batch_slices = slices[first : first + config.batch_size]
        tiles = torch.stack([padded[(slice(None), *s)] for s in batch_slices])
        prediction = None
        for axes in mirrors:
            flip_dims = [a + 2 for a in axes]
            flipped = torch.flip(tiles, flip_dims) if flip_dims else tiles
            out = predictor(flipped.contiguous())
            if out.shape != (len(batch_slices), num_classes, *config.patch_size):
                raise ValueError(
                    f"predictor returned shape {tuple(out.shape)}, expected "
                    f"{(len(batch_slices), num_classes, *config.patch_size)}"
                )
            out = torch.flip(out, flip_dims) if flip_dims else out
            prediction = out if prediction is None else prediction + out
        prediction = prediction.to(device=device, dtype=config.accumulate_dtype) / len(mirrors)
        for s, tile_logits in zip(batch_slices, prediction):
            logits[(slice(None), *s)] += tile_logits * weight
            weights[s] += weight
        if progress:
            progress(len(batch_slices))

    logits /= weights
    return logits[region]


def count_tiles(image_size: Sequence[int], config: SlidingWindowConfig) -> int:
    """Number of tiles (per mirror pass) for a volume of this size."""
    padded = [max(s, p) for s, p in zip(image_size, config.patch_size)]
    return len(tile_slices(padded, config))
