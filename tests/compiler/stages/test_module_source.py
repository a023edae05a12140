"""`nnslim.build_engine` from Python: any `nn.Module` (here not nnslim's U-Net) with its metadata builds
an engine that `load_engine` and `nnslim infer` run, with the module's own labels; the manifest
names the module and hashes its weights; a module or metadata that does not fit is refused clearly."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import nnslim
from nnslim.compiler.cli import cli
from nnslim.compiler.runtime.backends.torch_module import TorchPredictor
from nnslim.compiler.runtime.engine import Engine, load_engine
from nnslim.compiler.stages.source import SourceError
from nnslim.errors import SettingsError

LABELS = ["background", "dark", "bright"]


class ThreeLayers(nn.Module):
    """Anyone's network: two convolutions, logits scaled so that argmax is decisive."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Conv3d(1, 8, 3, padding=1)
        self.head = nn.Conv3d(8, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 8 * self.head(torch.relu(self.features(x)))


@pytest.fixture(scope="module")
def module_engine(tmp_path_factory):
    torch.manual_seed(0)
    net = ThreeLayers()
    out = tmp_path_factory.mktemp("module") / "engine"
    result = nnslim.build_engine(net, out, metadata={"patch_size": (16, 16, 16), "label_names": LABELS,
                                                     "mirror_axes": (0, 1, 2)},
                                 precision="fp32", parity_tiles=2)
    return net, result


def test_a_module_builds_an_engine_that_segments_as_the_module(module_engine, small_volume, tmp_path):
    net, result = module_engine
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "pytorch-module"
    assert manifest["source"]["checkpoint"] == f"<module {ThreeLayers.__module__}.ThreeLayers>"
    assert len(manifest["source"]["checkpoint_sha256"]) == 64 and manifest["labels"] == LABELS
    scan = nib.load(small_volume)
    image, spacing = np.asarray(scan.dataobj, np.float32), scan.header.get_zooms()[:3]
    with load_engine(result.out_dir) as engine:
        labels = engine.segment(image, spacing)
        reference = Engine(engine.directory, engine.manifest, engine.spec, TorchPredictor(net)).segment(image, spacing)
    assert labels.shape == image.shape and len(np.unique(reference)) > 1
    assert np.mean(labels == reference) >= 0.999
    out = tmp_path / "seg.nii.gz"
    done = CliRunner().invoke(cli, ["infer", str(result.out_dir), str(small_volume), "-o", str(out)])
    assert done.exit_code == 0, done.output
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), labels)


@pytest.mark.parametrize("net, metadata, says", [
    (ThreeLayers(), {"label_names": LABELS}, "patch_size"),
    (ThreeLayers(), {"patch_size": (16, 16, 16), "label_names": LABELS, "spacings": (1, 1, 1)}, "unknown key"),
    (ThreeLayers(classes=2), {"patch_size": (16, 16, 16), "label_names": LABELS}, "one logit channel per label"),
    (ThreeLayers(), {"patch_size": (16, 16, 16), "label_names": LABELS, "in_channels": 2}, "fails on a zero tile"),
])
def test_a_module_or_metadata_that_does_not_fit_is_refused(net, metadata, says, tmp_path):
    with pytest.raises(SourceError, match=says):
        nnslim.build_engine(net, tmp_path / "engine", metadata=metadata)
    assert not (tmp_path / "engine").exists()


def test_the_api_refuses_unknown_options_and_misplaced_metadata(tmp_path):
    with pytest.raises(SettingsError, match="unknown build option"):
        nnslim.build_engine(ThreeLayers(), tmp_path / "e", metadata={}, precison="fp32")
    with pytest.raises(SettingsError, match="metadata describes an nn.Module"):
        nnslim.build_engine(tmp_path / "model.pt", tmp_path / "e", metadata={"patch_size": (16, 16, 16)})
