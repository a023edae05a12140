"""Checks that run where `import tensorrt` is a real TensorRT Python module.

`test_tensorrt_bindings.py` runs this file in a subprocess against the real 10.x and 11.x
bindings wheels (stand-in C libraries, no GPU). On a machine with TensorRT installed it can be
run directly: `pytest tests/compiler/tensorrt_bindings_checks.py`. It is not named `test_*` so
that the ordinary suite does not collect it without TensorRT.

1. Names and signatures: every TensorRT name nnslim's code uses (found by walking its AST, see
   `tensorrt_api.py`) exists in this TensorRT, with a signature the call fits; planted removed
   APIs are caught.
2. Control flow: `build_plan`, plan loading and `TensorRTPredictor` run with doubles restricted to
   the real classes (`tensorrt_doubles.py`); only the factories that need a GPU, and the torch.cuda
   calls, are replaced.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from tests.compiler.tensorrt_api import check_sources, tensorrt_modules
from tests.compiler.tensorrt_doubles import install

trt = pytest.importorskip("tensorrt", reason="needs a TensorRT module; test_tensorrt_bindings.py provides the real wheels")

from nnslim.compiler.stages.tensorrt_builder import TensorRTBuildError, TrtBuildSettings, build_plan, timing_cache_path  # noqa: E402
from nnslim.compiler.runtime.backends.tensorrt_plan import BackendUnavailable, TensorRTPredictor, create  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MAJOR = int(trt.__version__.split(".")[0])
GPU = {"gpu": "NVIDIA Test GPU", "compute_capability": [8, 6]}

# Names nnslim uses on purpose although a version lacks them; each says where the code guards it.
ALLOWED_ABSENT = {
    11: {("BuilderFlag", "FP16"): "removed in TensorRT 11 (strongly typed only); tensorrt_builder.network_flags "
                                  "refuses the flag build on 11 before _builder_config could reach it"},
}

PLANTED = '''
def build(onnx_path, network):
    trt = import_tensorrt()
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    config = builder.create_builder_config()
    config.max_workspace_size = 1 << 30
    config.set_flag(trt.BuilderFlag.INT8)
    engine = builder.build_engine(network, config)
    context = trt.Runtime(trt.Logger()).deserialize_cuda_engine(b"").create_execution_context()
    context.execute_async_v2([0, 0], 0)
    config.set_timing_cache(config.create_timing_cache(b""))


def make(factory, *args):
    return factory(*args)


def _configure(config):
    config.max_workspace_size = 1 << 30  # reached only through a parameter


def build_through_helpers():
    from nnslim.compiler.runtime.backends.tensorrt_plan import import_tensorrt as load
    trt = load()
    _configure(make(trt.Builder, trt.Logger()).create_builder_config())
'''


def test_the_module_is_the_expected_real_wheel():
    expected = os.environ.get("NNSLIM_EXPECT_TENSORRT")
    if not expected:
        pytest.skip("run directly on an installed TensorRT: nothing to compare with")
    version, site = expected.split(":", 1)
    assert trt.__version__ == version
    assert Path(trt.__file__).resolve().is_relative_to(Path(site).resolve())


def test_every_tensorrt_name_nnslim_uses_exists_with_a_fitting_signature():
    findings, uses = check_sources(trt, tensorrt_modules(ROOT))
    allowed = ALLOWED_ABSENT.get(MAJOR, {})
    unexpected = [f for f in findings if (f.owner, f.name) not in allowed]
    assert not unexpected, f"TensorRT {trt.__version__} lacks:\n" + "\n".join(map(str, unexpected))
    for owner, name in allowed:  # an allowance for a name the version has is stale
        assert not hasattr(getattr(trt, owner), name), f"{owner}.{name} exists in {trt.__version__}: drop the allowance"
    used = {(u.owner, u.name) for u in uses}
    # the walk reached the objects returned by returned objects, in all three modules
    assert {("IExecutionContext", "execute_async_v3"), ("ITimingCache", "serialize"),
            ("ParserError", "desc"), ("OnnxParser", "supports_model_v2")} <= used, sorted(used)


def test_planted_removed_apis_and_wrong_arity_are_caught():
    findings, _ = check_sources(trt, {"planted.py": PLANTED})
    flagged = {f.name for f in findings}
    expected = {"max_workspace_size", "build_engine", "execute_async_v2", "set_timing_cache"}
    assert flagged == expected | ({"INT8"} if MAJOR >= 11 else set()), "\n".join(map(str, findings))
    lines = PLANTED.splitlines()
    helper = [f for f in findings if "reached only through a parameter" in lines[f.line - 1]]
    assert [f.name for f in helper] == ["max_workspace_size"], "the walk did not follow a forwarder and a parameter"


def test_a_factory_returning_null_becomes_backend_unavailable(tmp_path):
    with pytest.raises(BackendUnavailable, match=r"could not create its Builder.*nvidia-smi"):
        create(trt.Builder, trt.Logger(trt.Logger.WARNING))
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"plan")
    with pytest.raises(BackendUnavailable, match="could not create its Runtime"):
        TensorRTPredictor(plan, "image", "logits")


# ---------------------------------------------------------------- control flow with doubles

@pytest.fixture
def gpu(monkeypatch):
    """torch.cuda as on a machine with one GPU (nothing else in torch is touched)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=0: tuple(GPU["compute_capability"]))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=0: GPU["gpu"])


