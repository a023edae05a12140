"""Preprocessing applied by `infer`, as recorded in the engine manifest.

`zscore` with mask `nonzero`: per channel, subtract the mean and divide by the standard
deviation of the channel's nonzero voxels (all voxels when none are nonzero); every voxel is
transformed. Training applies the same rule (`training.data.zscore_normalize`); a test checks
that the two agree.
"""

from __future__ import annotations

import numpy as np

from compiler.runtime.errors import EngineError

SCHEMES = {("zscore", "nonzero"), ("zscore", "none")}


def normalize(image: np.ndarray, normalization: dict) -> np.ndarray:
    """Normalize `[C, X, Y, Z]` as the manifest's `normalization` entry says."""
    key = (normalization.get("scheme"), normalization.get("mask", "none"))
    if key not in SCHEMES:
        raise EngineError(f"unsupported normalization {normalization}; this nnslim knows {sorted(SCHEMES)}")
    image = np.asarray(image, dtype=np.float32)
    out = np.empty_like(image)
    for c, channel in enumerate(image):
        mask = channel != 0 if key[1] == "nonzero" else np.ones(channel.shape, dtype=bool)
        values = channel[mask] if mask.any() else channel
        out[c] = (channel - float(values.mean())) / max(float(values.std()), 1e-8)
    return out
