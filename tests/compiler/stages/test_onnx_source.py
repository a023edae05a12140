"""ONNX files in: a graph exported by someone else (static batch 1, its own tensor names) builds with
`build-engine model.onnx --metadata FILE.json`, and the engine agrees with ONNX Runtime on the
original file; graphs that do not fit (2D, another class count, no metadata) are refused clearly."""

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
    scan = nib.load(small_volume)
    image, spacing = np.asarray(scan.dataobj, np.float32), scan.header.get_zooms()[:3]
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
    with pytest.raises(SourceError, match="3D graphs"):
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
