"""Postprocessing after the sliding window: labels in the input's geometry.

Logits are resampled back to the cropped shape (before argmax), turned into labels (argmax, or
nnU-Net's region order with sigmoid > 0.5), pasted into the uncropped volume (background
elsewhere) and the axes permuted back (`Prepared` from `preprocessing` says how). On the main path
this happens slab by slab as the window finishes them (`StreamingLabeler`), so the whole volume's
logits are never held; `to_labels` does the same for logits already in memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from nnslim.compiler.runtime.preprocessing import Prepared, axis_weights, resample, resample_axis
from nnslim.compiler.runtime.window.arrays import TORCH_CPU, NumpyArrays, arrays_for, to_numpy
from nnslim.errors import EngineError

if TYPE_CHECKING:
    from nnslim.compiler.runtime.window.walk import LogitChunk


def logits_to_labels(logits: Any, post: dict | None) -> np.ndarray:
    """uint8 labels on the host from logits `[K, ...]` (numpy, or a tensor on a GPU): argmax (the
    first maximum on ties), or nnU-Net's regions: heads in `class_order`, sigmoid > 0.5 (logit >
    0), later wins. Labels fit uint8 (at most 255 classes, checked at load)."""
    if not post or post.get("kind", "argmax") == "argmax":
        return to_numpy(logits.argmax(0)).astype(np.uint8, copy=False)
    if post.get("kind") != "regions":
        raise EngineError(f"unsupported postprocessing {post}")
    above = to_numpy(logits > post.get("threshold_logit", 0.0))
    labels = np.zeros(above.shape[1:], dtype=np.uint8)
    for head, label in enumerate(post["class_order"]):
        labels[above[head]] = int(label)
    return labels


def to_labels(logits: np.ndarray, prepared: Prepared, post: dict | None = None) -> np.ndarray:
    """Model-space logits `[K, ...]` (numpy) -> label volume in the input array's axes and shape."""
    labels = logits_to_labels(resample(logits, prepared.cropped_shape, prepared.back_orders), post)
    return restore_geometry(labels, prepared)


def restore_geometry(labels: np.ndarray, prepared: Prepared) -> np.ndarray:
    """Labels at the cropped shape -> the input array's shape and axes (background outside the crop)."""
    full = np.zeros(prepared.full_shape, dtype=np.uint8)
    full[prepared.box] = labels
    restored = full.transpose(np.argsort(prepared.permutation))
    return np.ascontiguousarray(np.flip(restored, prepared.flips) if prepared.flips else restored)


class StreamingLabeler:
    """Turns model-space logit chunks (`LogitChunk`s along one axis, in order) into labels at the
    cropped shape, resampling on the way, without ever holding the whole volume's logits.

    In the chunks' plane, each chunk is resampled linearly along each in-plane axis; along their
    axis, output slice `o` blends the two source slices `linear_weights` names: together the same
    trilinear interpolation `resample` does (torch's rule, align_corners=False), in stages; `orders`
    makes an axis nearest instead (0: nnU-Net's anisotropic axis, `nnunet.resampling`). Source
    slices are kept only until no later output slice needs them. Labels are in the model's axis
    order, whichever axis the window walked; logits may be numpy or tensors on a GPU.
    """

    def __init__(self, model_shape: tuple[int, ...], cropped_shape: tuple[int, ...], post: dict | None,
                 orders: tuple[int, ...] = (1, 1, 1)) -> None:
        self.model_shape, self.cropped_shape, self.post = tuple(model_shape), tuple(cropped_shape), post
        self.orders = tuple(orders)
        self.labels = np.zeros(cropped_shape, dtype=np.uint8)
        self.pending: dict[int, Any] = {}  # source slice -> in-plane resampled logits [K, *plane]
        self.next_output = 0
        self.axis: int | None = None  # the chunks' axis, set by the first chunk
        self.arrays: Any = NumpyArrays()

    def _begin(self, axis: int, logits: Any) -> None:
        """Fix the streaming axis and the arrays; `out` is a view of the labels with that axis first."""
        self.axis = axis
        self.arrays = arrays_for("cpu" if isinstance(logits, np.ndarray) else _tensor_device(logits))
        self.n_in, self.n_out = self.model_shape[axis], self.cropped_shape[axis]
        self.plane = tuple(s for a, s in enumerate(self.cropped_shape) if a != axis)
        self.out = np.moveaxis(self.labels, axis, 0)
        self.sources = axis_weights(self.n_in, self.n_out, self.orders[axis])

    def __call__(self, chunk: LogitChunk) -> None:
        if self.axis is None:
            self._begin(chunk.axis, chunk.logits)
        elif chunk.axis != self.axis:
            raise ValueError(f"chunks along axis {chunk.axis} after chunks along axis {self.axis}; one walk per labeler")
        arrays = self.arrays
        logits = arrays.permute(chunk.logits, self._axis_first(chunk.logits.ndim))  # [K, n, *plane]
        if self.n_in == self.n_out and tuple(logits.shape[2:]) == self.plane and chunk.start == self.next_output:
            # no resampling (the usual case): label the whole chunk at once
            n = logits.shape[1]
            self._store(slice(chunk.start, chunk.start + n), logits)
            self.next_output = chunk.start + n
            return
        for axis in reversed(range(2, logits.ndim)):  # in-plane, the last axis first (as `resample`)
            model_axis = [a for a in range(len(self.orders)) if a != self.axis][axis - 2]
            logits = resample_axis(logits, axis, self.plane[axis - 2], arrays, self.orders[model_axis])
        for i in range(logits.shape[1]):
            self.pending[chunk.start + i] = logits[:, i]
        self._label_ready(chunk.start + logits.shape[1])

    def _axis_first(self, ndim: int) -> tuple[int, ...]:
        spatial = [a + 1 for a in range(ndim - 1) if a != self.axis]
        return (0, self.axis + 1, *spatial)

    def _store(self, index: int | slice, logits: Any) -> None:
        """Label resampled logits `[K, ...]` into output slice(s) `index` of the streaming axis
        (the one place labels are written; `probabilities.ProbabilityLabeler` also keeps softmax here)."""
        self.out[index] = logits_to_labels(logits, self.post)

    def _label_ready(self, available: int) -> None:
        """Label every output slice whose source slices have all arrived; drop sources no longer needed."""
        i0, i1, w0, w1 = self.sources
        while self.next_output < self.n_out:
            o = self.next_output
            if i1[o] >= available:
                break
            a, b = self.pending[int(i0[o])], self.pending[int(i1[o])]
            logits = a if w1[o] == 0 or i0[o] == i1[o] else a * w0[o] + b * w1[o]
            self._store(o, logits)
            self.next_output += 1
            keep = int(i0[self.next_output]) if self.next_output < self.n_out else available
            for old in [k for k in self.pending if k < keep]:
                del self.pending[old]

    def result(self) -> np.ndarray:
        """The labels `[*cropped_shape]`, in the model's axis order."""
        if self.axis is None:
            raise RuntimeError("no logit chunk arrived; the walk ended before its first slab")
        if self.next_output != self.n_out:
            raise RuntimeError(f"streamed {self.next_output} of {self.n_out} output slices; the walk ended early")
        return self.labels


def _tensor_device(tensor: Any) -> str:
    device = str(tensor.device)
    return TORCH_CPU if device == "cpu" else device
