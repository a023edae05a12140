import json
from pathlib import Path

import pytest

from nnslim.compiler.runtime.manifest import Tolerance
from tests.conftest import manifest_json
from nnslim.compiler.stages.parity import ParityError
from nnslim.compiler.stages.pipeline import BuildConfig, BuildError, build_engine
from nnslim.compiler.runtime.engine import load_engine
from nnslim.errors import EngineError, NnslimError
from nnslim.files import sha256_file
from nnslim.compiler.runtime.backends.tensorrt_plan import BackendUnavailable


def test_manifest_records_io_stages_tools_and_hashes(engine_dir, checkpoint_path):
    manifest = manifest_json(engine_dir)
    assert manifest["backend"] == "onnxruntime" and manifest["runtime_model"] == "model.opt.onnx"
    assert manifest["io"]["input"] == {"name": "image", "dtype": "float32", "shape": ["batch", 1, 16, 16, 16]}
    assert manifest["io"]["output"]["shape"] == ["batch", 3, 16, 16, 16]
    assert manifest["io"]["batch"] == {"min": 1, "opt": 2, "max": 2}
    assert [s["name"] for s in manifest["stages"]] == ["load", "reparameterize", "export", "passes", "select"]
    assert manifest["precision"] == "fp32" and manifest["selection"]["requested"] == {"backend": "auto", "precision": "fp32"}
    assert set(manifest["files"]) == {"model.onnx", "model.opt.onnx", "report.md", "parity_disagreement.png"}
    for name, record in manifest["files"].items():
        assert record["sha256"] == sha256_file(engine_dir / name)
    assert manifest["source"]["checkpoint_sha256"] == sha256_file(checkpoint_path)
    assert manifest["tools"]["torch"] and manifest["tools"]["onnxruntime"]
    assert manifest["parity"]["argmax_agreement"] >= 0.999
    assert "crops of" in manifest["parity"]["source"]  # real tiles, not synthetic
    assert manifest["model"]["parameters"] > 0 and manifest["model"]["macs_per_patch"] > 0
    assert "Parity" in (engine_dir / "report.md").read_text()


def test_tampered_engine_is_refused_with_rebuild_hint(engine_dir, tmp_path):
    import shutil

    copy = tmp_path / "engine"
    shutil.copytree(engine_dir, copy)
    with open(copy / "model.opt.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(EngineError, match="does not match the sha256.*nnslim build-engine"):
        load_engine(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(EngineError, match="no manifest.json"):
        load_engine(copy)


def test_failed_parity_writes_nothing(checkpoint_path, tmp_path):
    out = tmp_path / "engine"
    strict = Tolerance(max_rel_logit_error=0.0, min_argmax_agreement=1.0)
    with pytest.raises(ParityError, match="engine not written"):
        build_engine(BuildConfig(checkpoint=checkpoint_path, out_dir=out, tolerance=strict, precision="fp32"))
    assert list(tmp_path.iterdir()) == []  # no engine and no staging directory left behind


def test_refuses_to_overwrite_a_foreign_directory(checkpoint_path, tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(NnslimError, match="not an nnslim engine"):
        build_engine(BuildConfig(checkpoint=checkpoint_path, out_dir=tmp_path, precision="fp32"))
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_patch_must_fit_the_network_stride(checkpoint_path, tmp_path):
    with pytest.raises(BuildError, match=r"not a multiple of the network's total stride \(4, 4, 4\)"):
        build_engine(BuildConfig(checkpoint=checkpoint_path, out_dir=tmp_path / "e", patch_size=(18, 16, 16)))


def test_tensorrt_backend_without_tensorrt_says_how_to_install(checkpoint_path, tmp_path):
    pytest.importorskip("nnslim.compiler.runtime.backends.tensorrt_plan")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailable, match=r"pip install 'nnslim\[tensorrt\]'"):
            build_engine(BuildConfig(checkpoint=checkpoint_path, out_dir=tmp_path / "e", backend="tensorrt"))
    else:
        pytest.skip("TensorRT is installed here")


def test_engine_from_another_backend_is_refused(engine_dir, tmp_path):
    import shutil

    copy = tmp_path / "engine"
    shutil.copytree(engine_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["backend"] = "quantum"  # a backend this runtime does not have (a newer nnslim's)
    manifest.pop("selection")  # and no other checked choice to fall back to
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="backend unknown to this nnslim"):
        load_engine(copy)


def test_build_engine_fuses_faster_fusion_and_batchnorm_first(tmp_path):
    from collections import Counter

    import onnx
    import torch
    from torch import nn

    from tests.conftest import metadata, small_config
    from nnslim.training.checkpoint import save_checkpoint
    from nnslim.training.unet import UNet

    torch.manual_seed(0)
    model = UNet(small_config(features_per_stage=(8, 16, 32), norm="batch", blocks=("conv", "faster_fusion", "faster_fusion")))
    generator = torch.Generator().manual_seed(1)
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm3d):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=generator) * 0.3)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)
    checkpoint = save_checkpoint(tmp_path / "ff.pt", model, metadata())
    result = build_engine(BuildConfig(checkpoint=checkpoint, out_dir=tmp_path / "engine", precision="fp32"))
    fused = result.manifest.model["reparameterization"]
    # FasterFusion: 2 + 2 encoder units (widths 16, 32) + 1 decoder unit (width 16); the width-8
    # stage keeps conv-BN units: 2 encoder + 1 decoder
    assert fused["faster_fusion_blocks_fused"] == 5 and fused["batchnorms_folded"] == 3
    assert fused["parameters_after"] == result.manifest.model["parameters"]
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "engine" / "model.opt.onnx")).graph.node)
    assert "BatchNormalization" not in ops and ops["Slice"] == 10 and ops["Add"] >= 5
    assert result.parity.argmax_agreement >= 0.999  # ONNX Runtime vs the *trained* (unfused) model


