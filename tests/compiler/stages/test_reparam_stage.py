"""The build's re-parameterization stage counts what it fused by class, for any block type."""

import torch
from torch import nn

from nnslim.compiler.stages.reparam_stage import reparameterize_for_deploy
from nnslim.training.unet import UNet
from tests.conftest import small_config
from tests.training.test_reparam import randomize_batchnorm


class ScaleThenConv(nn.Module):
    """A block type the compiler has never heard of: a per-channel scale folded into a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([2.0, 3.0]))
        self.conv = nn.Conv3d(2, 2, 1)

    def reparameterize(self) -> None:
        if self.scale is None:
            return
        with torch.no_grad():
            self.conv.weight.mul_(self.scale.view(1, -1, 1, 1, 1))
        self.scale = None

    def forward(self, x):
        return self.conv(x if self.scale is None else x * self.scale.view(1, -1, 1, 1, 1))


def test_report_counts_every_changed_reparameterizable_by_class():
    model = UNet(small_config(features_per_stage=(8, 16, 32), norm="batch", blocks=("conv", "faster_fusion", "faster_fusion")))
    deployed, report = reparameterize_for_deploy(randomize_batchnorm(model))
    # 2 FasterFusion stages of 2 units plus the width-16 decoder unit; the 2 conv units of stage 0
    # and the width-8 decoder unit fold their BatchNorm
    assert report.fused == {"FasterFusionBlock": 5, "ConvNormAct": 3}
    assert report.to_dict()["faster_fusion_blocks_fused"] == 5 and report.to_dict()["batchnorms_folded"] == 3

    _, again = reparameterize_for_deploy(deployed)
    assert again.fused == {}  # idempotent: nothing left to fuse


def test_a_new_block_type_is_counted_without_compiler_edits():
    model = nn.Sequential(ScaleThenConv(), nn.ReLU(), ScaleThenConv()).eval()
    x = torch.randn(1, 2, 3, 3, 3)
    deployed, report = reparameterize_for_deploy(model)
    assert report.fused == {"ScaleThenConv": 2}
    assert report.to_dict()["fused"] == {"ScaleThenConv": 2}
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x))


def test_instance_norm_units_are_not_counted_as_folded():
    _, report = reparameterize_for_deploy(UNet(small_config()))
    assert report.fused == {} and report.batchnorms_folded == 0
