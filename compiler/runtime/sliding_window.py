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

On a GPU the image, the tiles and the accumulators live on the device (fp16 accumulators, like
nnU-Net, via `accumulate_dtype`); if the device cannot hold the accumulators they move to host
memory, and an image too large for the device stays in pinned host memory with tiles copied over
non-blocking.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class WindowSelection:
    """Which windows of the grid to evaluate: the full grid, or opt-in approximations of it.

    Attributes:
        mode: "full"; "mask" (skip windows holding no voxel of `mask`); "roi" (seed 003: per slab
            of windows along the walk axis, predict the in-plane centre window first and skip the
            slab's other windows when it predicts fewer than `roi_threshold` foreground voxels);
            "roi+mask" (both).
        roi_threshold: foreground voxels (label != 0) the centre window must predict (seed 003: 1000),
            counted inside `mask` when one is given.
        mask: `[*spatial]` bool, the body mask (see `body_mask`): required for the mask modes,
            optional for "roi".

    Unlike seed 003's published code, an active slab is evaluated on the full in-plane grid (no
    fixed 3x3 that drops the periphery), and voxels no evaluated window covers are not left
    undefined: they get logits 0 (background) and are counted in the report.
    """

    mode: str = "full"
    roi_threshold: int = 1000
    mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("full", "mask", "roi", "roi+mask"):
            raise ValueError(f"window selection must be full, mask, roi or roi+mask; got {self.mode!r}")
        if "mask" in self.mode and self.mask is None:
            raise ValueError(f"window selection {self.mode!r} needs a mask")


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


