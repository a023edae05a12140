"""TensorRT plan building on the CPU tier: cache keys, settings, the keyed timing-cache file and the
ONNX support table (passes/tensorrt_support.py) per TensorRT version. GPU tier (`gpu` / `tensorrt`
markers, skipped here): plans built and run, parity with PyTorch, cache hits, mismatched plans refused.

The build's control flow against the real TensorRT 10.x / 11.x classes is in
`tests/compiler/test_tensorrt_bindings.py`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import onnx_graphsurgeon as gs
import pytest
import torch

from nnslim.compiler.stages.passes.tensorrt_support import MAX_OPSET, max_opset, tensorrt_incompatibilities
from nnslim.compiler.stages.tensorrt_builder import TrtBuildSettings, cache_key, timing_cache_path
from nnslim.errors import EngineError

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
        cache_key(SHA, "10.9.0", (8, 6), replace(settings, precision="int8"), (1, 96, 96, 96)),
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
    TrtBuildSettings(fp16_mode="flag", precision="fp32")  # accepted: no flag to set (TensorRT 11 too)
    assert TrtBuildSettings(precision="int8").precision == "int8"  # the Q/DQ graph, strongly typed
    with pytest.raises(ValueError, match="int8 comes from the Q/DQ graph parsed strongly typed"):
        TrtBuildSettings(precision="int8", fp16_mode="flag")
    with pytest.raises(ValueError, match=r"precision fp32\|fp16\|int8"):
        TrtBuildSettings(precision="bf16")


def test_timing_cache_file_is_keyed_by_tensorrt_version_and_gpu():
    a10 = {"gpu": "NVIDIA A10", "compute_capability": [8, 6]}
    path = timing_cache_path(Path("caches/trt.cache"), "10.16.1.11", a10)
    assert path == Path("caches/trt.trt10.16.1.11.sm86.NVIDIA-A10.cache")
    others = {timing_cache_path(Path("caches/trt.cache"), "11.4.0.106", a10),
              timing_cache_path(Path("caches/trt.cache"), "10.16.1.11", {"gpu": "NVIDIA L4", "compute_capability": [8, 9]})}
    assert path not in others and len(others) == 2
    assert timing_cache_path(Path("timing"), "11.4.0.106", a10).name == "timing.trt11.4.0.106.sm86.NVIDIA-A10.cache"


def _graph(op: str = "Relu") -> gs.Graph:
    x = gs.Variable("x", dtype="float32", shape=(1, 2))
    y = gs.Variable("y", dtype="float32", shape=(1, 2))
    return gs.Graph(nodes=[gs.Node(op, name="n", inputs=[x], outputs=[y])], inputs=[x], outputs=[y])


def test_opset_limit_depends_on_the_tensorrt_version():
    assert (max_opset("10.3.0"), max_opset("10.16.1.11"), max_opset("11.4.0.106"), max_opset("11.5.0")) == (20, 24, 24, 25)
    assert MAX_OPSET == 20
    with pytest.raises(ValueError, match="older than nnslim supports"):
        max_opset("8.6.1")
    assert tensorrt_incompatibilities(_graph(), 22, "11.4.0.106") == []
    assert tensorrt_incompatibilities(_graph(), 22, "10.16.1.11") == []
    (found,) = tensorrt_incompatibilities(_graph(), 22, "10.8.0")
    assert found.op == "opset" and "TensorRT 10.8.0's 20" in found.reason
    (found,) = tensorrt_incompatibilities(_graph(), 22)  # no version known: every major's oldest release
    assert "TensorRT 10's 20" in found.reason
    assert len(tensorrt_incompatibilities(_graph(), 25)) == 2  # above 10's 20 and 11's 24
    assert [i.op for i in tensorrt_incompatibilities(_graph("Unique"), 18)] == ["Unique"]


# ---------------------------------------------------------------- GPU tier (skips here)

@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engine_builds_matches_pytorch_and_hits_the_cache(checkpoint_path, small_volume, tmp_path, precision):
    from nnslim.compiler.stages.pipeline import BuildConfig, build_engine
    from nnslim.compiler.runtime.engine import load_engine

    config = BuildConfig(checkpoint=checkpoint_path, out_dir=tmp_path / "e1", backend="tensorrt", precision=precision,
                         parity_volume=small_volume, engine_cache=tmp_path / "cache", timing_cache=tmp_path / "timing")
    first = build_engine(config)
    assert first.manifest["backend"] == "tensorrt" and first.manifest["tensorrt"]["cache_hit"] is False
    assert first.parity.argmax_agreement >= (0.999 if precision == "fp32" else 0.995)
    timing = first.manifest["tensorrt"]["timing_cache"]
    assert Path(timing["path"]).is_file() and Path(timing["path"]).name.startswith("timing.trt")
    second = build_engine(replace(config, out_dir=tmp_path / "e2"))
    assert second.manifest["tensorrt"]["cache_hit"] is True
    assert (tmp_path / "e2" / "engine.plan").read_bytes() == (tmp_path / "e1" / "engine.plan").read_bytes()
    engine = load_engine(tmp_path / "e1")
    tiles = torch.randn(2, 1, 16, 16, 16, device="cuda")
    assert engine.predictor(tiles[:1]).shape == (1, 3, 16, 16, 16)  # any batch up to the profile maximum
    assert engine.predictor(tiles).shape == (2, 3, 16, 16, 16)


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_int8_plan_from_the_qdq_graph_matches_pytorch_within_the_int8_gate(mni_raw, tmp_path):
    """The trained demo model (a random one's logits are near ties: int8 agreement measures the ties)."""
    import onnx

    from nnslim.compiler.runtime.precision import get_precision
    from nnslim.compiler.stages.passes.tensorrt_support import tensorrt_qdq_issues
    from nnslim.compiler.stages.pipeline import BuildConfig, build_engine
    from nnslim.compiler.runtime.engine import load_engine
    from tests.conftest import DEMO_MODEL, DEMO_PATCH

    result = build_engine(BuildConfig(checkpoint=DEMO_MODEL, out_dir=tmp_path / "e", backend="tensorrt",
                                      precision="int8", patch_size=DEMO_PATCH, engine_cache=tmp_path / "cache",
                                      parity_volume=mni_raw / "imagesTr" / "mni_0000.nii.gz"))
    manifest = result.manifest
    assert (manifest["backend"], manifest["precision"]) == ("tensorrt", "int8")
    assert manifest["tensorrt"]["onnx_model"] == "model.int8.onnx"  # the graph TensorRT parsed
    assert manifest["tensorrt"]["settings"]["precision"] == "int8"
    assert tensorrt_qdq_issues(onnx.load(str(tmp_path / "e" / "model.int8.onnx"))) == []
    assert result.parity.within(get_precision("int8").tolerance), result.parity  # the plan, on the GPU
    engine = load_engine(tmp_path / "e")
    assert engine.predictor(torch.randn(2, 1, *DEMO_PATCH, device="cuda")).shape == (2, 3, *DEMO_PATCH)


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_plan_with_a_mismatched_manifest_is_refused(checkpoint_path, tmp_path):
    from nnslim.compiler.stages.pipeline import BuildConfig, build_engine
    from nnslim.compiler.runtime.engine import load_engine

    build_engine(BuildConfig(checkpoint=checkpoint_path, out_dir=tmp_path / "e", backend="tensorrt",
                             engine_cache=tmp_path / "cache"))
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    manifest["tensorrt"]["version"] = "9.0.0"
    (tmp_path / "e" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="built with TensorRT 9.0.0"):
        load_engine(tmp_path / "e")
