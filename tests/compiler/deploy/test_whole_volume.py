"""`export-triton --whole-volume`: the config parses under Triton's schema with exactly the documented
interface; the version folder holds a verified copy of the engine that opens and segments as the
original does; warmup is one patch of zeros at the engine's voxel size; a second export adds a
version; a per-tile model of the same name is not replaced by it. (A real Triton server loads and
serves it in test_serve.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from nnslim import load_engine
from nnslim.compiler.cli import cli
from nnslim.compiler.deploy.triton import TritonExportError, export_triton
from nnslim.compiler.runtime.manifest import load_manifest


def parsed(path) -> pb.ModelConfig:
    return text_format.Parse(path.read_text(), pb.ModelConfig())


def test_the_config_is_the_documented_interface(engine_dir, tmp_path):
    done = export_triton(engine_dir, tmp_path / "repo", whole_volume=True)
    assert (done.model_dir.name, done.version, done.model_file) == ("nnslim", 1, "model.py")
    config = parsed(done.config)
    assert (config.name, config.backend, config.platform, config.max_batch_size) == ("nnslim", "python", "", 0)

    def entries(tensors):
        return [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in tensors]

    assert entries(config.input) == [("IMAGE", "TYPE_FP32", [-1, -1, -1, -1]), ("SPACING", "TYPE_FP32", [3])]
    assert not any(t.optional for t in config.input)
    assert entries(config.output) == [("LABELS", "TYPE_UINT8", [-1, -1, -1]),
                                      ("PROBABILITIES", "TYPE_FP16", [-1, -1, -1, -1])]
    (group,) = config.instance_group
    assert group.count == 1 and group.kind == pb.ModelInstanceGroup.KIND_CPU
    manifest = load_manifest(engine_dir)
    parameters = {k: v.string_value for k, v in config.parameters.items()}
    assert parameters["nnslim_backend"] == manifest.backend and parameters["nnslim_precision"] == manifest.precision
    assert parameters["nnslim_model_sha256"] == manifest.files[manifest.runtime_model].sha256
    (warmup,) = config.model_warmup
    image, spacing = warmup.inputs["IMAGE"], warmup.inputs["SPACING"]
    assert list(image.dims) == [manifest.spec.in_channels, *manifest.spec.patch_size] and image.zero_data
    raw = (done.model_dir / "warmup" / spacing.input_data_file).read_bytes()
    assert np.frombuffer(raw, "<f4").tolist() == list(manifest.spec.spacing or (1.0, 1.0, 1.0))


def test_the_version_folder_holds_the_engine_verified_and_it_segments_the_same(engine_dir, small_volume, tmp_path):
    import nibabel as nib

    done = export_triton(engine_dir, tmp_path / "repo", name="seg", whole_volume=True)
    copy = done.model_dir / "1" / "engine"
    listed = set(json.loads((engine_dir / "manifest.json").read_text())["files"]) | {"manifest.json"}
    assert {str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file()} == listed
    assert (done.model_dir / "1" / "model.py").read_text().count("from nnslim.compiler.deploy.whole_volume import")
    scan = nib.load(small_volume)
    image, spacing = np.asarray(scan.dataobj, np.float32), scan.header.get_zooms()[:3]
    with load_engine(engine_dir) as original, load_engine(copy) as exported:
        np.testing.assert_array_equal(exported.segment(image, spacing), original.segment(image, spacing))


def test_a_second_export_adds_a_version_and_a_tile_model_is_not_replaced(engine_dir, tmp_path):
    repo = tmp_path / "repo"
    first = export_triton(engine_dir, repo, whole_volume=True)
    second = export_triton(engine_dir, repo, whole_volume=True, version_policy="latest:2")
    assert (second.version, sorted(p.name for p in first.model_dir.iterdir())) == (2, ["1", "2", "config.pbtxt", "config.pbtxt.before-v2",
                                                                                       "warmup"])
    assert parsed(second.config).version_policy.latest.num_versions == 2
    export_triton(engine_dir, repo, name="tiles")
    before = (repo / "tiles" / "config.pbtxt").read_bytes()
    with pytest.raises(TritonExportError, match="another interface"):
        export_triton(engine_dir, repo, name="tiles", whole_volume=True)
    assert (repo / "tiles" / "config.pbtxt").read_bytes() == before and not (repo / "tiles" / "2").exists()


def test_the_cli_flag_writes_it(engine_dir, tmp_path):
    result = CliRunner().invoke(cli, ["export-triton", str(engine_dir), str(tmp_path / "repo"), "--whole-volume",
                                      "--instances", "2"])
    assert result.exit_code == 0, result.output
    assert "version 1: 1/model.py" in result.output
    assert parsed(tmp_path / "repo" / "nnslim" / "config.pbtxt").instance_group[0].count == 2


def test_a_tensorrt_form_engine_gets_gpu_instances_and_parses(plan_engine, tmp_path):
    done = export_triton(plan_engine, tmp_path / "repo", whole_volume=True)
    config = parsed(done.config)
    assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    assert {k: v.string_value for k, v in config.parameters.items()}["nnslim_backend"] == "tensorrt"
    assert (done.model_dir / "1" / "engine" / "engine.plan").is_file()
    with pytest.raises(TritonExportError, match="only on the GPU"):
        export_triton(plan_engine, tmp_path / "repo2", whole_volume=True, kind="KIND_CPU")


def test_nothing_in_the_repository_names_a_folder_of_this_machine(tiny_engine, tmp_path):
    """The exporter's per-node stack traces (paths of torch and of the training code) are stripped at
    export, so neither the engine nor its Triton copy carries a path of the build machine."""
    import sys
    from pathlib import Path

    done = export_triton(tiny_engine, tmp_path / "repo", whole_volume=True)
    places = {str(Path(__file__).resolve().parents[3]), sys.prefix, str(tmp_path), str(tiny_engine.parent)}
    for path in [*done.model_dir.rglob("*"), *tiny_engine.rglob("*")]:
        if path.is_file():
            data = path.read_bytes()
            assert not [p for p in places if p.encode() in data], path


def test_bad_kind_and_threads_are_export_errors(engine_dir, tmp_path):
    with pytest.raises(TritonExportError, match="KIND_TPU"):
        export_triton(engine_dir, tmp_path / "repo", whole_volume=True, kind="KIND_TPU")
    with pytest.raises(TritonExportError, match="threads"):
        export_triton(engine_dir, tmp_path / "repo", whole_volume=True, threads=-5)
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_a_whole_volume_model_of_other_channels_or_classes_is_not_a_new_version(engine_dir, tmp_path):
    """IMAGE and PROBABILITIES are [-1, ...]: the channel and class counts, as parameters, keep one
    config's versions to one interface (the warmup's channels, a client's classes)."""
    repo = tmp_path / "repo"
    export_triton(engine_dir, repo, whole_volume=True)
    other = tmp_path / "two-channels"
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    import shutil

    shutil.copytree(engine_dir, other)
    manifest["io"]["input"]["shape"][1] = 2
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TritonExportError, match="channels: '1' -> '2'"):
        export_triton(other, repo, whole_volume=True)
    assert sorted(p.name for p in (repo / "nnslim").iterdir()) == ["1", "config.pbtxt", "warmup"]
