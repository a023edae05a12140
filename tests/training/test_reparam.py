"""Re-parameterization is exact: train form vs deploy form with randomized BatchNorm statistics.

With default BN statistics (mean 0, var 1, gamma 1, beta 0) a wrong folding formula still
passes, so every test randomizes them first (as RepVGG's verify.py does).
"""

import dataclasses
from collections import Counter

import onnx
import pytest
import torch
from torch import nn

from nnslim.compiler.stages.export import ExportSettings, export_onnx
from nnslim.training.blocks import BlockConfigError, ConvNormAct, FasterFusionBlock
from nnslim.training.checkpoint import load_model, save_checkpoint
from nnslim.training.fusion import fold_conv_batchnorm, reparameterize_model
from nnslim.training.presets import get_preset
from nnslim.training.unet import UNet
from tests.conftest import metadata, small_config


def randomize_batchnorm(module: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for bn in module.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
            bn.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
            with torch.no_grad():
                bn.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                bn.bias.copy_(torch.randn(n, generator=generator) * 0.5)
    return module.eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("conv", [
    nn.Conv3d(6, 8, 3, padding=1), nn.Conv3d(6, 8, 3, padding=1, bias=False),
    nn.Conv3d(6, 8, 3, padding=1, groups=2), nn.ConvTranspose3d(6, 8, 2, 2), nn.Conv2d(6, 8, 3),
])
def test_batchnorm_folding_is_exact_for_any_conv(conv):
    bn = nn.BatchNorm3d(8, eps=1e-3) if conv.weight.ndim == 5 else nn.BatchNorm2d(8, eps=1e-3)
    model = randomize_batchnorm(nn.Sequential(conv, bn)).double()
    x = torch.randn(2, 6, *([7] * (conv.weight.ndim - 2)), dtype=torch.float64)
    fused = fold_conv_batchnorm(model[0], model[1])
    with torch.no_grad():
        assert relative_error(fused(x), model(x)) <= 1e-10


@pytest.mark.parametrize("stride", [(1, 1, 1), (2, 2, 2), (1, 2, 2)])
@pytest.mark.parametrize("kernel", [(3, 3, 3), (1, 3, 3)])
def test_faster_fusion_deploy_form_equals_train_form(stride, kernel):
    block = randomize_batchnorm(FasterFusionBlock(16, 24, kernel, stride)).double()
    x = torch.randn(2, 16, 9, 11, 7, dtype=torch.float64)  # odd sizes: borders and pooling remainders
    with torch.no_grad():
        expected = block(x)
        block.reparameterize()
        got = block(x)
    assert got.shape == expected.shape
    assert relative_error(got, expected) <= 1e-10
    assert not any(isinstance(m, nn.BatchNorm3d) for m in block.modules())


def test_faster_fusion_float32_and_densified():
    block = randomize_batchnorm(FasterFusionBlock(32, 32))
    x = torch.randn(1, 32, 13, 10, 9)
    with torch.no_grad():
        expected = block(x)
        block.reparameterize()
        assert relative_error(block(x), expected) <= 1e-5
        dense = block.densified()
        assert dense.weight.shape == (32, 32, 3, 3, 3)
        assert relative_error(block.nonlin(dense(x)), expected) <= 1e-5


def test_reparameterize_is_idempotent_and_deploy_flag_builds_the_same_form():
    block = randomize_batchnorm(FasterFusionBlock(8, 12))
    block.reparameterize()
    before = {k: v.clone() for k, v in block.state_dict().items()}
    block.reparameterize()
    after = block.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    direct = FasterFusionBlock(8, 12, deploy=True)
    direct.load_state_dict(after)  # strict: same names and shapes
    x = torch.randn(1, 8, 5, 5, 5)
    with torch.no_grad():
        assert torch.equal(direct(x), block(x))


def test_channel_counts_that_cannot_split_are_refused():
    with pytest.raises(BlockConfigError, match="divisible by 4; got 18"):
        FasterFusionBlock(18, 32)
    with pytest.raises(BlockConfigError, match="must be even; got 33"):
        FasterFusionBlock(32, 33)


def _faster_unet(**overrides) -> UNet:
    config = small_config(features_per_stage=(8, 16, 32), blocks=("conv", "faster_fusion", "faster_fusion"), **overrides)
    torch.manual_seed(0)
    return randomize_batchnorm(UNet(config))


def test_model_level_reparameterization_copies_unless_inplace():
    model = _faster_unet().double()
    x = torch.randn(1, 1, 16, 20, 12, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        fused = reparameterize_model(model)
        assert relative_error(fused(x), expected) <= 1e-10
    assert fused.config.reparameterized and not model.config.reparameterized
    assert any(isinstance(m, nn.BatchNorm3d) for m in model.modules())  # the original is untouched
    assert not any(isinstance(m, nn.BatchNorm3d) for m in fused.modules())
    assert reparameterize_model(model, inplace=True) is model


def test_batchnorm_unet_folds_every_norm_into_its_conv():
    """The deploy structure that matters: no BatchNorm left, every conv unit's conv carries the folded
    bias (the convs were built without one), and the result is exactly what the deploy-form
    constructor builds (strict state-dict load), computing the same function."""
    config = small_config(norm="batch", conv_bias=False)
    model = randomize_batchnorm(UNet(config))
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        expected = model(x)
        fused = reparameterize_model(model)
        assert relative_error(fused(x), expected) <= 1e-5
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    units = [m for m in fused.modules() if isinstance(m, ConvNormAct)]
    assert len(units) == 8  # 2 + 2 + 2 encoder, 1 + 1 decoder
    assert all(isinstance(u.norm, nn.Identity) and u.conv.bias is not None for u in units)
    direct = UNet(dataclasses.replace(config, reparameterized=True)).eval()
    direct.load_state_dict(fused.state_dict())  # strict: the same modules, names and shapes
    with torch.no_grad():
        assert torch.equal(direct(x), fused(x))


def test_the_block_types_table_is_what_the_config_accepts():
    from nnslim.training.config import ConfigError
    from nnslim.training.unet import BLOCK_TYPES

    assert set(BLOCK_TYPES) == {"conv", "faster_fusion"}
    with pytest.raises(ConfigError, match=r"blocks must give one of \('conv', 'faster_fusion'\)"):
        small_config(features_per_stage=(8, 16, 32), blocks=("conv", "conv", "mystery"))
    config = small_config(features_per_stage=(8, 16, 32), blocks=("conv", "faster_fusion", "faster_fusion"))
    unit = BLOCK_TYPES["faster_fusion"](config)(16, 32, (3, 3, 3), (2, 2, 2))
    assert isinstance(unit, FasterFusionBlock)


def test_fused_checkpoint_loads_into_the_deploy_form(tmp_path):
    fused = reparameterize_model(_faster_unet())
    path = save_checkpoint(tmp_path / "fused.pt", fused, metadata())
    loaded, _ = load_model(path)
    assert loaded.config.reparameterized
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), fused(x))


def test_exported_fused_block_is_slice_conv_conv_add(tmp_path):
    block = randomize_batchnorm(FasterFusionBlock(16, 16))
    block.reparameterize()
    proto = export_onnx(nn.Sequential(block), tmp_path / "ff.onnx", ExportSettings((8, 8, 8), in_channels=16))
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops == Counter({"Slice": 2, "Conv": 2, "Add": 1, "LeakyRelu": 1})
    kernels = sorted(tuple(onnx.helper.get_attribute_value(a)) for n in proto.graph.node if n.op_type == "Conv"
                     for a in n.attribute if a.name == "kernel_shape")
    assert kernels == [(1, 1, 1), (3, 3, 3)]


def test_presets_place_faster_fusion_by_width():
    config = get_preset("faster-nnunet").build(1, 3)
    assert config.blocks == ("conv", "conv", "conv", "faster_fusion", "faster_fusion", "faster_fusion")
    assert get_preset("faster-nnunet").build(1, 3, fusion_threshold=128).blocks[2] == "faster_fusion"
    assert get_preset("half-nnunet").features_per_stage == (16, 32, 64, 128, 160, 160)
    assert get_preset("faster-flare22-small").build(1, 14).blocks[-1] == "faster_fusion"