DEMO_MODEL = Path(__file__).resolve().parents[3] / "artifacts" / "models" / "mni-tissue-tiny.pt"


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_demo_model_is_parity_checked_after_every_pass(precision, mni_raw, tmp_path):
    result = build_engine(BuildConfig(
        checkpoint=DEMO_MODEL, out_dir=tmp_path / precision, precision=precision, parity_tiles=2,
        parity_volume=mni_raw / "imagesTr" / "mni_0000.nii.gz",
    ))
    passes = next(s for s in result.manifest.stages if s["name"] == "passes")
    assert [r["name"] for r in passes["results"]][-1] == "CheckTensorRTCompatibilityPass"
    assert all(r["max_abs_error"] is not None for r in passes["results"])
    if precision == "fp32":
        assert all(r["argmax_agreement"] == 1.0 for r in passes["results"])
        assert result.parity.argmax_agreement >= 0.999
    else:
        # fp16 on real MNI tiles, against the fp32 PyTorch model
        assert result.parity.argmax_agreement >= 0.995
        assert result.parity.max_rel_logit_error <= 5e-2
        assert result.manifest.io.input.dtype == "float32"  # I/O stay fp32
    assert "TensorRT 10.x/11.x compatible" in passes["results"][-1]["description"]


def test_inspect_reports_ops_macs_and_manifest(engine_dir):
    from click.testing import CliRunner

    from nnslim.compiler.cli import cli
    from nnslim.compiler.stages.inspect_model import inspect_path

    summary = inspect_path(engine_dir)
    manifest = manifest_json(engine_dir)
    assert summary.ops["Conv"] == 9 and summary.ops["ConvTranspose"] == 2
    assert summary.macs == manifest["model"]["macs_per_patch"]  # ONNX shapes agree with the PyTorch hooks
    assert summary.tensorrt_issues == [] and summary.manifest.backend == "onnxruntime"
    result = CliRunner().invoke(cli, ["inspect", str(engine_dir)])
    assert result.exit_code == 0 and "every node is supported" in result.output and "parity vs PyTorch" in result.output


def test_a_pinned_manifest_digest_detects_an_edit_of_manifest_and_files_together(engine_dir, tmp_path):
    import shutil

    from nnslim.compiler.runtime.manifest import TamperedEngineError, manifest_digest

    pinned = manifest_digest(engine_dir)
    assert load_engine(engine_dir, expected_sha256=pinned.upper()).runtime.backend == "onnxruntime"
    copy = tmp_path / "engine"
    shutil.copytree(engine_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["labels"] = ["background", "tumour", "organ"]  # a consistent edit: the file hashes still match
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert load_engine(copy).spec.label_names[1] == "tumour"  # the hashes alone cannot see it
    with pytest.raises(TamperedEngineError, match="not the pinned"):
        load_engine(copy, expected_sha256=pinned)
