"""Tiled sliding-window inference with nnU-Net v2's numerics.

- The grid: nnU-Net's steps over the image, zero-padded where smaller than the patch (`grid`),
  decided once per image with the walk order and the accumulator dtype (`plan.plan_window`).
- Tiles are weighted by the blending map (`blending.Blending`; default nnU-Net's Gaussian).
- Accumulate weighted logits and weights, divide at the end (`accumulator.SlabAccumulator`).
  Mirror TTA averages the logits over every combination of flips of the allowed axes.
- Which windows to evaluate: the full grid or a skipping strategy (`selection`).

The chunks the walk hands out are in the model's axis order whatever the walk order
(`LogitChunk`). The predictor is any callable `tiles -> logits` (`config.Predictor`).

Arrays follow the predictor's device (`arrays`): numpy for a CPU predictor, so the CPU runtime
runs without torch; on a GPU the image, the tiles and the accumulators are torch tensors on the
device (fp16 accumulators, like nnU-Net, via `accumulate_dtype`); if the device cannot hold the
accumulators they move to host memory, and an image too large for the device stays in pinned host
memory with tiles copied over non-blocking.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from nnslim.compiler.runtime.window.accumulator import SlabAccumulator
from nnslim.compiler.runtime.window.arrays import arrays_for, device_of
from nnslim.compiler.runtime.window.config import SlidingWindowConfig
from nnslim.compiler.runtime.window.grid import pad_to_patch
from nnslim.compiler.runtime.window.plan import WindowPlan, plan_window
from nnslim.compiler.runtime.window.selection import WindowReport, WindowSelection, apply_strategies

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogitChunk:
    """Finished logits for the slices `[start, stop)` along `axis` of the (unpadded) image.

    Attributes:
        axis: the walk axis (0..2, in the model's axis order).
        start: first slice along `axis`.
        logits: `[K, *spatial]` in the model's axis order; full size on the other two axes (numpy,
            or a torch tensor when the walk ran on a GPU).
    """

    axis: int
    start: int
    logits: Any

    @property
    def stop(self) -> int:
        return self.start + self.logits.shape[1 + self.axis]

    @property
    def index(self) -> tuple[slice, ...]:
        """Where the chunk sits in the image's spatial axes."""
        spatial = self.logits.ndim - 1
        return tuple(slice(self.start, self.stop) if a == self.axis else slice(None) for a in range(spatial))


def _mirror_combinations(axes: Iterable[int]) -> list[tuple[int, ...]]:
    axes = tuple(axes)
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


class _Permuted:
    """A predictor seen in walk order: tiles are permuted back to the model's axes and back again."""

    def __init__(self, predictor: Callable[[Any], Any], plan: WindowPlan, arrays: Any) -> None:
        self.predictor, self.arrays = predictor, arrays
        self.to_model = (0, 1, *(a + 2 for a in plan.to_model))
        self.to_walk = (0, 1, *(a + 2 for a in plan.order))

    def __call__(self, tiles: Any) -> Any:
        return self.arrays.permute(self.predictor(self.arrays.permute(tiles, self.to_model)), self.to_walk)


class _Walk:
    """One walk over nnU-Net's grid, slab by slab along the walk axis (see `stream_logits`).

    Internally everything is in walk order (walk axis first): the image, the mask, the patch,
    the mirror axes and the predictor's view of its tiles; chunks go out in the model's order.
    """

    def __init__(self, image: Any, predictor: Callable[[Any], Any], num_classes: int, plan: WindowPlan,
                 selection: WindowSelection, progress: Callable[[int], None] | None) -> None:
        self.num_classes, self.plan = num_classes, plan
        self.arrays = arrays = arrays_for(device_of(predictor))
        self.config = config = plan.config
        self.progress = progress or (lambda done: None)
        self.strategies = selection.strategies()
        image = arrays.place(image, "the image")
        image = image if arrays.dtype_name(image).startswith("float") else arrays.astype(image, "float32")
        mask = selection.active_mask
        self.predictor = predictor
        if plan.order != tuple(range(len(plan.order))):
            image = arrays.permute(image, (0, *(a + 1 for a in plan.order)))
            mask = None if mask is None else np.transpose(np.asarray(mask), plan.order)
            self.predictor = _Permuted(predictor, plan, arrays)
        # one copy in walk order, zero-padded: tiles are gathered from one block of memory
        self.padded, self.region = pad_to_patch(image, config.patch_size, arrays, config.pad_value)
        # the body mask stays on the host, where the strategies look at it (`selection`)
        self.mask = None if mask is None else pad_to_patch(np.asarray(mask)[None], config.patch_size)[0][0] > 0
        self.mirrors = _mirror_combinations(config.mirror_axes)
        self.report = WindowReport(grid=plan.tiles, eq2=plan.eq2)
        size = plan.padded
        self.accumulator = SlabAccumulator.allocate(arrays, num_classes, (config.patch_size[0], *size[1:]), size[0],
                                                    config.blending, config.patch_size, config.accumulate_dtype)

    def run(self, sink: Callable[[LogitChunk], None]) -> WindowReport:
        """Walk every slab (windows sharing a start along the walk axis), emitting finished slices."""
        for _, slab in itertools.groupby(self.plan.slices, key=lambda s: s[0].start):
            slab = list(slab)
            self._emit(slab[0][0].start, sink)  # no window still to come touches the slices before it
            slab = apply_strategies(self.strategies, slab, self, self.report, self.progress)
            for first in range(0, len(slab), self.config.batch_size):
                self.predict(slab[first : first + self.config.batch_size])
        self._emit(self.plan.padded[0], sink)
        return self.report

    def predict(self, windows: list[tuple[slice, ...]]) -> Any:
        """Predict `windows` (mirror TTA averaged), add them to the accumulators, return the logits."""
        arrays = self.arrays
        # on a GPU whose image stayed in pinned host memory, the tiles go over non-blocking
        tiles = arrays.to_device(arrays.stack([self.padded[(slice(None), *s)] for s in windows]))
        expected = (len(windows), self.num_classes, *self.config.patch_size)
        prediction = None
        for axes in self.mirrors:
            flip_axes = [a + 2 for a in axes]
            flipped = arrays.flip(tiles, flip_axes) if flip_axes else tiles
            out = self.predictor(flipped)
            if tuple(out.shape) != expected:
                raise ValueError(f"predictor returned shape {tuple(out.shape)}, expected {expected}")
            out = arrays.flip(out, flip_axes) if flip_axes else out
            prediction = out if prediction is None else prediction + out
        accumulator = self.accumulator  # on a GPU walk, maybe on the host (the device was full)
        prediction = arrays.astype(arrays.beside(prediction, accumulator.logits), accumulator.dtype)
        if len(self.mirrors) > 1:
            prediction = prediction / len(self.mirrors)
        accumulator.add(windows, prediction)
        self.report.evaluated += len(windows)
        self.progress(len(windows))
        return prediction

    def _emit(self, stop: int, sink: Callable[[LogitChunk], None]) -> None:
        finished = self.accumulator.finish(stop, self.region[1:])
        if finished is None:
            return
        first, logits, uncovered = finished
        self.report.uncovered_voxels += uncovered
        sink(LogitChunk(self.plan.order[0], first, self.arrays.permute(logits, (0, *(a + 1 for a in self.plan.to_model)))))


