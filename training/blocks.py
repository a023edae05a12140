"""Conv units a U-Net stage is built from: the plain conv-norm-act unit and FasterFusion.

Both own their deploy form: `reparameterize()` collapses the train form in place (idempotent),
and `deploy=True` builds the deploy form directly so deploy checkpoints load without conversion.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from nnslim.errors import NnslimError
from nnslim.training.fusion import fold_conv_batchnorm, fuse_faster_fusion

NormFactory = Callable[[int], nn.Module]
Triple = tuple[int, int, int]


class BlockConfigError(NnslimError, ValueError):
    """Channel counts or settings a block cannot be built with."""


def conv_class(spatial_dims: int) -> type[nn.Module]:
    return {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]


class ConvNormAct(nn.Module):
    """Conv2d/3d ("same" padding, by the kernel's length) -> norm -> LeakyReLU (or no activation).

    With a BatchNorm, `reparameterize()` folds it into the conv (the norm becomes Identity);
    Instance/GroupNorm use per-sample statistics and stay.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, ...],
        stride: tuple[int, ...],
        bias: bool,
        norm: NormFactory,
        negative_slope: float | None,
        deploy: bool = False,
    ) -> None:
        """`negative_slope=None` leaves out the activation (residual blocks' second conv)."""
        super().__init__()
        padding = tuple((k - 1) // 2 for k in kernel_size)
        norm_layer = norm(out_channels)
        folds = isinstance(norm_layer, nn.modules.batchnorm._BatchNorm)
        conv = conv_class(len(kernel_size))
        self.conv = conv(in_channels, out_channels, kernel_size, stride, padding, bias=bias or (deploy and folds))
        self.norm = nn.Identity() if deploy and folds else norm_layer
        self.nonlin = nn.Identity() if negative_slope is None else nn.LeakyReLU(negative_slope, inplace=True)

    def reparameterize(self) -> None:
        if isinstance(self.norm, nn.modules.batchnorm._BatchNorm):
            self.conv = fold_conv_batchnorm(self.conv, self.norm)
            self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlin(self.norm(self.conv(x)))


class FasterFusionBlock(nn.Module):
    """Seed 000's FasterFusion unit, `Ci -> Co`, replacing one conv-norm-act unit.

    Train form: split the input channels at `Ci/4`; the first quarter goes through a k x k x k
    conv to `Co/2` channels, the rest through a 1x1x1 conv to `3Co/2`; concatenate (2Co, the
    inverted bottleneck), BatchNorm, no nonlinearity, 1x1x1 conv `2Co -> Co`, LeakyReLU.
    Deploy form: Slice -> (k-conv on Ci/4 -> Co) + (1x1x1 on 3Ci/4 -> Co) -> Add -> LeakyReLU,
    about `(k^3/4 + 3/4) Ci Co` MACs per voxel instead of `k^3 Ci Co` for a dense conv.
    A stride is applied afterwards by max-pooling with kernel = stride (as the reference does).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Triple = (3, 3, 3),
        stride: Triple = (1, 1, 1),
        negative_slope: float = 0.01,
        deploy: bool = False,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        if in_channels % 4:
            raise BlockConfigError(
                f"FasterFusionBlock splits its input channels 1:3, so in_channels must be divisible by 4; "
                f"got {in_channels}. Use a width divisible by 4, or keep a plain conv unit for this stage "
                "(raise the FasterFusion channel threshold)."
            )
        if out_channels % 2:
            raise BlockConfigError(
                f"FasterFusionBlock's bottleneck splits 2*out_channels 1:3, so out_channels must be even; got {out_channels}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.split = in_channels // 4
        self.deploy = deploy
        padding = tuple(k // 2 for k in kernel_size)
        if deploy:
            self.spatial = nn.Conv3d(self.split, out_channels, kernel_size, padding=padding, bias=True)
            self.pointwise = nn.Conv3d(in_channels - self.split, out_channels, 1, bias=False)
        else:
            self.spatial = nn.Conv3d(self.split, out_channels // 2, kernel_size, padding=padding, bias=False)
            self.pointwise = nn.Conv3d(in_channels - self.split, 3 * out_channels // 2, 1, bias=False)
            self.norm = nn.BatchNorm3d(2 * out_channels, eps=bn_eps, momentum=bn_momentum)
            self.project = nn.Conv3d(2 * out_channels, out_channels, 1, bias=True)
        self.nonlin = nn.LeakyReLU(negative_slope, inplace=True)
        self.pool = nn.MaxPool3d(stride, stride) if tuple(stride) != (1, 1, 1) else nn.Identity()

    def reparameterize(self) -> None:
        """Fuse BN and the projection into the two branch convs (exact in eval mode)."""
        if self.deploy:
            return
        w3, w1, bias = fuse_faster_fusion(
            self.spatial.weight.detach(), self.pointwise.weight.detach(), self.norm,
            self.project.weight.detach(), self.project.bias.detach(),
        )
        spatial = nn.Conv3d(self.split, self.out_channels, self.spatial.kernel_size, padding=self.spatial.padding, bias=True)
        pointwise = nn.Conv3d(self.in_channels - self.split, self.out_channels, 1, bias=False)
        spatial.weight, spatial.bias = nn.Parameter(w3), nn.Parameter(bias)
        pointwise.weight = nn.Parameter(w1)
        self.spatial, self.pointwise = spatial.to(w3.device), pointwise.to(w3.device)
        del self.norm, self.project
        self.deploy = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x[:, : self.split], x[:, self.split :]
        if self.deploy:
            y = self.spatial(a) + self.pointwise(b)
        else:
            y = self.project(self.norm(torch.cat((self.spatial(a), self.pointwise(b)), dim=1)))
        return self.pool(self.nonlin(y))

    def densified(self) -> nn.Conv3d:
        """One dense k^3 conv equal to the deploy form's linear part (before LeakyReLU and pooling),
        the 1x1 embedded in the centre tap.

        Exact, but it gives the MAC saving back; kept for benchmarks and checks.
        """
        if not self.deploy:
            raise BlockConfigError("densified() needs the deploy form; call reparameterize() first")
        k = self.spatial.kernel_size
        dense = nn.Conv3d(self.in_channels, self.out_channels, k, padding=self.spatial.padding, bias=True)
        weight = torch.zeros_like(dense.weight)
        weight[:, : self.split] = self.spatial.weight.detach()
        weight[:, self.split :, k[0] // 2, k[1] // 2, k[2] // 2] = self.pointwise.weight.detach()[:, :, 0, 0, 0]
        dense.weight, dense.bias = nn.Parameter(weight), nn.Parameter(self.spatial.bias.detach().clone())
        return dense
