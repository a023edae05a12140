"""TensorRT backend, GPU runtime and Triton export.

CPU tier (runs everywhere): cache keys, plan compatibility checks, the missing-TensorRT message,
Triton config generation parsed back and the exported ONNX model run as declared.
GPU tier (`gpu` / `tensorrt` markers, skipped without a GPU or TensorRT): plans built and run,
parity with PyTorch in fp32 and fp16, cache hits, mismatched plans refused, GPU sliding window.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
import torch

from nnslim.compiler.runtime.errors import EngineError
from nnslim.compiler.build.tensorrt_builder import TrtBuildSettings, cache_key
from nnslim.compiler.runtime.tensorrt_runtime import BackendUnavailable, check_compatibility, import_tensorrt
from nnslim.compiler.deploy.triton import TritonExportError, config_pbtxt, export_triton, parse_pbtxt

SHA = "ab" * 32


def test_cache_key_is_stable_and_changes_with_every_input():
    settings = TrtBuildSettings(max_batch=2)
    key = cache_key(SHA, "10.9.0", (8, 6), settings, (1, 96, 96, 96))
    assert key == cache_key(SHA, "10.9.0", (8, 6), TrtBuildSettings(max_batch=2), (1, 96, 96, 96))
    variants = [
        cache_key("cd" * 32, "10.9.0", (8, 6), settings, (1, 96, 96, 96)),
        cache_key(SHA, "10.9.1", (8, 6), settings, (1, 96, 96, 96)),
        cache_key(SHA, "10.9.0", (8, 9), settings, (1, 96, 96, 96)),
        cache_key(SHA, "10.9.0", (8, 6), replace(settings, max_batch=4), (1, 96, 96, 96)),
        cache_key(SHA, "10.9.0", (8, 6), replace(settings, precision="fp16"), (1, 96, 96, 96)),
        cache_key(SHA, "10.9.0", (8, 6), replace(settings, sparse_weights=True), (1, 96, 96, 96)),
        cache_key(SHA, "10.9.0", (8, 6), replace(settings, optimization_level=5), (1, 96, 96, 96)),
        cache_key(SHA, "10.9.0", (8, 6), settings, (1, 64, 96, 96)),
    ]
    assert len({key, *variants}) == len(variants) + 1


def test_build_settings_are_checked():
    with pytest.raises(ValueError, match="optimization level"):
        TrtBuildSettings(optimization_level=7)
    with pytest.raises(ValueError, match="max_batch"):
        TrtBuildSettings(max_batch=0)


def test_plan_for_another_tensorrt_or_gpu_is_refused_with_the_rebuild_command():
    manifest = {"tensorrt": {"version": "10.9.0", "gpu": "NVIDIA A100", "compute_capability": [8, 0]}}
    rebuild = "rebuild it: nnslim build-engine m.pt --out e --backend tensorrt"
    check_compatibility(manifest, "10.9.0", (8, 0), rebuild)  # same machine: fine
    with pytest.raises(EngineError, match=r"TensorRT 10\.9\.0 but this machine has 11\.0\.0.*nnslim build-engine m\.pt"):
        check_compatibility(manifest, "11.0.0", (8, 0), rebuild)
    with pytest.raises(EngineError, match=r"compute capability \[8, 0\] \(NVIDIA A100\).*\[8, 9\].*nnslim build-engine"):
        check_compatibility(manifest, "10.9.0", (8, 9), rebuild)


def test_missing_tensorrt_names_the_extra():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailable, match=r"pip install 'nnslim\[tensorrt\]'"):
            import_tensorrt()
    else:
        pytest.skip("TensorRT is installed here")


def test_tensorrt_engine_on_a_machine_without_tensorrt_is_refused_clearly(engine_dir, tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    from nnslim.compiler.runtime.engine import load_engine

    copy = tmp_path / "engine"
    shutil.copytree(engine_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["backend"] = "tensorrt"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackendUnavailable, match="nnslim\\[tensorrt\\]"):
        load_engine(copy)


def test_triton_config_reads_back_and_the_model_runs_as_declared(engine_dir, tmp_path):
    target = export_triton(engine_dir, tmp_path / "repo", name="tiny_seg", instances=2)
    config = parse_pbtxt((target / "config.pbtxt").read_text())
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    assert config["name"] == "tiny_seg" and config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == manifest["io"]["batch"]["max"] == 2
    (inp,), (out,) = config["input"], config["output"]
    assert inp == {"name": "image", "data_type": "TYPE_FP32", "dims": [1, 16, 16, 16]}
    assert out == {"name": "logits", "data_type": "TYPE_FP32", "dims": [3, 16, 16, 16]}
    assert config["dynamic_batching"]["preferred_batch_size"] == [1, 2]
    assert config["instance_group"] == [{"count": 2, "kind": "KIND_GPU"}]
    model = target / "1" / "model.onnx"
    assert model.read_bytes() == (engine_dir / "model.opt.onnx").read_bytes()
    # what Triton would do with a full dynamic batch: [max_batch, *dims] in, [max_batch, *dims] out
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((config["max_batch_size"], *inp["dims"]), dtype=np.float32)
    (y,) = session.run(None, {inp["name"]: x})
    assert list(y.shape) == [config["max_batch_size"], *out["dims"]]
    with pytest.raises(TritonExportError, match="exists"):
        export_triton(engine_dir, tmp_path / "repo", name="tiny_seg")


def test_triton_config_for_a_tensorrt_plan():
    manifest = {
        "backend": "tensorrt",
        "io": {"input": {"name": "image", "dtype": "float32", "shape": ["batch", 2, 32, 64, 64]},
               "output": {"name": "logits", "dtype": "float32", "shape": ["batch", 4, 32, 64, 64]},
               "batch": {"min": 1, "opt": 4, "max": 4}},
    }
    config = parse_pbtxt(config_pbtxt("ct", manifest, kind="KIND_GPU"))
    assert config["platform"] == "tensorrt_plan" and config["max_batch_size"] == 4
    assert config["input"][0]["dims"] == [2, 32, 64, 64] and config["dynamic_batching"]["preferred_batch_size"] == [2, 4]


def test_pbtxt_parser_rejects_broken_text():
    with pytest.raises(TritonExportError):
        parse_pbtxt('name: "x"\ninput [ { name: "a" ')


# ---------------------------------------------------------------- GPU tier (skips here)

@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engine_builds_matches_pytorch_and_hits_the_cache(checkpoint_path, small_volume, tmp_path, precision):
    from nnslim.compiler.build.pipeline import BuildConfig, build_engine
    from nnslim.compiler.runtime.engine import load_engine

    config = BuildConfig(checkpoint=checkpoint_path, out_dir=tmp_path / "e1", backend="tensorrt", precision=precision,
                         parity_volume=small_volume, engine_cache=tmp_path / "cache", timing_cache=tmp_path / "timing")
    first = build_engine(config)
    assert first.manifest["backend"] == "tensorrt" and first.manifest["tensorrt"]["cache_hit"] is False
    assert first.parity.argmax_agreement >= (0.999 if precision == "fp32" else 0.995)
    assert (tmp_path / "timing").is_file()
    second = build_engine(replace(config, out_dir=tmp_path / "e2"))
    assert second.manifest["tensorrt"]["cache_hit"] is True
    assert (tmp_path / "e2" / "engine.plan").read_bytes() == (tmp_path / "e1" / "engine.plan").read_bytes()
    engine = load_engine(tmp_path / "e1")
    tiles = torch.randn(2, 1, 16, 16, 16, device="cuda")
    assert engine.predictor(tiles[:1]).shape == (1, 3, 16, 16, 16)  # any batch up to the profile maximum
    assert engine.predictor(tiles).shape == (2, 3, 16, 16, 16)


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_plan_with_a_mismatched_manifest_is_refused(checkpoint_path, tmp_path):
    from nnslim.compiler.build.pipeline import BuildConfig, build_engine
    from nnslim.compiler.runtime.engine import load_engine

    build_engine(BuildConfig(checkpoint=checkpoint_path, out_dir=tmp_path / "e", backend="tensorrt",
                             engine_cache=tmp_path / "cache"))
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    manifest["tensorrt"]["version"] = "9.0.0"
    (tmp_path / "e" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="built with TensorRT 9.0.0"):
        load_engine(tmp_path / "e")


@pytest.mark.gpu
def test_gpu_sliding_window_equals_cpu(checkpoint_path, small_volume):
    from nnslim.compiler.runtime.predictors import TorchPredictor
    from nnslim.compiler.runtime.preprocessing import normalize
    from nnslim.compiler.runtime.sliding_window import SlidingWindowConfig, sliding_window_inference
    from nnslim.compiler.runtime.volume_io import load_volume
    from nnslim.training.checkpoint import load_model

    model, metadata = load_model(checkpoint_path)
    image = torch.from_numpy(normalize(load_volume(small_volume, 1).data, metadata["normalization"]))
    config = SlidingWindowConfig(patch_size=(16, 16, 16), batch_size=2, mirror_axes=(0, 1, 2))
    cpu = sliding_window_inference(image, TorchPredictor(model), 3, config)
    gpu = sliding_window_inference(image, TorchPredictor(model, device="cuda"), 3, config)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3)
    half = sliding_window_inference(image, TorchPredictor(model, device="cuda"), 3,
                                    replace(config, accumulate_dtype=torch.float16))
    assert (half.argmax(0).cpu() == cpu.argmax(0)).float().mean() >= 0.999


@pytest.mark.gpu
def test_onnxruntime_cuda_predictor_equals_cpu(engine_dir):
    from nnslim.compiler.runtime.predictors import OnnxRuntimeGpuPredictor, OnnxRuntimePredictor

    tiles = torch.randn(2, 1, 16, 16, 16)
    cpu = OnnxRuntimePredictor(engine_dir / "model.opt.onnx")(tiles)
    gpu = OnnxRuntimeGpuPredictor(engine_dir / "model.opt.onnx")(tiles.cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3)
