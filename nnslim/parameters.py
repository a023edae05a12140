"""Parameter counts of PyTorch modules, shared by training's log and the build's report.

Kept out of `training.unet` so the build stages do not import a network module for a statistic.
"""

from __future__ import annotations

from typing import Any


def count_parameters(model: Any) -> int:
    """Parameters of a `torch.nn.Module`, counted once per storage (tied or shared tensors count once)."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    total = 0
    for p in model.parameters():
        key = (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape))
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total
