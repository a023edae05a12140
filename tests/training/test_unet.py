import pytest
import torch

from tests.conftest import random_model, small_config
from nnslim.training.config import ConfigError
from nnslim.training.presets import PRESETS, get_preset
from nnslim.parameters import count_parameters
from nnslim.training.unet import UNet


def test_output_shape_and_deep_supervision_heads():
    model = random_model(small_config(num_classes=4))
    x = torch.randn(2, 1, 16, 24, 32)
    assert model(x).shape == (2, 4, 16, 24, 32)
    model.set_deep_supervision(True)
    outputs = model(x)
    assert [tuple(o.shape[2:]) for o in outputs] == [(16, 24, 32), (8, 12, 16)]


def test_anisotropic_kernels_and_strides():
    config = small_config(kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3)), strides=((1, 1, 1), (1, 2, 2), (2, 2, 2)))
    assert config.total_stride == (2, 4, 4)
    assert UNet(config)(torch.randn(1, 1, 6, 8, 12)).shape == (1, 3, 6, 8, 12)


@pytest.mark.parametrize("norm,cls", [("instance", torch.nn.InstanceNorm3d), ("batch", torch.nn.BatchNorm3d), ("group", torch.nn.GroupNorm)])
def test_norm_is_injected(norm, cls):
    model = UNet(small_config(norm=norm))
    assert any(isinstance(m, cls) for m in model.modules())


def test_module_names_follow_nnunet():
    keys = UNet(small_config()).state_dict().keys()
    for key in ("encoder.stages.0.0.convs.0.conv.weight", "encoder.stages.2.0.convs.1.norm.bias",
                "decoder.transpconvs.0.weight", "decoder.stages.1.convs.0.conv.bias", "decoder.seg_layers.1.weight"):
        assert key in keys


def test_nnunet_fullres_preset_widths():
    config = get_preset("nnunet-3d-fullres").build(1, 2)
    model = UNet(config)
    convs = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv3d)]
    assert [c.out_channels for c in convs[::2]] == [32, 64, 128, 256, 320, 320]
    assert config.total_stride == (32, 32, 32)


def test_config_round_trips_through_dict():
    for preset in PRESETS.values():
        config = preset.build(2, 5)
        assert type(config).from_dict(config.to_dict()) == config


def test_bad_configs_have_clear_errors():
    with pytest.raises(ConfigError, match="kernel_sizes has 2 entries"):
        small_config(kernel_sizes=((3, 3, 3),) * 2)
    with pytest.raises(ConfigError, match="norm must be one of"):
        small_config(norm="layer")
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        get_preset("huge")


def test_shared_parameters_count_once():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3, bias=False), torch.nn.Linear(3, 3, bias=False))
    model[1].weight = model[0].weight
    assert count_parameters(model) == 9
