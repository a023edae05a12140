"""ONNX files in: a graph exported by someone else (static batch 1, its own tensor names) builds with
`build-engine model.onnx --metadata FILE.json`, and the engine agrees with ONNX Runtime on the
original file; graphs that do not fit (a 2D graph with a 3D patch, another class count, no metadata) are
refused clearly. 2D graphs, probability and sigmoid outputs and SimpleITK's axis order are built too."""

from __future__ import annotations

import hashlib
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
from nnslim.compiler.stages.onnx_source import OnnxReference, onnx_source
from nnslim.compiler.stages.source import SourceError
from tests.compiler.stages.test_module_source import LABELS, ThreeLayers


def export(net: nn.Module, example: torch.Tensor, path) -> None:
    """As another tool would: static shapes, its own names."""
    torch.onnx.export(net.eval(), (example,), str(path), input_names=["input"], output_names=["output"], dynamo=True)


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("onnx") / "theirs.onnx"
    export(ThreeLayers(), torch.zeros(1, 1, 16, 16, 16), path)
    return path


def test_an_onnx_graph_builds_and_agrees_with_onnx_runtime_on_it(graph, small_volume, tmp_path):
    metadata = tmp_path / "theirs.json"
    metadata.write_text(json.dumps({"label_names": LABELS, "mirror_axes": [0, 1, 2]}))  # patch from the graph
    out = tmp_path / "engine"
    result = CliRunner().invoke(cli, ["build-engine", str(graph), "--out", str(out), "--metadata", str(metadata),
                                      "--precision", "fp32", "--parity-tiles", "2"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "onnx" and manifest["source"]["checkpoint"] == "theirs.onnx"
    assert manifest["source"]["checkpoint_sha256"] == hashlib.sha256(graph.read_bytes()).hexdigest()
    assert manifest["io"]["input"]["shape"][2:] == [16, 16, 16] and manifest["labels"] == LABELS
    image, spacing = crop(small_volume)
    with load_engine(out) as engine:
        labels = engine.segment(image, spacing)
        original = onnx_source(graph, {"label_names": LABELS}).model  # ONNX Runtime on the original graph
        assert isinstance(original, OnnxReference) and original.static_batch == 1
        reference = Engine(engine.directory, engine.manifest, engine.spec, TorchPredictor(original)).segment(image,
                                                                                                            spacing)
    assert len(np.unique(reference)) > 1 and np.mean(labels == reference) >= 0.999


class Flat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_graphs_that_do_not_fit_are_refused(graph, tmp_path):
    flat = tmp_path / "flat.onnx"
    export(Flat(), torch.zeros(1, 1, 16, 16), flat)
    with pytest.raises(SourceError, match="is a 2D graph .* patch_size \\[16, 16, 16\\] is 3D"):
        nnslim.build_engine(flat, tmp_path / "e1", metadata={"label_names": LABELS, "patch_size": (16, 16, 16)})
    with pytest.raises(SourceError, match="classes .* the graph says 3, the metadata 2"):
        nnslim.build_engine(graph, tmp_path / "e2", metadata={"label_names": ["a", "b"]})
    with pytest.raises(SourceError, match="needs metadata \\['label_names'\\]"):
        nnslim.build_engine(graph, tmp_path / "e3")
    with pytest.raises(SourceError, match="patch: the graph says 16, the metadata 32"):
        nnslim.build_engine(graph, tmp_path / "e4", metadata={"label_names": LABELS, "patch_size": (32, 32, 32)})
    assert not any((tmp_path / f"e{i}").exists() for i in range(1, 5))
    misplaced = CliRunner().invoke(cli, ["build-engine", str(tmp_path / "model.pt"), "--out", str(tmp_path / "e5"),
                                         "--metadata", str(tmp_path / "m.json")])
    assert misplaced.exit_code == 2


class Softmaxed(nn.Module):
    """A graph that ends in a softmax (or a sigmoid): probabilities, not logits."""

    def __init__(self, net: nn.Module, sigmoid: bool = False) -> None:
        super().__init__()
        self.net, self.sigmoid = net, sigmoid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return torch.sigmoid(y) if self.sigmoid else torch.softmax(y, dim=1)


def crop(path):
    """The MNI crop as an array and its voxel size, as nibabel reads it."""
    scan = nib.load(path)
    return np.asarray(scan.dataobj, np.float32), scan.header.get_zooms()[:3]


def built(tmp_path, net, example, metadata, name):
    export(net, example, tmp_path / f"{name}.onnx")
    (tmp_path / f"{name}.json").write_text(json.dumps(metadata))
    result = CliRunner().invoke(cli, ["build-engine", str(tmp_path / f"{name}.onnx"), "--out", str(tmp_path / name),
                                      "--metadata", str(tmp_path / f"{name}.json"), "--backend", "onnxruntime",
                                      "--precision", "fp32", "--parity-tiles", "2"])
    assert result.exit_code == 0, result.output
    return load_engine(tmp_path / name)


def test_probability_sigmoid_and_2d_graphs(small_volume, tmp_path):
    torch.manual_seed(1)
    net = ThreeLayers().eval()
    image, spacing = crop(small_volume)
    plain = built(tmp_path, net, torch.zeros(1, 1, 16, 16, 16), {"label_names": LABELS}, "logits")
    expected = plain.segment(image, spacing)
    # probabilities: log(p) is blended instead of logits, so labels may differ where windows overlap
    soft = built(tmp_path, Softmaxed(net), torch.zeros(1, 1, 16, 16, 16),
                 {"label_names": LABELS, "output": "probabilities"}, "soft")
    assert np.mean(soft.segment(image, spacing) == expected) >= 0.99
    # sigmoid regions: channel i is label order[i] where p > 0.5, later channels painted over earlier ones
    regions = built(tmp_path, Softmaxed(net, sigmoid=True), torch.zeros(1, 1, 16, 16, 16),
                    {"label_names": ["a", "b", "c"], "output": "sigmoid", "regions_class_order": [3, 1, 2]}, "sig")
    assert regions.manifest.postprocessing["class_order"] == [3, 1, 2]
    assert np.isin(np.unique(regions.segment(image, spacing)), [0, 1, 2, 3]).all()
    with torch.no_grad():  # the same network's logits, thresholded by hand, give the same regions
        tile = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 1, 16, 16, 16)).astype(np.float32))
        want = np.zeros((16, 16, 16), np.uint8)
        for head, label in enumerate([3, 1, 2]):
            want[net(tile)[0, head].numpy() > 0] = label
    got = regions.predictor(tile.numpy())[0]
    painted = np.zeros((16, 16, 16), np.uint8)
    for head, label in enumerate([3, 1, 2]):
        painted[got[head] > 0] = label
    assert np.mean(painted == want) >= 0.999
    # a 2D graph sliced along Z: each slice of the volume is one 2D tile, so labels equal slice-by-slice argmax
    torch.manual_seed(2)
    flat = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1)).eval()
    x, y, _ = image.shape
    engine = built(tmp_path, flat, torch.zeros(1, 1, x, y), {"label_names": LABELS, "slice_axis": 2,
                                                             "normalization": {"scheme": "zscore", "mask": "none",
                                                                               "outside": "transform"}}, "flat")
    assert engine.spec.patch_size == (x, y, 1)
    labels = engine.segment(image, spacing)
    normalized = (image - image.mean()) / image.std()
    with torch.no_grad():
        slices = torch.from_numpy(np.ascontiguousarray(normalized.transpose(2, 0, 1)[:, None]))
        want = flat(slices).argmax(1).numpy().transpose(1, 2, 0)
    assert np.mean(labels == want) >= 0.999


def test_sitk_axis_order_reverses_the_axes(small_volume, tmp_path):
    torch.manual_seed(3)
    net = ThreeLayers().eval()
    image, spacing = crop(small_volume)
    nib_engine = built(tmp_path, net, torch.zeros(1, 1, 16, 16, 16), {"label_names": LABELS}, "nib")
    sitk_engine = built(tmp_path, net, torch.zeros(1, 1, 16, 16, 16), {"label_names": LABELS, "axis_order": "reversed"},
                        "sitk")
    assert sitk_engine.spec.preprocessing["axis_order"] == "reversed"
    # the network sees [Z, Y, X]: segmenting the reversed volume with the nibabel engine is the same thing
    reversed_labels = nib_engine.segment(np.ascontiguousarray(image.transpose(2, 1, 0)), spacing[::-1])
    assert np.mean(sitk_engine.segment(image, spacing) == reversed_labels.transpose(2, 1, 0)) >= 0.999