@pytest.fixture
def factories(monkeypatch, gpu):
    made = install(trt, monkeypatch)
    builder = made.of(trt.Builder)
    builder.build_serialized_network.return_value = b"PLAN"
    config = made.of(trt.IBuilderConfig)
    config.add_optimization_profile.return_value = 0
    config.set_timing_cache.return_value = True
    made.of(trt.ITimingCache).serialize.return_value = b"TIMING"
    made.of(trt.OnnxParser).parse_from_file.return_value = True
    return made


def _build(tmp_path, settings=TrtBuildSettings(), timing=True):
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"onnx")
    return build_plan(onnx_path, tmp_path / "engine.plan", settings, "image", (1, 16, 16, 16), "ab" * 32,
                      cache_dir=tmp_path / "cache", timing_cache=tmp_path / "trt.cache" if timing else None)


def test_build_plan_control_flow_on_the_real_classes(factories, tmp_path):
    record = _build(tmp_path, TrtBuildSettings(max_batch=2, sparse_weights=True))
    builder, config = factories.of(trt.Builder), factories.of(trt.IBuilderConfig)
    strongly_typed = 0 if MAJOR >= 11 else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    builder.create_network.assert_called_once_with(strongly_typed)
    factories.of(trt.OnnxParser).parse_from_file.assert_called_once_with(str(tmp_path / "model.onnx"))
    config.set_memory_pool_limit.assert_called_once_with(trt.MemoryPoolType.WORKSPACE, 4 << 30)
    assert config.builder_optimization_level == 3
    config.set_flag.assert_called_once_with(trt.BuilderFlag.SPARSE_WEIGHTS)
    factories.of(trt.IOptimizationProfile).set_shape.assert_called_once_with(
        "image", (1, 1, 16, 16, 16), (2, 1, 16, 16, 16), (2, 1, 16, 16, 16))
    assert (tmp_path / "engine.plan").read_bytes() == b"PLAN"
    timing_file = timing_cache_path(tmp_path / "trt.cache", trt.__version__, GPU)
    assert timing_file.read_bytes() == b"TIMING" and trt.__version__ in timing_file.name and "sm86" in timing_file.name
    assert record["cache_hit"] is False and record["timing_cache"] == {"path": timing_file.name, "loaded": False}  # no folders
    assert [name for name, _ in factories.made] == ["Builder", "OnnxParser"]

    (tmp_path / "engine.plan").unlink()
    again = _build(tmp_path, TrtBuildSettings(max_batch=2, sparse_weights=True))  # same inputs: the cache
    assert again["cache_hit"] is True and (tmp_path / "engine.plan").read_bytes() == b"PLAN"
    assert len(factories.made) == 2, "a cache hit must not create a builder"
    (entry,) = (tmp_path / "cache").iterdir()  # one checked entry; a damaged one is rebuilt, never copied
    entry.write_bytes(entry.read_bytes()[:-1] + b"X")
    (tmp_path / "engine.plan").unlink()
    assert _build(tmp_path, TrtBuildSettings(max_batch=2, sparse_weights=True))["cache_hit"] is False
    assert (tmp_path / "engine.plan").read_bytes() == b"PLAN" and len(factories.made) == 4


def test_saved_timing_cache_is_used_and_a_rejected_one_is_replaced(factories, tmp_path, caplog):
    timing_file = timing_cache_path(tmp_path / "trt.cache", trt.__version__, GPU)
    timing_file.write_bytes(b"saved")
    config = factories.of(trt.IBuilderConfig)
    assert _build(tmp_path)["timing_cache"]["loaded"] is True
    config.create_timing_cache.assert_called_once_with(b"saved")

    config.set_timing_cache.side_effect = [False, True]  # TensorRT refuses the saved cache, accepts an empty one
    (tmp_path / "cache").rename(tmp_path / "old-cache")
    with caplog.at_level(logging.WARNING):
        assert _build(tmp_path)["timing_cache"]["loaded"] is False
    assert "rejected the timing cache" in caplog.text and timing_file.read_bytes() == b"TIMING"


