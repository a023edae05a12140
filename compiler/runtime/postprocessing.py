"""Postprocessing after the sliding window: labels in the input's geometry.

Logits are resampled back to the cropped shape (before argmax), turned into labels (argmax, or
nnU-Net's region order with sigmoid > 0.5), pasted into the uncropped volume (background
elsewhere) and the axes permuted back (`Prepared` from `preprocessing` says how). On the main path
this happens slab by slab as the window finishes them (`StreamingLabeler`), so the whole volume's
logits are never held; `to_labels` does the same for logits already in memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from nnslim.compiler.runtime.preprocessing import Prepared, resample
from nnslim.errors import EngineError

if TYPE_CHECKING:
    from nnslim.compiler.runtime.window.walk import LogitChunk


def logits_to_labels(logits: torch.Tensor, post: dict | None) -> torch.Tensor:
    """argmax, or nnU-Net's regions: heads in `class_order`, sigmoid > 0.5 (logit > 0), later wins."""
    if not post or post.get("kind", "argmax") == "argmax":
        if logits.device.type == "cpu" and logits.dtype == torch.float32:
            # numpy's argmax over the class axis is ~7x faster than torch's on the CPU (same
            # first-maximum tie rule); labels fit uint8 (at most 255 classes, checked at load)
            return torch.from_numpy(np.argmax(logits.numpy(), axis=0).astype(np.uint8, copy=False))
        return logits.argmax(0).to(torch.uint8)
    if post.get("kind") != "regions":
        raise EngineError(f"unsupported postprocessing {post}")
    labels = torch.zeros(logits.shape[1:], dtype=torch.uint8, device=logits.device)
    for head, label in enumerate(post["class_order"]):
        labels[logits[head] > post.get("threshold_logit", 0.0)] = int(label)
    return labels


def to_labels(logits: torch.Tensor, prepared: Prepared, post: dict | None = None) -> np.ndarray:
    """Model-space logits `[K, ...]` -> label volume in the input array's axes and shape."""
    logits = resample(logits, prepared.cropped_shape)
    return restore_geometry(logits_to_labels(logits, post).cpu().numpy(), prepared)


def restore_geometry(labels: np.ndarray, prepared: Prepared) -> np.ndarray:
    """Labels at the cropped shape -> the input array's shape and axes (background outside the crop)."""
    full = np.zeros(prepared.full_shape, dtype=np.uint8)
    full[prepared.box] = labels
    return np.ascontiguousarray(full.transpose(np.argsort(prepared.permutation)))


class StreamingLabeler:
    """Turns model-space logit chunks (`LogitChunk`s along one axis, in order) into labels at the
    cropped shape, resampling on the way, without ever holding the whole volume's logits.

    In the chunks' plane, each chunk is resampled bilinearly; along their axis, output slice `o`
    blends source slices `floor(x)` and `floor(x) + 1` at `x = max(0, (o + 0.5) * n_in / n_out - 0.5)`:
    together the same trilinear interpolation `resample` does (align_corners=False), in stages.
    Source slices are kept only until no later output slice needs them. Labels are in the model's
    axis order, whichever axis the window walked.
    """

    def __init__(self, model_shape: tuple[int, ...], cropped_shape: tuple[int, ...], post: dict | None) -> None:
        self.model_shape, self.cropped_shape, self.post = tuple(model_shape), tuple(cropped_shape), post
        self.labels = np.zeros(cropped_shape, dtype=np.uint8)
        self.pending: dict[int, torch.Tensor] = {}  # source slice -> in-plane resampled logits [K, *plane]
        self.next_output = 0
        self.axis: int | None = None  # the chunks' axis, set by the first chunk

    def _begin(self, axis: int) -> None:
        """Fix the streaming axis; `out` is a view of the labels with that axis first."""
        self.axis = axis
        self.n_in, self.n_out = self.model_shape[axis], self.cropped_shape[axis]
        self.plane = tuple(s for a, s in enumerate(self.cropped_shape) if a != axis)
        self.out = np.moveaxis(self.labels, axis, 0)
        self.scale = self.n_in / self.n_out

    def _source(self, o: int) -> tuple[int, int, float]:
        x = max(0.0, (o + 0.5) * self.scale - 0.5)
        i0 = min(int(np.floor(x)), self.n_in - 1)
        return i0, min(i0 + 1, self.n_in - 1), x - i0

    def __call__(self, chunk: LogitChunk) -> None:
        if self.axis is None:
            self._begin(chunk.axis)
        elif chunk.axis != self.axis:
            raise ValueError(f"chunks along axis {chunk.axis} after chunks along axis {self.axis}; one walk per labeler")
        logits = chunk.logits.movedim(chunk.axis + 1, 1)  # [K, n, *plane]
        if self.n_in == self.n_out and tuple(logits.shape[2:]) == self.plane and chunk.start == self.next_output:
            # no resampling (the usual case): label the whole chunk at once
            n = logits.shape[1]
            self._store(slice(chunk.start, chunk.start + n), logits.contiguous())
            self.next_output = chunk.start + n
            return
        if tuple(logits.shape[2:]) != self.plane:
            logits = torch.nn.functional.interpolate(
                logits.float().transpose(0, 1), size=self.plane, mode="bilinear", align_corners=False
            ).transpose(0, 1)
        for i in range(logits.shape[1]):
            self.pending[chunk.start + i] = logits[:, i]
        self._label_ready(chunk.start + logits.shape[1])

    def _store(self, index: int | slice, logits: torch.Tensor) -> None:
        """Label resampled logits `[K, ...]` into output slice(s) `index` of the streaming axis
        (the one place labels are written; `probabilities.ProbabilityLabeler` also keeps softmax here)."""
        self.out[index] = logits_to_labels(logits, self.post).cpu().numpy()

    def _label_ready(self, available: int) -> None:
        """Label every output slice whose source slices have all arrived; drop sources no longer needed."""
        while self.next_output < self.n_out:
            i0, i1, w = self._source(self.next_output)
            if i1 >= available:
                break
            logits = self.pending[i0] if w == 0 or i0 == i1 else (1 - w) * self.pending[i0] + w * self.pending[i1]
            self._store(self.next_output, logits)
            self.next_output += 1
            keep = self._source(self.next_output)[0] if self.next_output < self.n_out else available
            for old in [k for k in self.pending if k < keep]:
                del self.pending[old]

    def result(self) -> np.ndarray:
        """The labels `[*cropped_shape]`, in the model's axis order."""
        if self.axis is None:
            raise RuntimeError("no logit chunk arrived; the walk ended before its first slab")
        if self.next_output != self.n_out:
            raise RuntimeError(f"streamed {self.next_output} of {self.n_out} output slices; the walk ended early")
        return self.labels
