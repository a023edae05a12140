"""A cheap body mask for window skipping (`selection`, modes "mask" and "roi+mask"), on the host."""

from __future__ import annotations

from typing import Any

import numpy as np

from nnslim.compiler.runtime.window.arrays import to_numpy


def body_mask(image: Any, fraction: float = 0.1, constant_share: float = 0.2) -> np.ndarray:
    """The body, cheaply: voxels whose 3x3x3 mean of the first channel exceeds
    `p1 + fraction * (p99 - p1)`; when one value fills more than `constant_share` of the volume
    (a constant background), voxels not surrounded by it (and, if it is the darkest value, also
    above the cut).

    On CT (air at about -1000 HU) the cut sits near -870 HU; on MRI with a zero background, at a
    tenth of the bright range. A constant background need not be the darkest value: nnslim's
    default normalization keeps the air at 0 while tissue runs negative (`preprocessing.SCHEMES`),
    and padding or a mask outside the body is constant too; a voxel counts as background there
    when more than 90% of its 3x3x3 neighbourhood holds that value. The local means (over the
    neighbours inside the volume) keep isolated noise voxels out (and grow the body by about one
    voxel). Statistics come from a strided subsample.
    """
    channel = np.asarray(to_numpy(image)[0], dtype=np.float32)
    sample = channel.reshape(-1)[:: max(1, channel.size // 1_000_000)]
    low, high = np.quantile(sample, [0.01, 0.99])
    body = _local_mean(channel) > low + fraction * (high - low)
    values, counts = np.unique(sample, return_counts=True)
    if counts.max() <= constant_share * sample.size:
        return body
    background = values[counts.argmax()]
    outside = _local_mean((channel != background).astype(np.float32)) > 0.1
    # darkest background (CT padding, masked raw MRI): both rules; a background amid the tissue values
    # (air kept at 0 by the normalization): the percentile cut means nothing, this rule alone
    return body & outside if background <= low else outside


def _local_mean(volume: np.ndarray) -> np.ndarray:
    """The mean over each voxel's 3x3x3 neighbourhood, counting only neighbours inside the volume."""
    total = volume.astype(np.float32, copy=True)
    count = np.ones(volume.shape, dtype=np.float32)
    for axis in range(volume.ndim):
        total, count = _sum3(total, axis), _sum3(count, axis)
    return total / count


def _sum3(a: np.ndarray, axis: int) -> np.ndarray:
    """`a` plus its two neighbours along `axis` (zero beyond the edges)."""
    out = a.copy()
    forward = [slice(None)] * a.ndim
    backward = [slice(None)] * a.ndim
    forward[axis], backward[axis] = slice(1, None), slice(None, -1)
    out[tuple(forward)] += a[tuple(backward)]
    out[tuple(backward)] += a[tuple(forward)]
    return out