def test_fp16_flag_mode(factories, tmp_path):
    config = factories.of(trt.IBuilderConfig)
    fp32 = _build(tmp_path, TrtBuildSettings(fp16_mode="flag", precision="fp32"))  # no flag to set: fine on 10 and 11
    assert fp32["cache_hit"] is False and not config.set_flag.called
    if MAJOR >= 11:
        with pytest.raises(TensorRTBuildError, match="no FP16 builder flag"):
            _build(tmp_path, TrtBuildSettings(fp16_mode="flag", precision="fp16"))
        assert len(factories.made) == 2, "refused before a second builder was created"
    else:
        _build(tmp_path, TrtBuildSettings(fp16_mode="flag", precision="fp16"))
        config.set_flag.assert_called_once_with(trt.BuilderFlag.FP16)
        factories.of(trt.Builder).create_network.assert_called_with(0)  # weakly typed


def test_parser_errors_are_all_reported(factories, tmp_path):
    parser = factories.of(trt.OnnxParser)
    parser.parse_from_file.return_value = False
    parser.num_errors = 2
    error = factories.of(trt.ParserError)
    error.code.return_value = trt.ErrorCode.UNSUPPORTED_NODE
    error.desc.side_effect = ["no importer for op Foo", "bad attribute"]
    error.node_name.return_value = "foo_1"
    error.node_operator.return_value = "Foo"
    with pytest.raises(TensorRTBuildError, match=r"(?s)2 error\(s\).*no importer for op Foo \(foo_1, Foo\).*bad attribute"):
        _build(tmp_path)


class _Stream:
    """torch.cuda.Stream stand-in that logs the ordering calls."""

    def __init__(self, name, log):
        self.name, self.log, self.cuda_stream = name, log, 1000 + len(name)

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits for {other.name}")


def test_plan_loading_and_predictor_control_flow(monkeypatch, gpu, tmp_path):
    factories, log = install(trt, monkeypatch), []
    current, side = _Stream("torch", log), _Stream("tensorrt", log)
    monkeypatch.setattr(torch.cuda, "device", lambda device: nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: side)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    engine = factories.of(trt.ICudaEngine)
    engine.num_io_tensors = 2
    engine.get_tensor_name.side_effect = ["image", "logits"]
    engine.get_tensor_mode.return_value = trt.TensorIOMode.INPUT
    engine.get_tensor_dtype.return_value = trt.DataType.FLOAT
    engine.get_tensor_profile_shape.return_value = [(1, 1, 4, 4, 4), (2, 1, 4, 4, 4), (2, 1, 4, 4, 4)]
    context = factories.of(trt.IExecutionContext)
    context.set_input_shape.return_value = True
    context.get_tensor_shape.return_value = (2, 3, 4, 4, 4)
    context.execute_async_v3.side_effect = lambda handle: log.append(f"execute on {handle}") or True
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"PLAN")

    predictor = TensorRTPredictor(plan, "image", "logits")
    factories.of(trt.Runtime).deserialize_cuda_engine.assert_called_once_with(b"PLAN")
    assert predictor.max_batch == 2 and predictor.input_dtype == torch.float32
    predictor.device = torch.device("cpu")  # no CUDA tensors here: the tensors stay on the CPU
    out = predictor(torch.ones(2, 1, 4, 4, 4))
    assert out.shape == (2, 3, 4, 4, 4)
    context.set_input_shape.assert_called_once_with("image", (2, 1, 4, 4, 4))
    assert log == ["tensorrt waits for torch", f"execute on {side.cuda_stream}", "torch waits for tensorrt"]


def _two_node_model(opset: int):
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu"), helper.make_node("Sigmoid", ["y"], ["z"], name="gate")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=onnx.IR_VERSION)


def test_the_real_parser_decides_compatibility_when_it_can_start(factories):
    from nnslim.compiler.stages.passes.tensorrt_support import model_tensorrt_incompatibilities

    parser = factories.of(trt.OnnxParser)
    parser.supports_model_v2.return_value = False
    parser.num_subgraphs = 2
    parser.is_subgraph_supported.side_effect = [True, False]
    parser.get_subgraph_nodes.return_value = [1]
    found = model_tensorrt_incompatibilities(_two_node_model(18))
    assert [(i.node, i.op) for i in found] == [("gate", "Sigmoid")] and trt.__version__ in found[0].reason
    parser.supports_model_v2.return_value = True
    assert model_tensorrt_incompatibilities(_two_node_model(18)) == []


