"""Structural re-parameterization: the fusion algebra and the model-level entry point.

BatchNorm folding (eval statistics, the BN's own eps). For a convolution `y = W * x + b` followed
by BN with scale `s = gamma / sqrt(var + eps)` per output channel:

    W' = W * s   (broadcast along the output-channel axis: 0 for Conv, 1 for ConvTranspose)
    b' = (b - mean) * s + beta

FasterFusion fusion (seed 000). The train form computes, for input split `x = [x_a | x_b]` at
`Ci/4`, `z = Wo @ BN([W_a * x_a ; W_b x_b]) + bo` with `W_a` a 3x3x3 conv to `Co/2` channels,
`W_b` a 1x1x1 conv to `3Co/2`, and `Wo` a 1x1x1 conv `2Co -> Co`. After folding BN into `W_a`
and `W_b` (giving `W_a'`, `b_a'`, `W_b'`, `b_b'`), split `Wo = [Wo_a | Wo_b]` by columns at `Co/2`:

    W3 = Wo_a @ W_a'             (Co x Ci/4 x k x k x k, applied to x_a)
    W1 = Wo_b @ W_b'             (Co x 3Ci/4 x 1 x 1 x 1, applied to x_b)
    b  = Wo_a b_a' + Wo_b b_b' + bo

Both branches are linear after the padded convolution, so this is exact at the borders too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from nnslim.errors import NnslimError


class FusionError(NnslimError, ValueError):
    """A layer combination the fusion algebra cannot fold."""


@runtime_checkable
class Reparameterizable(Protocol):
    """A module that can collapse its train form into its deploy form, in place.

    `reparameterize()` must be idempotent: a second call does nothing.
    """

    def reparameterize(self) -> None: ...


def fold_batchnorm(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn: nn.modules.batchnorm._BatchNorm,
    out_channel_dim: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the preceding conv's weight and bias (any rank).

    Args:
        weight: conv weight; its `out_channel_dim` axis indexes the BN's channels.
        bias: conv bias or None.
        bn: the BatchNorm (running statistics are used; affine may be off).
        out_channel_dim: 0 for ConvNd (groups any), 1 for ConvTransposeNd with groups=1.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise FusionError("BatchNorm without running statistics (track_running_stats=False) cannot be folded")
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    scale = gamma / std
    shape = [1] * weight.ndim
    shape[out_channel_dim] = -1
    bias = bias if bias is not None else torch.zeros_like(bn.running_mean)
    return weight * scale.reshape(shape), (bias - bn.running_mean) * scale + beta


def fold_conv_batchnorm(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A new Conv / ConvTranspose (with bias) equal to `bn(conv(x))` in eval mode."""
    transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
    if transposed and conv.groups != 1:
        raise FusionError("folding BatchNorm into a grouped ConvTranspose is not supported")
    if conv.weight.shape[1 if transposed else 0] != bn.num_features:
        raise FusionError(
            f"BatchNorm has {bn.num_features} channels but the conv produces {conv.weight.shape[1 if transposed else 0]}"
        )
    weight, bias = fold_batchnorm(conv.weight.detach(), None if conv.bias is None else conv.bias.detach(),
                                  bn, out_channel_dim=1 if transposed else 0)
    fused = copy.deepcopy(conv)
    fused.weight = nn.Parameter(weight)
    fused.bias = nn.Parameter(bias)
    return fused


def fuse_faster_fusion(
    spatial_weight: torch.Tensor,
    pointwise_weight: torch.Tensor,
    bn: nn.modules.batchnorm._BatchNorm,
    project_weight: torch.Tensor,
    project_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collapse (spatial | pointwise) -> BN -> project into two convs (see module docstring).

    Shapes are read from the tensors: spatial `[Co/2, Ci/4, *k]`, pointwise `[3Co/2, 3Ci/4, 1..]`,
    project `[Co, 2Co, 1..]`. Returns `(W3, W1, bias)`.
    """
    half = spatial_weight.shape[0]
    if bn.num_features != half + pointwise_weight.shape[0]:
        raise FusionError(
            f"BatchNorm has {bn.num_features} channels; the branches produce {half} + {pointwise_weight.shape[0]}"
        )
    zeros = spatial_weight.new_zeros(bn.num_features)
    bn_a, bn_b = _BatchNormSlice.of(bn, slice(0, half)), _BatchNormSlice.of(bn, slice(half, None))
    w_a, b_a = fold_batchnorm(spatial_weight, zeros[:half], bn_a)
    w_b, b_b = fold_batchnorm(pointwise_weight, zeros[half:], bn_b)
    wo = project_weight.flatten(1)  # [Co, 2Co]
    wo_a, wo_b = wo[:, :half], wo[:, half:]
    w3 = torch.einsum("oj,j...->o...", wo_a, w_a)
    w1 = torch.einsum("oj,j...->o...", wo_b, w_b)
    bias = wo_a @ b_a + wo_b @ b_b
    if project_bias is not None:
        bias = bias + project_bias
    return w3, w1, bias


@dataclass(frozen=True)
class _BatchNormSlice:
    """The statistics and affine parameters of a channel range of a BatchNorm (duck-typed for
    `fold_batchnorm`)."""

    running_mean: torch.Tensor
    running_var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float

    @classmethod
    def of(cls, bn: nn.modules.batchnorm._BatchNorm, channels: slice) -> _BatchNormSlice:
        if bn.running_mean is None or bn.running_var is None:
            raise FusionError("BatchNorm without running statistics (track_running_stats=False) cannot be folded")
        return cls(
            running_mean=bn.running_mean[channels],
            running_var=bn.running_var[channels],
            weight=None if bn.weight is None else bn.weight.detach()[channels],
            bias=None if bn.bias is None else bn.bias.detach()[channels],
            eps=bn.eps,
        )


def reparameterize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Collapse every re-parameterizable module into its deploy form.

    Args:
        model: any module tree; modules implementing `Reparameterizable` are collapsed.
        inplace: modify `model` itself instead of a deep copy.

    Returns:
        The deploy-form model (in eval mode). Calling it again changes nothing.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    if isinstance(model, Reparameterizable):
        model.reparameterize()  # a model that knows its own parts (UNet also updates its config)
        return model
    for module in list(model.modules()):
        if isinstance(module, Reparameterizable):
            module.reparameterize()
    return model
