"""Parameter, MAC and sparsity counts of a PyTorch model at a given input size."""

from __future__ import annotations

import math

import torch
from torch import nn

CONVOLUTIONS = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def conv_weight_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero weights over all conv / transposed-conv kernels."""
    zeros = total = 0
    for m in model.modules():
        if isinstance(m, CONVOLUTIONS):
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return zeros / total if total else 0.0


@torch.no_grad()
def conv_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of all convolutions for one input of `input_shape` ([C, *spatial])."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        nonlocal total
        kernel = math.prod(module.kernel_size)
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            # every input voxel scatters a kernel to each output channel
            total += inputs[0][0].numel() * kernel * module.out_channels // module.groups
        else:
            total += output[0].numel() * kernel * module.in_channels // module.groups

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, CONVOLUTIONS)]
    was_training = model.training
    try:
        model.eval()
        model(torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total