def test_without_a_gpu_the_table_uses_this_versions_opset_limit():
    from nnslim.compiler.stages.passes.tensorrt_support import max_opset, model_tensorrt_incompatibilities

    assert max_opset(trt.__version__) >= 22  # both wheels tested are past 10.15
    assert model_tensorrt_incompatibilities(_two_node_model(22)) == []  # the real Builder factory returns NULL here


# ---------------------------------------------------------------- int8: the Q/DQ graph, strongly typed

def _int8_staging(tmp_path, tensorrt_form=True):
    """An engine staging folder holding a real Q/DQ graph quantized by ONNX Runtime (signed, TensorRT's
    form; or the uint8 CPU-only form)."""
    import numpy as np

    from nnslim.compiler.stages.quantize import UINT8_RECIPES, QuantRecipe, quantize_int8
    from tests.compiler.stages.test_quantize import write_graph

    staging = tmp_path / "staging"
    staging.mkdir()
    tiles = np.random.default_rng(1).standard_normal((2, 1, 8, 8, 8)).astype(np.float32)
    recipe = QuantRecipe() if tensorrt_form else UINT8_RECIPES[0]
    quantize_int8(write_graph(tmp_path / "model.opt.onnx"), staging / "model.int8.onnx", tiles, recipe,
                  tensorrt=tensorrt_form)
    return staging


def _int8_config(tmp_path, **overrides):
    from nnslim.compiler.stages.pipeline import BuildConfig

    fields = dict(checkpoint=tmp_path / "model.pt", out_dir=tmp_path / "engine", backend="tensorrt", precision="int8",
                  parity_volume=tmp_path / "volume.nii.gz", engine_cache=tmp_path / "cache")
    return BuildConfig(**{**fields, **overrides})


def _int8_job(tmp_path, staging):
    from nnslim.compiler.stages.artifacts import ArtifactJob

    return ArtifactJob(_int8_config(tmp_path), staging, {"int8": staging / "model.int8.onnx"}, "int8", 1, (8, 8, 8))


def test_int8_build_parses_the_qdq_graph_strongly_typed_without_an_int8_flag(factories, tmp_path):
    from nnslim.compiler.stages.tensorrt_builder import build

    staging = _int8_staging(tmp_path)
    artifact = build(_int8_job(tmp_path, staging))
    record = artifact.manifest["tensorrt"]
    builder, config = factories.of(trt.Builder), factories.of(trt.IBuilderConfig)
    strongly_typed = 0 if MAJOR >= 11 else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    builder.create_network.assert_called_once_with(strongly_typed)
    factories.of(trt.OnnxParser).parse_from_file.assert_called_once_with(str(staging / "model.int8.onnx"))
    assert not config.set_flag.called, config.set_flag.call_args_list  # no INT8 (gone in 11), no FP16
    assert not [c for c in config.mock_calls if "calibrat" in str(c) or "INT8" in str(c)], config.mock_calls
    assert record.onnx_model == "model.int8.onnx" and record.extra["settings"]["precision"] == "int8"
    assert (staging / "engine.plan").read_bytes() == b"PLAN"


def test_int8_build_refuses_a_graph_tensorrt_would_not_take_before_any_builder(factories, tmp_path):
    from nnslim.compiler.stages.tensorrt_builder import TensorRTBuildError, build

    staging = _int8_staging(tmp_path, tensorrt_form=False)
    with pytest.raises(TensorRTBuildError, match="(?s)not a Q/DQ graph TensorRT takes.*zero point of type uint8"):
        build(_int8_job(tmp_path, staging))
    assert factories.made == []


def test_int8_build_plan_checks_the_qdq_graph_on_onnx_runtime_first(gpu, tmp_path):
    from nnslim.compiler.stages.candidates import Candidate
    from nnslim.compiler.stages.plan import BuildError, plan_build
    from nnslim.compiler.stages.tensorrt_builder import TensorRTBuildError

    plan = plan_build(_int8_config(tmp_path))
    assert (plan.compiled.name, plan.graphs, plan.candidates) == ("tensorrt", ("int8",), (Candidate("onnxruntime", "int8"),))
    assert plan_build(_int8_config(tmp_path, precision="auto")).candidates == (Candidate("onnxruntime", "fp32"),)
    with pytest.raises(BuildError, match="needs real calibration tiles"):
        plan_build(_int8_config(tmp_path, parity_volume=None))
    with pytest.raises(TensorRTBuildError, match="--trt-fp16-mode flag is for fp16"):
        plan_build(_int8_config(tmp_path, trt_fp16_mode="flag"))
