"""Triton export: every config.pbtxt is read back with Triton's own schema (tritonclient's
`ModelConfig`); the instance kind follows the engine's device; the exported model is the file the
engine runs and runs as declared; warmup is one patch tile; a second export adds a version and keeps
the first; an incompatible one changes nothing; dynamic batching never prefers single tiles; a
TensorRT plan records the TensorRT version it needs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from nnslim.compiler.cli import cli
from nnslim.compiler.runtime.manifest import load_manifest
from nnslim.compiler.deploy.triton import (
    TritonExportError,
    config_pbtxt,
    export_triton,
    parse_version_policy,
    read_config,
    version_policy_text,
)
from nnslim.extras import MissingExtraError
from tests.compiler.deploy.conftest import PLAN_BYTES
from tests.conftest import manifest_record



def _manifest(max_batch: int, backend: str = "tensorrt", precision: str = "fp32"):
    fields = {
        "backend": backend, "precision": precision,
        "runtime_model": "engine.plan" if backend == "tensorrt" else "model.opt.onnx",
        "io": {"input": {"name": "image", "dtype": "float32", "shape": ["batch", 2, 32, 64, 64]},
               "output": {"name": "logits", "dtype": "float32", "shape": ["batch", 4, 32, 64, 64]},
               "batch": {"min": 1, "opt": max_batch, "max": max_batch}},
        "labels": ["background", "a", "b", "c"],
    }
    if backend == "tensorrt":
        fields["tensorrt"] = {"version": "10.16.1.11", "gpu": "NVIDIA A10", "compute_capability": [8, 6]}
    return manifest_record(**fields)


def triton_config(path: Path) -> model_config_pb2.ModelConfig:
    """What Triton does with the file: parse it into its ModelConfig message (unknown fields refused)."""
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for a folder)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def engine_dir(checkpoint_path, tmp_path_factory):
    """An ONNX Runtime fp32 engine (explicitly: the shared fixture's backend is chosen by the build)."""
    from nnslim.compiler.stages.pipeline import BuildConfig, build_engine

    out = tmp_path_factory.mktemp("triton-engine") / "small"
    build_engine(BuildConfig(checkpoint=checkpoint_path, out_dir=out, batch_size=2, backend="onnxruntime", precision="fp32"))
    return out


def test_cpu_engine_config_parses_under_tritons_schema_and_the_model_runs_as_declared(engine_dir, tmp_path):
    done = export_triton(engine_dir, tmp_path / "repo", name="tiny_seg", instances=2)
    assert (done.model_dir, done.version, done.model_file) == (tmp_path / "repo" / "tiny_seg", 1, "model.onnx")
    config = triton_config(done.config)
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    assert config.name == "tiny_seg" and config.platform == "onnxruntime_onnx" and not config.backend
    assert config.max_batch_size == manifest["io"]["batch"]["max"] == 2
    (inp,), (out,) = config.input, config.output
    assert (inp.name, model_config_pb2.DataType.Name(inp.data_type), list(inp.dims)) == ("image", "TYPE_FP32",
                                                                                         [1, 16, 16, 16])
    assert (out.name, model_config_pb2.DataType.Name(out.data_type), list(out.dims)) == ("logits", "TYPE_FP32",
                                                                                         [3, 16, 16, 16])
    assert list(config.dynamic_batching.preferred_batch_size) == [2]
    (group,) = config.instance_group
    assert group.count == 2 and group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU  # a CPU engine
    assert not config.optimization.execution_accelerators.cpu_execution_accelerator  # plain ONNX Runtime
    parameters = {k: v.string_value for k, v in config.parameters.items()}
    runtime_model = manifest["runtime_model"]
    assert parameters == {"nnslim_backend": "onnxruntime", "nnslim_precision": "fp32",
                          "nnslim_model_sha256": manifest["files"][runtime_model]["sha256"]}
    # warmup: one tile of the engine's patch, batch 1, the input's dtype
    (warmup,) = config.model_warmup
    tile = warmup.inputs["image"]
    assert warmup.batch_size == 1 and tile.zero_data and tile.data_type == inp.data_type
    record = load_manifest(engine_dir)
    assert list(tile.dims) == [record.io.in_channels, *record.io.patch_size] == [1, 16, 16, 16]
    assert not config.HasField("version_policy")  # Triton's default: the newest version
    # the version folder holds the file the engine runs, and the manifest (names only) at both levels
    model = done.model_dir / "1" / "model.onnx"
    assert model.read_bytes() == (engine_dir / runtime_model).read_bytes()
    for copy in (done.model_dir / "nnslim_manifest.json", done.model_dir / "1" / "nnslim_manifest.json"):
        assert copy.read_bytes() == (engine_dir / "manifest.json").read_bytes()
    # what Triton would do with a full dynamic batch: [max_batch, *dims] in, [max_batch, *dims] out
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((config.max_batch_size, *inp.dims), dtype=np.float32)
    (y,) = session.run(None, {inp.name: x})
    assert list(y.shape) == [config.max_batch_size, *out.dims]


def test_tensorrt_plan_export_is_gpu_and_records_the_tensorrt_version(plan_engine, tmp_path):
    done = export_triton(plan_engine, tmp_path / "repo")
    text = done.config.read_text()
    config = triton_config(done.config)
    assert text.startswith("# TensorRT plan built with TensorRT 10.16.1.11 for NVIDIA A10")
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 2
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    parameters = {k: v.string_value for k, v in config.parameters.items()}
    assert parameters["nnslim_tensorrt_version"] == "10.16.1.11"
    assert (parameters["nnslim_backend"], parameters["nnslim_precision"]) == ("tensorrt", "fp16")
    assert list(config.model_warmup[0].inputs["image"].dims) == [1, 16, 16, 16]
    assert (done.model_dir / "1" / "model.plan").read_bytes() == PLAN_BYTES  # manifest.runtime_model
    with pytest.raises(TritonExportError, match="only on the GPU"):
        export_triton(plan_engine, tmp_path / "other", kind="KIND_CPU")
    assert not (tmp_path / "other").exists()


def test_openvino_engines_get_the_openvino_accelerator_and_keep_their_precision():
    config = read_config(config_pbtxt("ct", _manifest(2, backend="openvino", precision="bf16")))
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    assert config.platform == "onnxruntime_onnx"
    (accelerator,) = config.optimization.execution_accelerators.cpu_execution_accelerator
    assert accelerator.name == "openvino"
    assert config.parameters["nnslim_precision"].string_value == "bf16"
    assert config.parameters["nnslim_backend"].string_value == "openvino"
    assert list(config.model_warmup[0].inputs["image"].dims) == [2, 32, 64, 64]
    gpu = read_config(config_pbtxt("ct", _manifest(2, backend="openvino"), kind="KIND_GPU"))  # explicit override
    assert [g.kind for g in gpu.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    assert not gpu.optimization.execution_accelerators.cpu_execution_accelerator


def test_a_second_export_adds_a_version_and_keeps_the_first(engine_dir, tmp_path):
    repo = tmp_path / "repo"
    first = export_triton(engine_dir, repo, name="seg")
    (repo / "seg" / "1" / "notes.txt").write_text("the user's own file")
    before = tree(repo / "seg" / "1")
    old_config = first.config.read_text()
    second = export_triton(engine_dir, repo, name="seg", version_policy="all")
    assert second.version == 2 and (repo / "seg" / "2" / "model.onnx").is_file()
    assert (repo / "seg" / "2" / "nnslim_manifest.json").is_file()
    assert tree(repo / "seg" / "1") == before  # version 1 untouched, the user's file kept
    assert version_policy_text(triton_config(second.config)) == "all"
    assert (repo / "seg" / "config.pbtxt.before-v2").read_text() == old_config  # the replaced config is kept
    third = export_triton(engine_dir, repo, name="seg", version_policy="specific:1,3")
    assert third.version == 3 and version_policy_text(triton_config(third.config)) == "specific:1,3"
    fourth = export_triton(engine_dir, repo, name="seg")  # no policy given: the existing one is kept
    assert fourth.version == 4 and version_policy_text(triton_config(fourth.config)) == "specific:1,3"
    result = CliRunner().invoke(cli, ["export-triton", str(engine_dir), str(repo), "--name", "seg",
                                      "--version-policy", "latest:2"])
    assert result.exit_code == 0, result.output
    assert "version 5" in result.output and "5/model.onnx" in result.output
    config = triton_config(repo / "seg" / "config.pbtxt")
    assert version_policy_text(config) == "latest:2" and config.version_policy.latest.num_versions == 2
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]  # CLI default
    assert sorted(p.name for p in (repo / "seg").iterdir() if p.is_dir()) == ["1", "2", "3", "4", "5"]


def test_an_incompatible_export_is_refused_and_changes_nothing(engine_dir, plan_engine, tmp_path):
    repo = tmp_path / "repo"
    export_triton(engine_dir, repo, name="seg")
    before = tree(repo)
    with pytest.raises(TritonExportError, match="platform: 'onnxruntime_onnx' -> 'tensorrt_plan'"):
        export_triton(plan_engine, repo, name="seg")
    with pytest.raises(TritonExportError, match=r"version\(s\) \[7\]"):
        export_triton(engine_dir, repo, name="seg", version_policy="specific:1,7")
    (repo / "mine").mkdir()
    with pytest.raises(TritonExportError, match="not a Triton model folder"):
        export_triton(engine_dir, repo, name="mine")
    (repo / "mine").rmdir()
    assert tree(repo) == before


def test_a_hand_edited_typo_is_rejected_by_the_reader_and_by_a_re_export(engine_dir, tmp_path):
    repo = tmp_path / "repo"
    done = export_triton(engine_dir, repo, name="seg")
    text = done.config.read_text()
    assert "max_batch_size: 2" in text
    typo = text.replace("max_batch_size: 2", "max_bach_size: 2")
    with pytest.raises(TritonExportError, match="max_bach_size"):
        read_config(typo)
    with pytest.raises(TritonExportError, match="KIND_TPU"):
        read_config(text.replace("KIND_CPU", "KIND_TPU"))
    with pytest.raises(TritonExportError, match="unclosed|Expected"):
        read_config('name: "x"\ninput [ { name: "a" ')
    done.config.write_text(typo)
    before = tree(repo)
    with pytest.raises(TritonExportError, match="max_bach_size"):
        export_triton(engine_dir, repo, name="seg")
    assert tree(repo) == before


@pytest.mark.parametrize("policy", ["all", "latest:1", "latest:3", "specific:1", "specific:1,3"])
def test_version_policy_round_trips(policy):
    text = config_pbtxt("ct", _manifest(2), version_policy=policy)
    assert version_policy_text(read_config(text)) == policy


@pytest.mark.parametrize("policy", ["latest", "latest:0", "newest:2", "specific:", "specific:0,1", "all:2", ""])
def test_a_bad_version_policy_is_refused(policy):
    with pytest.raises(TritonExportError, match="version policy"):
        parse_version_policy(policy)


@pytest.mark.parametrize(("max_batch", "preferred"), [(1, []), (2, [2]), (3, [3]), (4, [2, 4]), (8, [4, 8])])
def test_preferred_batch_sizes_never_include_one(max_batch, preferred):
    config = read_config(config_pbtxt("ct", _manifest(max_batch)))
    assert config.max_batch_size == max_batch
    assert list(config.dynamic_batching.preferred_batch_size) == preferred
    assert config.dynamic_batching.max_queue_delay_microseconds == 100


def test_without_the_triton_extra_the_error_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tritonclient", None)  # as if not installed: its import fails
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)
    with pytest.raises(MissingExtraError, match=r"nnslim\[triton\]"):
        config_pbtxt("ct", _manifest(2))