def stream_logits(
    image: Any,
    predictor: Callable[[Any], Any],
    num_classes: int,
    config: SlidingWindowConfig,
    sink: Callable[[LogitChunk], None],
    progress: Callable[[int], None] | None = None,
    selection: WindowSelection = WindowSelection(),
    slab_axis: int | None = None,
    plan: WindowPlan | None = None,
) -> WindowReport:
    """Walk the windows slab by slab along one axis; hand finished slices to `sink`.

    The walk goes along `plan.order[0]` (default: the axis with the most window positions,
    the long axis of a whole-body scan). Accumulators cover one slab (`patch` slices along it),
    not the volume: when the walk reaches the next slab's start, every slice before it is final,
    so it is normalized (weighted sum / summed weights) and passed on as a `LogitChunk` in the
    unpadded image's coordinates and the model's axis order, in increasing order along the walk
    axis. Peak memory grows with the slab, not the volume. The windows are nnU-Net's grid
    whatever the walk order (only the summation order differs).

    Args:
        image: `[C, *spatial]` normalized volume, numpy or torch (moved to the predictor's device
            if it fits there).
        predictor: callable tiles -> logits (see `config.Predictor`); its device decides the arrays.
        num_classes: K, the predictor's output channels.
        config: patch, overlap, batching, blending, TTA, accumulation dtype and memory cap.
        sink: receives the finished chunks; together they cover every voxel exactly once.
        progress: called with the number of windows just done or skipped (progress bars).
        selection: the full grid (default) or a skipping strategy.
        slab_axis: the walk axis (None: the plan's choice).
        plan: the walk's decisions, when the caller made them already (`plan_window`).

    Raises:
        InputError: the accumulators do not fit under `config.memory_cap_mb`, even in fp16.
    """
    if image.ndim != 4:
        raise ValueError(f"expected an image [C, X, Y, Z], got shape {tuple(image.shape)}")
    plan = plan or plan_window(tuple(image.shape[1:]), num_classes, config, slab_axis)
    return _Walk(image, predictor, num_classes, plan, selection, progress).run(sink)


def sliding_window_inference(
    image: Any,
    predictor: Callable[[Any], Any],
    num_classes: int,
    config: SlidingWindowConfig,
    progress: Callable[[int], None] | None = None,
    selection: WindowSelection = WindowSelection(),
    report: WindowReport | None = None,
) -> Any:
    """Logits `[K, *spatial]` for a whole volume (`stream_logits` collected into one array).

    The logits are numpy for a CPU predictor; on a GPU, a tensor on the device in
    `config.accumulate_dtype`, or on the host when the device cannot hold them. `report`, if
    given, is filled with the window counts.
    """
    arrays = arrays_for(device_of(predictor))
    logits = arrays.zeros_or_host((num_classes, *image.shape[1:]), config.accumulate_dtype, "the logits")

    def collect(chunk: LogitChunk) -> None:
        logits[(slice(None), *chunk.index)] = arrays.beside(chunk.logits, logits)

    walked = stream_logits(image, predictor, num_classes, config, collect, progress, selection)
    if report is not None:
        vars(report).update(vars(walked))
    return logits
