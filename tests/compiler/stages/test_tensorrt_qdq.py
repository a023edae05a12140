"""int8 for TensorRT: the Q/DQ graph a TensorRT build parses, and the check that refuses any other.

Real graphs quantized by ONNX Runtime (the hand-built graph of `test_quantize.py` and the trained
demo model): the symmetric recipes with `TENSORRT_WEIGHT_AXES` pass `tensorrt_qdq_issues`; the
uint8 recipes, ONNX Runtime's default ConvTranspose axis and planted misplacements fail it, and the
TensorRT build refuses such a graph before TensorRT is involved. The plan itself is built in the
GPU tier (`test_tensorrt_builder.py`) and against the real bindings (`test_tensorrt_bindings.py`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from nnslim.compiler.stages.passes.tensorrt_support import TENSORRT_WEIGHT_AXES, tensorrt_qdq_issues
from nnslim.compiler.stages.artifacts import ArtifactJob
from nnslim.compiler.stages.pipeline import BuildConfig
from nnslim.compiler.stages.tensorrt_builder import TensorRTBuildError, build
from nnslim.compiler.stages.quantize import DEFAULT_RECIPES, UINT8_RECIPES, QuantRecipe, choose_recipe, quantize_int8
from nnslim.compiler.runtime.precision import get_precision
from nnslim.compiler.runtime.backends.onnx_runtime import OnnxRuntimePredictor
from tests.compiler.stages.test_quantize import LAYERS, Graph


def _quantized(graph: Path, tiles: np.ndarray, out: Path, recipe: QuantRecipe, tensorrt: bool = True) -> Path:
    quantize_int8(graph, out, tiles, recipe, tensorrt=tensorrt)
    return out


def test_signed_recipes_with_tensorrt_axes_pass(graph, tiles, tmp_path):
    for index, recipe in enumerate(DEFAULT_RECIPES):
        path = _quantized(graph, tiles, tmp_path / f"r{index}.onnx", recipe)
        assert tensorrt_qdq_issues(onnx.load(str(path))) == [], recipe.name
    g = Graph(_quantized(graph, tiles, tmp_path / "all.onnx", QuantRecipe("minmax", 0, keep_ends=False)))
    up = g.producer[g.nodes["up"].input[1]]  # ConvTranspose weights [C_in=16, C_out=8, ...]: per input channel
    assert next(a.i for a in up.attribute if a.name == "axis") == 0 and g.init[up.input[1]].shape == (16,)
    mid = g.producer[g.nodes["mid"].input[1]]  # Conv weights [C_out, C_in, ...]: per output channel
    assert next(a.i for a in mid.attribute if a.name == "axis") == 0 and g.init[mid.input[1]].shape == (16,)


def test_the_tensorrt_graph_stays_close_to_float_in_onnx_runtime(graph, tiles, tmp_path):
    path = _quantized(graph, tiles, tmp_path / "q.onnx", QuantRecipe())  # 0.05 measured, as with axis 1
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((2, 1, 8, 8, 8)).astype(np.float32))
    reference = OnnxRuntimePredictor(graph, "image", "head")(x.numpy())
    int8 = OnnxRuntimePredictor(path, "image", "head")(x.numpy())
    assert float(np.abs(int8 - reference).max() / np.abs(reference).max()) < 0.1


def test_uint8_recipes_are_refused(graph, tiles, tmp_path):
    recipe = UINT8_RECIPES[0]  # the other keeps every conv of this small graph in float
    issues = tensorrt_qdq_issues(onnx.load(str(_quantized(graph, tiles, tmp_path / "u.onnx", recipe))))
    assert issues and all("zero point of type uint8" in issue for issue in issues), issues


def test_onnx_runtimes_default_conv_transpose_axis_is_refused(graph, tiles, tmp_path):
    path = _quantized(graph, tiles, tmp_path / "q.onnx", QuantRecipe("minmax", 0, keep_ends=False), tensorrt=False)
    (issue,) = tensorrt_qdq_issues(onnx.load(str(path)))
    assert "ConvTranspose 'up' weight scales on axis 1; TensorRT needs axis 0" in issue


def test_non_zero_zero_points_and_misplaced_qdq_are_refused(graph, tiles, tmp_path):
    model = onnx.load(str(_quantized(graph, tiles, tmp_path / "q.onnx", QuantRecipe("minmax", 0, keep_ends=False))))
    g = Graph(tmp_path / "q.onnx")
    activation_dq = g.producer[g.nodes["mid"].input[0]]
    zero_point = next(i for i in model.graph.initializer if i.name == activation_dq.input[2])
    zero_point.CopyFrom(numpy_helper.from_array(np.array(3, np.int8), zero_point.name))
    norm = next(n for n in model.graph.node if n.name == "mid.norm")
    norm.input[0] = activation_dq.output[0]  # a float op now reads a dequantized tensor
    issues = tensorrt_qdq_issues(model)
    assert any("non-zero zero point [3]" in issue for issue in issues), issues
    assert any("feeds InstanceNormalization 'mid.norm' input 0" in issue for issue in issues), issues


def test_a_float_graph_has_nothing_to_refuse(graph):
    assert tensorrt_qdq_issues(onnx.load(str(graph))) == []  # a recipe may keep every conv in float


def test_the_trained_demo_model_quantized_for_tensorrt_passes_and_keeps_the_int8_gate(demo_graphs, tmp_path):
    """As the TensorRT build does it: every default recipe in TensorRT's form, the best one kept."""
    path = tmp_path / "model.int8.onnx"
    evaluation = demo_graphs.tiles[demo_graphs.evaluation]
    scores = choose_recipe(demo_graphs.fp32, path, demo_graphs.tiles[demo_graphs.calibration].numpy(), evaluation,
                           demo_graphs.expected[demo_graphs.evaluation],
                           lambda graph: OnnxRuntimePredictor(graph, "image", "logits"), tensorrt=True)
    model = onnx.load(str(path))
    assert tensorrt_qdq_issues(model) == []
    assert sum(n.op_type == "DequantizeLinear" and any(a.name == "axis" and a.i == 0 for a in n.attribute)
               for n in model.graph.node) > 3
    logits = OnnxRuntimePredictor(path, "image", "logits")(evaluation)
    agreement = float((logits.argmax(1) == demo_graphs.expected[demo_graphs.evaluation].argmax(1)).double().mean())
    assert agreement == scores[0].agreement  # the kept graph is the best recipe's
    assert agreement >= get_precision("int8").min_agreement, [(s.recipe.name, s.agreement) for s in scores]
    assert tensorrt_qdq_issues(onnx.load(str(demo_graphs.int8_uint8)))  # the CPU-only form is refused
    cpu_form = tensorrt_qdq_issues(onnx.load(str(demo_graphs.int8)))  # ONNX Runtime's defaults: why tensorrt=True
    assert any("TensorRT needs axis 0" in i for i in cpu_form) and any("feeds Concat" in i for i in cpu_form)


def test_the_tensorrt_build_refuses_a_graph_tensorrt_would_not_take(graph, tiles, tmp_path):
    """The check runs before TensorRT is imported: this fails the same way on a machine with a GPU."""
    staging = tmp_path / "staging"
    staging.mkdir()
    _quantized(graph, tiles, staging / "model.int8.onnx", UINT8_RECIPES[0])
    config = BuildConfig(checkpoint=tmp_path / "model.pt", out_dir=tmp_path / "engine", backend="tensorrt",
                         precision="int8", parity_volume=tmp_path / "volume.nii.gz")
    job = ArtifactJob(config, staging, {"int8": staging / "model.int8.onnx"}, "int8", 1, (8, 8, 8))
    with pytest.raises(TensorRTBuildError, match=r"(?s)model.int8.onnx is not a Q/DQ graph TensorRT takes "
                                                 r"\(\d+ issue\(s\)\):.*zero point of type uint8"):
        build(job)


def test_the_weight_axes_cover_exactly_the_quantized_ops():
    from nnslim.compiler.stages.quantize import QUANTIZED_OPS

    assert set(TENSORRT_WEIGHT_AXES) == set(QUANTIZED_OPS) == {op for op, _, _ in LAYERS.values()}
