"""A cheap body mask for window skipping (`selection`, modes "mask" and "roi+mask")."""

from __future__ import annotations

import torch


def body_mask(image: torch.Tensor, fraction: float = 0.1, constant_share: float = 0.2) -> torch.Tensor:
    """The body, cheaply: voxels whose 3x3x3 mean of the first channel exceeds
    `p1 + fraction * (p99 - p1)`; when one value fills more than `constant_share` of the volume
    (a constant background), voxels not surrounded by it (and, if it is the darkest value, also
    above the cut).

    On CT (air at about -1000 HU) the cut sits near -870 HU; on MRI with a zero background, at a
    tenth of the bright range. A constant background need not be the darkest value: nnslim's
    default normalization keeps the air at 0 while tissue runs negative (`preprocessing.SCHEMES`),
    and padding or a mask outside the body is constant too; a voxel counts as background there
    when more than 90% of its 3x3x3 neighbourhood holds that value. The local means keep isolated
    noise voxels out (and grow the body by about one voxel). Statistics come from a strided subsample.
    """
    channel = image[0].float()
    sample = channel.reshape(-1)[:: max(1, channel.numel() // 1_000_000)]
    low, high = torch.quantile(sample, torch.tensor([0.01, 0.99], device=sample.device, dtype=sample.dtype))
    body = _local_mean(channel) > low + fraction * (high - low)
    values, counts = torch.unique(sample, return_counts=True)
    if counts.max() <= constant_share * sample.numel():
        return body
    background = values[counts.argmax()]
    outside = _local_mean((channel != background).float()) > 0.1
    # darkest background (CT padding, masked raw MRI): both rules; a background amid the tissue values
    # (air kept at 0 by the normalization): the percentile cut means nothing, this rule alone
    return body & outside if background <= low else outside


def _local_mean(volume: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.avg_pool3d(volume[None, None], 3, stride=1, padding=1, count_include_pad=False)[0, 0]
