"""Shared fixtures: a small random U-Net checkpoint, the MNI data in raw layout, a built engine.

The model is tiny (3 stages, 4..16 features) so every test runs in seconds on 2 cores; its
InstanceNorm affine parameters are randomized so parity checks exercise them.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from nnslim.training.checkpoint import save_checkpoint
from nnslim.training.config import UNetConfig
from nnslim.training.unet import UNet

PATCH = (16, 16, 16)
LABELS = ["background", "grey_matter", "white_matter"]


def small_config(**overrides) -> UNetConfig:
    fields = dict(
        in_channels=1,
        num_classes=3,
        features_per_stage=(4, 8, 16),
        kernel_sizes=((3, 3, 3),) * 3,
        strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)),
        convs_per_stage=(2, 2, 2),
        convs_per_decoder_stage=(1, 1),
    )
    fields.update(overrides)
    return UNetConfig(**fields)


def random_model(config: UNetConfig | None = None, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    model = UNet(config or small_config())
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.InstanceNorm3d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


def metadata(patch=PATCH) -> dict:
    return {
        "patch_size": list(patch),
        "spacing": [1.0, 1.0, 1.0],
        "normalization": {"scheme": "zscore", "mask": "nonzero"},
        "label_names": LABELS,
        "channel_names": ["T1"],
        "mirror_axes": [0, 1, 2],
    }


@pytest.fixture(scope="session")
def checkpoint_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "small.pt"
    save_checkpoint(path, random_model(), metadata())
    return path


@pytest.fixture(scope="session")
def mni_raw(tmp_path_factory) -> Path:
    from nnslim.training.data import write_mni_tissue_raw

    return write_mni_tissue_raw(tmp_path_factory.mktemp("mni"))


@pytest.fixture(scope="session")
def small_volume(mni_raw, tmp_path_factory) -> Path:
    """A 37x41x29 crop of the MNI T1 (odd sizes, real anatomy), with its affine."""
    t1 = nib.load(mni_raw / "imagesTr" / "mni_0000.nii.gz")
    crop = np.asarray(t1.dataobj)[80:117, 100:141, 80:109]
    path = tmp_path_factory.mktemp("vol") / "crop_0000.nii.gz"
    nib.save(nib.Nifti1Image(crop, t1.affine, t1.header), path)
    return path


@pytest.fixture(scope="session")
def engine_dir(checkpoint_path, small_volume, tmp_path_factory) -> Path:
    from nnslim.compiler.build.pipeline import BuildConfig, build_engine

    out = tmp_path_factory.mktemp("engines") / "small"
    build_engine(BuildConfig(checkpoint=checkpoint_path, out_dir=out, batch_size=2, parity_volume=small_volume))
    return out


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests without CUDA and `tensorrt` tests without the TensorRT package."""
    has_cuda = torch.cuda.is_available()
    try:
        import tensorrt  # noqa: F401

        has_tensorrt = True
    except ImportError:
        has_tensorrt = False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none on this machine"))
        if "tensorrt" in item.keywords and not has_tensorrt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT: pip install 'nnslim[tensorrt]' on a GPU machine"))
