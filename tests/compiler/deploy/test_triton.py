"""Triton export: the config reads back as written, the exported model runs as declared, dynamic
batching never prefers single tiles, and a TensorRT plan records the TensorRT version it needs."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from nnslim.compiler.deploy.triton import TritonExportError, config_pbtxt, export_triton, parse_pbtxt
from tests.conftest import manifest_record


def _manifest(max_batch: int, backend: str = "tensorrt"):
    fields = {
        "backend": backend, "runtime_model": "engine.plan" if backend == "tensorrt" else "model.opt.onnx",
        "io": {"input": {"name": "image", "dtype": "float32", "shape": ["batch", 2, 32, 64, 64]},
               "output": {"name": "logits", "dtype": "float32", "shape": ["batch", 4, 32, 64, 64]},
               "batch": {"min": 1, "opt": max_batch, "max": max_batch}},
        "labels": ["background", "a", "b", "c"],
    }
    if backend == "tensorrt":
        fields["tensorrt"] = {"version": "10.16.1.11", "gpu": "NVIDIA A10", "compute_capability": [8, 6]}
    return manifest_record(**fields)


@pytest.fixture(scope="module")
def engine_dir(checkpoint_path, tmp_path_factory):
    """An ONNX Runtime fp32 engine (explicitly: the shared fixture's backend is chosen by the build)."""
    from nnslim.compiler.stages.pipeline import BuildConfig, build_engine

    out = tmp_path_factory.mktemp("triton-engine") / "small"
    build_engine(BuildConfig(checkpoint=checkpoint_path, out_dir=out, batch_size=2, backend="onnxruntime", precision="fp32"))
    return out


def test_triton_config_reads_back_and_the_model_runs_as_declared(engine_dir, tmp_path):
    target = export_triton(engine_dir, tmp_path / "repo", name="tiny_seg", instances=2)
    config = parse_pbtxt((target / "config.pbtxt").read_text())
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    assert config["name"] == "tiny_seg" and config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == manifest["io"]["batch"]["max"] == 2
    (inp,), (out,) = config["input"], config["output"]
    assert inp == {"name": "image", "data_type": "TYPE_FP32", "dims": [1, 16, 16, 16]}
    assert out == {"name": "logits", "data_type": "TYPE_FP32", "dims": [3, 16, 16, 16]}
    assert config["dynamic_batching"]["preferred_batch_size"] == [2]
    assert config["instance_group"] == [{"count": 2, "kind": "KIND_GPU"}]
    assert "parameters" not in config  # no TensorRT version for an ONNX model
    model = target / "1" / "model.onnx"
    assert model.read_bytes() == (engine_dir / manifest["runtime_model"]).read_bytes()
    # what Triton would do with a full dynamic batch: [max_batch, *dims] in, [max_batch, *dims] out
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((config["max_batch_size"], *inp["dims"]), dtype=np.float32)
    (y,) = session.run(None, {inp["name"]: x})
    assert list(y.shape) == [config["max_batch_size"], *out["dims"]]
    with pytest.raises(TritonExportError, match="exists"):
        export_triton(engine_dir, tmp_path / "repo", name="tiny_seg")


@pytest.mark.parametrize(("max_batch", "preferred"), [(1, None), (2, [2]), (3, [3]), (4, [2, 4]), (8, [4, 8])])
def test_preferred_batch_sizes_never_include_one(max_batch, preferred):
    config = parse_pbtxt(config_pbtxt("ct", _manifest(max_batch)))
    assert config["max_batch_size"] == max_batch
    assert config["dynamic_batching"].get("preferred_batch_size") == preferred
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 100


def test_triton_config_for_a_tensorrt_plan_records_the_tensorrt_version():
    text = config_pbtxt("ct", _manifest(4), kind="KIND_GPU")
    config = parse_pbtxt(text)
    assert config["platform"] == "tensorrt_plan" and config["max_batch_size"] == 4
    assert config["input"][0]["dims"] == [2, 32, 64, 64]
    assert config["parameters"] == {"key": "nnslim_tensorrt_version", "value": {"string_value": "10.16.1.11"}}
    assert text.startswith("# TensorRT plan built with TensorRT 10.16.1.11 for NVIDIA A10")


def test_pbtxt_parser_rejects_broken_text():
    with pytest.raises(TritonExportError):
        parse_pbtxt('name: "x"\ninput [ { name: "a" ')