def body_mask(image: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """The body, cheaply: voxels whose 3x3x3 mean of the first channel exceeds
    `p1 + fraction * (p99 - p1)`.

    On CT (air at about -1000 HU) the cut sits near -870 HU; on MRI with a zero background, at a
    tenth of the bright range. The local mean keeps isolated noise voxels in the air out (and
    grows the body by about one voxel). Percentiles come from a strided subsample.
    """
    channel = image[0].float()
    sample = channel.reshape(-1)[:: max(1, channel.numel() // 1_000_000)]
    low, high = torch.quantile(sample, torch.tensor([0.01, 0.99], device=sample.device, dtype=sample.dtype))
    smoothed = torch.nn.functional.avg_pool3d(channel[None, None], 3, stride=1, padding=1, count_include_pad=False)
    return smoothed[0, 0] > low + fraction * (high - low)


def eq2_window_count(image_size: Sequence[int], patch_size: Sequence[int], step_fraction: float) -> int:
    return math.prod(math.ceil((max(i, p) - p) / (step_fraction * p)) for i, p in zip(image_size, patch_size))


def walk_order(image_size: Sequence[int], config: SlidingWindowConfig, slab_axis: int | None = None) -> tuple[int, ...]:
    """Axis order of the walk: the slab axis first (None: the axis with the most window
    positions, the first of equals), then the others in order."""
    if slab_axis is None:
        padded = [max(s, p) for s, p in zip(image_size, config.patch_size)]
        counts = [len(s) for s in compute_steps(padded, config.patch_size, config.step_fraction)]
        slab_axis = counts.index(max(counts))
    return (slab_axis, *(a for a in range(len(image_size)) if a != slab_axis))


class _Permuted:
    """A predictor seen in walk order: tiles are permuted back to the model's axes and back again."""

    def __init__(self, predictor: Callable[[torch.Tensor], torch.Tensor], order: tuple[int, ...]) -> None:
        self.predictor, self.device = predictor, getattr(predictor, "device", torch.device("cpu"))
        self.to_model = (0, 1, *(int(i) + 2 for i in np.argsort(order)))
        self.to_walk = (0, 1, *(a + 2 for a in order))

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.predictor(tiles.permute(self.to_model).contiguous()).permute(self.to_walk)


def stream_logits(
    image: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    num_classes: int,
    config: SlidingWindowConfig,
    sink: Callable[[int, torch.Tensor], None],
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
    selection: WindowSelection = WindowSelection(),
    slab_axis: int | None = None,
) -> WindowReport:
    """Walk the windows slab by slab along one axis; hand finished slices to `sink`.

    The walk goes along `walk_order(...)[0]` (default: the axis with the most window positions,
    the long axis of a whole-body scan). Accumulators cover one slab (`patch` slices along it),
    not the volume: when the walk reaches the next slab's start, every slice before it is final,
    so it is normalized (weighted sum / summed weights) and passed on as
    `sink(first_slice, logits [K, n, ...])` in the unpadded image's coordinates, in order, with
    the chunk's spatial axes in walk order. Peak memory grows with the slab, not the volume. The
    windows are nnU-Net's grid whatever the walk order (only the summation order differs).

    Args:
        image: `[C, *spatial]` normalized volume (any device; moved to `device` if it fits).
        predictor: callable tiles -> logits (see `Predictor`).
        num_classes: K, the predictor's output channels.
        config: patch, overlap, batching, TTA, accumulation dtype.
        sink: receives the finished logits, slices in increasing order, each exactly once.
        device: where tiles are gathered; defaults to the predictor's.
        progress: called with the number of windows just done or skipped (progress bars).
        selection: full grid (default) or a skipping strategy.
    """
    if image.ndim != 4:
        raise ValueError(f"expected an image [C, X, Y, Z], got shape {tuple(image.shape)}")
    device = torch.device(device or getattr(predictor, "device", "cpu"))
    if not image.is_floating_point():
        image = image.float()
    image = _place(image, device, "the image")
    order = walk_order(image.shape[1:], config, slab_axis)
    mask = selection.mask if selection.mode != "full" else None
    if order != (0, 1, 2):
        image = image.permute(0, *(a + 1 for a in order))
        mask = None if mask is None else mask.permute(order)
        config = dataclasses.replace(config, patch_size=tuple(config.patch_size[a] for a in order),
                                     mirror_axes=tuple(order.index(a) for a in config.mirror_axes))
        predictor = _Permuted(predictor, order)
    padded, region = pad_to_patch(image, config.patch_size)
    size = padded.shape[1:]
    slices = tile_slices(size, config)
    report = WindowReport(grid=len(slices), eq2=eq2_window_count(image.shape[1:], config.patch_size, config.step_fraction))
    if mask is not None:
        mask, _ = pad_to_patch(mask[None].to(padded.device, torch.float32), config.patch_size)
        mask = mask[0] > 0
    mirrors = _mirror_combinations(config.mirror_axes)
    depth = config.patch_size[0]
    try:
        band, weights, weight = _accumulators((depth, *size[1:]), num_classes, config, device)
    except torch.OutOfMemoryError:  # nnU-Net's fallback: accumulate in host memory
        logger.warning("not enough GPU memory for the accumulators; accumulating on the CPU")
        torch.cuda.empty_cache()
        band, weights, weight = _accumulators((depth, *size[1:]), num_classes, config, torch.device("cpu"))
    target = band.device
    band_start = 0  # padded slice index of band[:, 0]

    def predict(window_slices: list[tuple[slice, ...]]) -> torch.Tensor:
        tiles = torch.stack([padded[(slice(None), *s)] for s in window_slices])
        if tiles.device != device:  # host -> GPU: from pinned memory, without blocking the host
            tiles = tiles.pin_memory().to(device, non_blocking=True)
        prediction = None
        for axes in mirrors:
            flip_dims = [a + 2 for a in axes]
            flipped = torch.flip(tiles, flip_dims) if flip_dims else tiles
            out = predictor(flipped.contiguous())
            if out.shape != (len(window_slices), num_classes, *config.patch_size):
                raise ValueError(
                    f"predictor returned shape {tuple(out.shape)}, expected "
                    f"{(len(window_slices), num_classes, *config.patch_size)}"
                )
            out = torch.flip(out, flip_dims) if flip_dims else out
            prediction = out if prediction is None else prediction + out
        prediction = prediction.to(device=target, dtype=config.accumulate_dtype) / len(mirrors)
        for s, tile_logits in zip(window_slices, prediction):
            rows = slice(s[0].start - band_start, s[0].stop - band_start)
            band[(slice(None), rows, *s[1:])] += tile_logits * weight
            weights[(rows, *s[1:])] += weight
        report.evaluated += len(window_slices)
        if progress:
            progress(len(window_slices))
        return prediction

    def flush(stop: int) -> None:
        """Emit padded slices [band_start, stop) and shift the band so it starts at `stop`."""
        nonlocal band, weights, band_start
        n = min(stop, size[0]) - band_start
        if n <= 0:
            return
        first, last = max(band_start, region[1].start), min(band_start + n, region[1].stop)  # unpadded rows
        if first < last:
            rows = slice(first - band_start, last - band_start)
            covered = weights[(rows, *region[2:])] > 0
            report.uncovered_voxels += int((~covered).sum())
            summed = band[(slice(None), rows, *region[2:])]
            sink(first - region[1].start,
                 torch.where(covered, summed / torch.where(covered, weights[(rows, *region[2:])], 1), 0))
        band = torch.cat((band[:, n:], torch.zeros_like(band[:, :n])), dim=1)
        weights = torch.cat((weights[n:], torch.zeros_like(weights[:n])), dim=0)
        band_start += n

    for _, slab in itertools.groupby(slices, key=lambda s: s[0].start):
        slab = list(slab)
        flush(slab[0][0].start)
        if mask is not None and "mask" in selection.mode:
            kept = [s for s in slab if bool(mask[s].any())]
            report.skipped_by_mask += len(slab) - len(kept)
            if progress and len(slab) > len(kept):
                progress(len(slab) - len(kept))
            slab = kept
        if not slab:
            continue
        if "roi" in selection.mode:
            centre = _centre_window(slab)
            found = _foreground_voxels(predict([centre]), None if mask is None else mask[centre])
            slab = [s for s in slab if s is not centre]
            if found < selection.roi_threshold:
                report.skipped_by_roi += len(slab)
                if progress and slab:
                    progress(len(slab))
                continue
        for first in range(0, len(slab), config.batch_size):
            predict(slab[first : first + config.batch_size])
    flush(size[0])
    return report


def _centre_window(slab: list[tuple[slice, ...]]) -> tuple[slice, ...]:
    """The window whose in-plane centre is nearest the slab's in-plane centre."""
    lo = [min(s[a].start for s in slab) for a in (1, 2)]
    hi = [max(s[a].stop for s in slab) for a in (1, 2)]
    middle = [(a + b) / 2 for a, b in zip(lo, hi)]
    return min(slab, key=lambda s: sum(((s[a].start + s[a].stop) / 2 - middle[a - 1]) ** 2 for a in (1, 2)))


def _foreground_voxels(logits: torch.Tensor, inside: torch.Tensor | None = None) -> int:
    """Voxels whose argmax is not background in one tile's logits `[1, K, ...]`, counted only
    `inside` the body mask when one is given (a network with instance normalization can predict
    tissue in an all-air tile, whose features normalize to zero)."""
    foreground = logits[0].argmax(0) != 0
    if inside is not None:
        foreground &= inside.to(foreground.device)
    return int(foreground.sum())


def sliding_window_inference(
    image: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    num_classes: int,
    config: SlidingWindowConfig,
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
    selection: WindowSelection = WindowSelection(),
    report: WindowReport | None = None,
) -> torch.Tensor:
    """Logits `[K, *spatial]` for a whole volume (`stream_logits` collected into one tensor).

    The logits live on the predictor's device in `config.accumulate_dtype`, or on the CPU when
    the device cannot hold them. `report`, if given, is filled with the window counts.
    """
    device = torch.device(device or getattr(predictor, "device", "cpu"))
    try:
        logits = torch.zeros((num_classes, *image.shape[1:]), device=device, dtype=config.accumulate_dtype)
    except torch.OutOfMemoryError:
        logger.warning("not enough GPU memory for the %s logits; collecting them on the CPU", tuple(image.shape[1:]))
        torch.cuda.empty_cache()
        logits = torch.zeros((num_classes, *image.shape[1:]), dtype=config.accumulate_dtype)

    order = walk_order(image.shape[1:], config)
    in_walk_order = logits.permute(0, *(a + 1 for a in order))  # a view: writes land in `logits`

    def collect(first: int, chunk: torch.Tensor) -> None:
        in_walk_order[:, first : first + chunk.shape[1]] = chunk.to(logits.device)

    walked = stream_logits(image, predictor, num_classes, config, collect, device, progress, selection, order[0])
    if report is not None:
        vars(report).update(vars(walked))
    return logits


def _place(tensor: torch.Tensor, device: torch.device, what: str) -> torch.Tensor:
    """`tensor` on `device`; if the GPU cannot hold it, pinned host memory (tiles copy over non-blocking)."""
    if tensor.device == device:
        return tensor
    try:
        return tensor.to(device)
    except torch.OutOfMemoryError:
        logger.warning("not enough GPU memory for %s %s; keeping it in pinned host memory", what, tuple(tensor.shape))
        torch.cuda.empty_cache()
        return tensor.cpu().pin_memory()


def _accumulators(
    size: Sequence[int], num_classes: int, config: SlidingWindowConfig, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zeroed logit and weight sums, and the per-tile weight, on `device` in the accumulation dtype."""
    dtype = config.accumulate_dtype
    weight = (
        gaussian_importance_map(config.patch_size, device=device, dtype=dtype)
        if config.gaussian
        else torch.ones(config.patch_size, device=device, dtype=dtype)
    )
    logits = torch.zeros((num_classes, *size), device=device, dtype=dtype)
    weights = torch.zeros(tuple(size), device=device, dtype=dtype)
    return logits, weights, weight


def count_tiles(image_size: Sequence[int], config: SlidingWindowConfig) -> int:
    """Number of tiles (per mirror pass) for a volume of this size."""
    padded = [max(s, p) for s, p in zip(image_size, config.patch_size)]
    return len(tile_slices(padded, config))
