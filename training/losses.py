"""nnU-Net's loss: soft Dice (batch Dice, foreground classes) + cross-entropy, with deep supervision.

Data-parallel training splits the batch over processes; the batch Dice then sums its statistics
over all processes (a differentiable all-reduce, as nnU-Net does), so the loss and its gradients
equal the single-process ones on the whole batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _SumOverProcesses(torch.autograd.Function):
    """Sum a tensor over all processes; the gradient of a sum is the summed gradient."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _SumOverProcesses.apply(t)
    return t


IGNORE = -1  # target value of voxels the loss skips (training.data's held-out band)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """1 - mean over foreground classes of the soft Dice, summed over the whole (global) batch.

    Args:
        logits: `[B, K, *spatial]`.
        target: `[B, *spatial]` integer labels; `IGNORE` voxels count for nothing.
    """
    valid = (target != IGNORE).unsqueeze(1)
    probs = torch.softmax(logits, dim=1)[:, 1:]
    onehot = F.one_hot(target.clamp_min(0), logits.shape[1]).movedim(-1, 1)[:, 1:].to(probs.dtype)
    if not bool(valid.all()):
        probs, onehot = probs * valid, onehot * valid
    axes = (0, *range(2, probs.ndim))
    intersection = _all_reduce((probs * onehot).sum(axes))
    denominator = _all_reduce(probs.sum(axes) + onehot.sum(axes))
    dice = (2 * intersection + smooth) / (denominator + smooth).clamp_min(1e-8)
    return 1 - dice.mean()


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice + cross-entropy; `IGNORE` voxels are left out of both (a batch of only IGNORE has CE 0)."""
    if bool((target == IGNORE).all()):
        ce = logits.sum() * 0.0
    else:
        ce = F.cross_entropy(logits, target, ignore_index=IGNORE)
    return soft_dice_loss(logits, target) + ce


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's weights: 1/2^i, the lowest resolution output dropped, normalized to sum 1."""
    weights = [1 / 2**i for i in range(n)]
    if n > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def deep_supervision_loss(outputs: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Weighted Dice+CE over outputs (full resolution first); targets by nearest downsampling."""
    total = outputs[0].new_zeros(())
    for weight, logits in zip(deep_supervision_weights(len(outputs)), outputs):
        if weight == 0:
            continue
        if logits.shape[2:] != target.shape[1:]:
            scaled = F.interpolate(target[:, None].float(), size=logits.shape[2:], mode="nearest")[:, 0].long()
        else:
            scaled = target
        total = total + weight * dice_ce_loss(logits, scaled)
    return total
