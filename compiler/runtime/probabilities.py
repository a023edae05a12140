"""Class probabilities in the input's geometry, kept beside the labels (`infer --save-probabilities`).

Like nnU-Net's `--save_probabilities`: `softmax` over the K output heads of the same resampled
logits the labels are the argmax of, so `argmax(probabilities, axis=0) == labels` wherever the
largest probability is unique. They go through the same restore as the labels: the streaming
resample back to the cropped shape (`StreamingLabeler`), the paste into the uncropped volume
(outside the crop: background with probability 1, as nnU-Net) and the axis permutation back.
The array is `[K, *labels.shape]`, float16 (half of float32's memory and disk; sums to 1 within
about 1e-3), saved as `CASE.npz` with the key `probabilities`.

Only for engines whose heads are exclusive classes (argmax postprocessing). nnU-Net's region-based
models (a sigmoid per overlapping region) have no per-class distribution to save: refused.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from nnslim.compiler.runtime.window.arrays import to_numpy
from nnslim.errors import InputError
from nnslim.files import atomic_path
from nnslim.compiler.runtime.postprocessing import StreamingLabeler
from nnslim.compiler.runtime.preprocessing import Prepared
from nnslim.compiler.runtime.safety import machine_memory_bytes, require_fits

logger = logging.getLogger(__name__)

DTYPE = np.float16
KEY = "probabilities"
PROBABILITIES_SUFFIX = ".npz"  # CASE.npz beside the label map CASE.nii.gz


def check_probabilities_supported(postprocessing: dict | None) -> None:
    """Refuse engines whose outputs are not one softmax over exclusive classes."""
    kind = (postprocessing or {}).get("kind", "argmax")
    if kind != "argmax":
        raise InputError(f"probabilities need an engine whose outputs are exclusive classes (softmax, argmax "
                         f"postprocessing); this engine's postprocessing is {kind!r} (a sigmoid per overlapping "
                         "region, nnU-Net's region-based training); run without --save-probabilities")


def check_probabilities_fit(num_classes: int, shape: tuple[int, ...], name: str) -> None:
    """Refuse (or warn about) a probability array the machine cannot comfortably hold.

    The array takes `2 * K * N` bytes (float16, N voxels of the input); it is refused when it alone
    exceeds the machine's memory (`safety.require_fits`) and a warning is logged above half of it.
    """
    need = DTYPE().itemsize * num_classes * math.prod(shape)
    require_fits(need, f"the probabilities of {name} ({num_classes} classes x {tuple(shape)}, float16)",
                 "run without --save-probabilities, or crop the scan")
    available = machine_memory_bytes()
    if available is not None and need > available / 2:
        logger.warning("the probabilities of %s take %.1f GB of this machine's %.1f GB", name, need / 2**30,
                       available / 2**30)


class ProbabilityLabeler(StreamingLabeler):
    """A `StreamingLabeler` that also writes the softmax of each labelled slice into `target`.

    Args:
        target: `[K, *cropped_shape]` float16, in the model's axis order (a view into the uncropped
            array `probability_canvas` makes); every voxel of it is written once.
    """

    def __init__(self, model_shape: tuple[int, ...], cropped_shape: tuple[int, ...], post: dict | None,
                 target: np.ndarray, orders: tuple[int, ...] = (1, 1, 1)) -> None:
        super().__init__(model_shape, cropped_shape, post, orders)
        if tuple(target.shape[1:]) != tuple(cropped_shape):
            raise ValueError(f"probability target {target.shape} does not match the cropped shape {cropped_shape}")
        self.target = target

    def _begin(self, axis: int, logits: Any) -> None:
        super()._begin(axis, logits)
        self.target_out = np.moveaxis(self.target, axis + 1, 1)  # [K, streaming axis, *plane]

    def _store(self, index: int | slice, logits: Any) -> None:
        super()._store(index, logits)
        self.target_out[(slice(None), index)] = softmax(to_numpy(logits)).astype(DTYPE, copy=False)


def softmax(logits: np.ndarray) -> np.ndarray:
    """The softmax over the class axis (0), in float32, shifted by the maximum for range."""
    shifted = np.asarray(logits, dtype=np.float32) - np.max(logits, axis=0, keepdims=True).astype(np.float32)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=0, keepdims=True)


def probability_canvas(num_classes: int, prepared: Prepared) -> tuple[np.ndarray, np.ndarray]:
    """The uncropped probability array (model axis order; background 1 everywhere until the crop is
    written) and the crop's view of it, which a `ProbabilityLabeler` fills."""
    canvas = np.zeros((num_classes, *prepared.full_shape), dtype=DTYPE)
    canvas[0] = 1
    return canvas, canvas[(slice(None), *prepared.box)]


def restore_probabilities(canvas: np.ndarray, prepared: Prepared) -> np.ndarray:
    """`[K, *full_shape]` in the model's axes -> `[K, *labels.shape]` in the input array's axes (the
    permutation `restore_geometry` applies to the labels; a view, no copy)."""
    restored = canvas.transpose(0, *(int(a) + 1 for a in np.argsort(prepared.permutation)))
    return np.flip(restored, tuple(a + 1 for a in prepared.flips)) if prepared.flips else restored


def save_probabilities(probabilities: np.ndarray, path: Path) -> Path:
    """Write `probabilities` (key `probabilities`) to `path` (.npz, compressed), atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: numpy would otherwise append .npz to the temporary's name
            np.savez_compressed(f, **{KEY: probabilities})
    return Path(path)
