"""`.pt2` programs in: `build-engine model.pt2 --metadata FILE.json` builds an engine that `infer` runs,
for a program exported with a dynamic batch and one exported with a static batch of 1; an archive that
would unpickle Python objects is refused and nothing in it runs."""

from __future__ import annotations

import json
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from nnslim.compiler.cli import cli
from nnslim.compiler.runtime.engine import load_engine
from nnslim.compiler.stages.program_source import program_source
from nnslim.compiler.stages.source import SourceError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv3d(1, 8, 3, padding=1), nn.Conv3d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 8 * self.b(torch.relu(self.a(x)))


def save_program(path, dynamic: bool) -> Net:
    torch.manual_seed(0)
    net = Net().eval()
    example = torch.zeros(2 if dynamic else 1, 1, 16, 16, 16)
    shapes = {"x": {0: torch.export.Dim("batch", min=1, max=64)}} if dynamic else None
    torch.export.save(torch.export.export(net, (example,), dynamic_shapes=shapes), path)
    return net


def rewrite(path, members: dict, replaced: dict) -> None:
    """An archive of `members` with some replaced (or added)."""
    with zipfile.ZipFile(path, "w") as out:
        for member, data in {**members, **replaced}.items():
            out.writestr(member, data)


@pytest.mark.parametrize("dynamic", [True, False])
def test_program_builds_an_engine_that_segments_like_the_module(tmp_path, dynamic):
    net = save_program(tmp_path / "net.pt2", dynamic)
    (tmp_path / "meta.json").write_text(json.dumps({"label_names": ["background", "dark", "bright"]}))
    image = np.random.default_rng(0).normal(size=(20, 18, 17)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "case.nii.gz")
    runner = CliRunner()
    built = runner.invoke(cli, ["build-engine", str(tmp_path / "net.pt2"), "--metadata", str(tmp_path / "meta.json"),
                                "--out", str(tmp_path / "engine"), "--backend", "onnxruntime", "--precision", "fp32"])
    assert built.exit_code == 0, built.output
    manifest = json.loads((tmp_path / "engine" / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "torch-export" and manifest["io"]["input"]["shape"][2:] == [16, 16, 16]
    ran = runner.invoke(cli, ["infer", str(tmp_path / "engine"), str(tmp_path / "case.nii.gz"), "-o",
                              str(tmp_path / "seg.nii.gz")])
    assert ran.exit_code == 0, ran.output
    engine = load_engine(tmp_path / "engine")
    from nnslim.compiler.runtime.backends.torch_module import TorchPredictor

    reference = engine.segment(image, (1.0, 1.0, 1.0))
    from nnslim.compiler.runtime.segmentation import segment_volume
    from nnslim.compiler.runtime.volumes.volume import volume_from_array

    torch_labels, _ = segment_volume(volume_from_array(image, (1.0, 1.0, 1.0), 1), TorchPredictor(net), engine.spec)
    assert (reference == torch_labels).mean() >= 0.999
    assert (np.asarray(nib.load(tmp_path / "seg.nii.gz").dataobj) == reference).all()


def test_program_archive_that_would_unpickle_is_refused(tmp_path):
    save_program(tmp_path / "net.pt2", dynamic=True)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with zipfile.ZipFile(tmp_path / "net.pt2") as source:
        members = {n: source.read(n) for n in source.namelist()}
    sample = next(n for n in members if "sample_inputs" in n)
    import io

    buffer = io.BytesIO()
    torch.save(((Payload(),), {}), buffer)
    for name, replaced in [("evil.pt2", {sample: buffer.getvalue()}),
                           ("custom.pt2", {sample.replace("sample_inputs/model.pt", "constants/custom_obj_0"): b"x"})]:
        rewrite(tmp_path / name, members, replaced)
        with pytest.raises(SourceError, match="weights-only|pickled Python objects"):
            program_source(tmp_path / name, {"label_names": ["a", "b", "c"]})
    assert not marker.exists()
    with pytest.raises(SourceError, match="not a torch.export archive"):
        (tmp_path / "text.pt2").write_text("hello")
        program_source(tmp_path / "text.pt2", {"label_names": ["a", "b", "c"]})


def test_program_archive_whose_json_would_run_code_is_refused(tmp_path):
    """torch.export.load evaluates shape expressions with sympify and picks loaders by path_name."""
    save_program(tmp_path / "net.pt2", dynamic=True)
    with zipfile.ZipFile(tmp_path / "net.pt2") as source:
        members = {n: source.read(n) for n in source.namelist()}
    model = next(n for n in members if n.endswith("models/model.json"))
    weights = next(n for n in members if n.endswith("model_weights_config.json"))
    marker = tmp_path / "ran"
    evil = f"+0*__import__('builtins').open('{marker}','w').write('x')"
    expression = members[model].decode().replace("integer=True)", "integer=True)" + evil, 1)
    config = json.loads(members[weights])
    first = next(iter(config["config"]))
    config["config"][first]["path_name"] = "opaque_obj_0/p"
    for name, replaced in [("sympy.pt2", {model: expression.encode()}),
                           ("path.pt2", {weights: json.dumps(config).encode()})]:
        rewrite(tmp_path / name, members, replaced)
        with pytest.raises(SourceError, match="shape expression|payloads loaded by pickle"):
            program_source(tmp_path / name, {"label_names": ["a", "b", "c"]})
    assert not marker.exists()
