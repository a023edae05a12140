"""The int8 stage's Q/DQ graph: symmetric, zero point 0, per-channel weights on the right axis, norms
and graph I/O in float, the recipe's float layers untouched; and how recipes are chosen.

The graph is built by hand so every property is known: Conv, InstanceNormalization, a strided
Conv, a ConvTranspose (weights `[C_in, C_out, ...]`) and a 1x1 head, thin and wide layers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from nnslim.compiler.stages.quantize import (
    ConvLayer,
    QuantizationError,
    QuantRecipe,
    choose_recipe,
    conv_layers,
    float_layers,
    quantize_int8,
)
from nnslim.compiler.runtime.backends.onnx_runtime import OnnxRuntimePredictor

# name: (op, in channels, out channels)
LAYERS = {"stem": ("Conv", 1, 4), "down": ("Conv", 4, 16), "up": ("ConvTranspose", 16, 8), "mid": ("Conv", 8, 16),
          "head": ("Conv", 16, 3)}


def _conv(name: str, source: str, rng: np.random.Generator, initializers: list) -> list:
    """A layer of LAYERS reading `source`, writing `name`; Convs other than the head are normalized."""
    op, c_in, c_out = LAYERS[name]
    kernel = {"stem": 3, "down": 3, "up": 2, "mid": 3, "head": 1}[name]
    shape = (c_out, c_in) if op == "Conv" else (c_in, c_out)  # ConvTranspose weights are [C_in, C_out, ...]
    initializers += [numpy_helper.from_array(rng.normal(0, 0.3, (*shape, *[kernel] * 3)).astype(np.float32), f"{name}.w"),
                     numpy_helper.from_array(rng.normal(0, 0.1, c_out).astype(np.float32), f"{name}.b")]
    attributes = {"strides": [2] * 3} if name in ("down", "up") else {}
    if op == "Conv" and kernel == 3:
        attributes["pads"] = [1] * 6
    nodes = [helper.make_node(op, [source, f"{name}.w", f"{name}.b"], [name if name == "head" else f"{name}.conv"],
                              name=name, **attributes)]
    if name != "head":
        initializers += [numpy_helper.from_array(rng.uniform(0.5, 1.5, c_out).astype(np.float32), f"{name}.norm.scale"),
                         numpy_helper.from_array(rng.normal(0, 0.2, c_out).astype(np.float32), f"{name}.norm.bias")]
        nodes += [helper.make_node("InstanceNormalization", [f"{name}.conv", f"{name}.norm.scale", f"{name}.norm.bias"],
                                   [f"{name}.norm"], name=f"{name}.norm"),
                  helper.make_node("LeakyRelu", [f"{name}.norm"], [name], name=f"{name}.act", alpha=0.01)]
    return nodes


def write_graph(path: Path) -> Path:
    rng = np.random.default_rng(0)
    initializers: list = []
    nodes, source = [], "image"
    for name in LAYERS:
        nodes += _conv(name, source, rng, initializers)
        source = name
    graph = helper.make_graph(
        nodes, "qdq-test", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8, 8])],
        [helper.make_tensor_value_info("head", TensorProto.FLOAT, ["batch", 3, 8, 8, 8])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)  # ONNX Runtime reads <= 13
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


class Graph:
    """Lookups over a quantized model: producers, consumers, initializers."""

    def __init__(self, path: Path) -> None:
        self.model = onnx.load(str(path))
        onnx.checker.check_model(self.model, full_check=True)
        self.nodes = {n.name: n for n in self.model.graph.node}
        self.producer = {out: n for n in self.model.graph.node for out in n.output}
        self.init = {i.name: numpy_helper.to_array(i) for i in self.model.graph.initializer}
        self.qdq = [n for n in self.model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]

    def consumers(self, tensor: str) -> list[onnx.NodeProto]:
        return [n for n in self.model.graph.node if tensor in n.input]

    def made_by(self, tensor: str) -> str | None:
        node = self.producer.get(tensor)
        return node.op_type if node is not None else None


def run(path: Path, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(OnnxRuntimePredictor(path, "image", "head")(x.numpy()))


def quantized(graph: Path, tiles: np.ndarray, tmp_path: Path, recipe: QuantRecipe) -> tuple[Graph, list[str]]:
    out = tmp_path / "model.int8.onnx"
    keep = quantize_int8(graph, out, tiles, recipe)
    return Graph(out), keep


def test_signed_recipe_is_symmetric_int8_with_zero_point_zero(graph, tiles, tmp_path):
    g, _ = quantized(graph, tiles, tmp_path, QuantRecipe("minmax", 0, keep_ends=False))
    assert g.qdq, "nothing was quantized"
    for node in g.qdq:
        zero_point = g.init[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any(), (node.name, zero_point)


def test_weights_are_per_channel_on_the_output_channel_axis(graph, tiles, tmp_path):
    g, keep = quantized(graph, tiles, tmp_path, QuantRecipe("minmax", 0, keep_ends=False))
    assert keep == []
    for name, (op, _, c_out) in LAYERS.items():
        weight_dq = g.producer[g.nodes[name].input[1]]
        assert weight_dq.op_type == "DequantizeLinear", f"{name}: weight not quantized"
        axis = next(a.i for a in weight_dq.attribute if a.name == "axis")
        assert axis == (0 if op == "Conv" else 1), f"{name} ({op}): per-channel axis {axis}"
        assert g.init[weight_dq.input[0]].dtype == np.int8
        assert g.init[weight_dq.input[1]].shape == (c_out,), f"{name}: one scale per output channel"


def test_norms_biases_and_graph_io_stay_float(graph, tiles, tmp_path):
    g, keep = quantized(graph, tiles, tmp_path, QuantRecipe("minmax", 0, keep_ends=True))
    assert keep == ["stem", "head"]
    assert not [n.name for n in g.consumers("image") if n.op_type == "QuantizeLinear"]
    assert g.made_by("head") == "Conv"  # the output is the head's float result, no DQ
    io = [*g.model.graph.input, *g.model.graph.output]
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in io)
    for node in g.model.graph.node:
        if node.op_type == "InstanceNormalization":  # reads a float conv output and float parameters
            assert [g.made_by(t) for t in node.input] == ["Conv" if node.name != "up.norm" else "ConvTranspose",
                                                          None, None], node.name
            assert all(g.init[t].dtype == np.float32 for t in node.input[1:])
        if node.op_type in ("Conv", "ConvTranspose"):
            assert g.made_by(node.input[2]) is None and g.init[node.input[2]].dtype == np.float32, f"{node.name} bias"
            assert g.made_by(node.output[0]) != "QuantizeLinear"
    for output in [t for n in g.qdq for t in n.output]:  # Q/DQ only feed convs or their Q/DQ partners
        assert all(c.op_type in ("Conv", "ConvTranspose", "DequantizeLinear") for c in g.consumers(output))


def test_float_layers_keep_float_weights_and_inputs(graph, tiles, tmp_path):
    recipe = QuantRecipe("minmax", min_channels=8, keep_ends=True)
    g, keep = quantized(graph, tiles, tmp_path, recipe)
    layers = conv_layers(onnx.load(str(graph)))
    assert keep == float_layers(layers, recipe) == ["stem", "down", "head"]  # down has 4 input channels
    for name in LAYERS:
        node = g.nodes[name]
        if name in keep:
            assert g.made_by(node.input[1]) is None and g.init[node.input[1]].dtype == np.float32, name
            assert g.made_by(node.input[0]) != "DequantizeLinear", f"{name} reads a quantized activation"
        else:
            assert g.made_by(node.input[1]) == "DequantizeLinear", name
            assert g.made_by(node.input[0]) == "DequantizeLinear", name


def test_uint8_recipe_has_unsigned_activations_and_is_not_for_tensorrt(graph, tiles, tmp_path):
    recipe = QuantRecipe("minmax", 0, keep_ends=True, activations="uint8")
    assert not recipe.tensorrt_ready and QuantRecipe().tensorrt_ready
    g, _ = quantized(graph, tiles, tmp_path, recipe)
    weights = {g.producer[g.nodes[name].input[1]].name for name in ("down", "up", "mid")}
    for node in g.qdq:
        dtype = g.init[node.input[2]].dtype
        assert dtype == (np.int8 if node.name in weights else np.uint8), (node.name, dtype)


def test_quantized_graph_runs_close_to_float(graph, tiles, tmp_path):
    quantize_int8(graph, tmp_path / "q.onnx", tiles, QuantRecipe())
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((2, 1, 8, 8, 8)).astype(np.float32))
    reference, int8 = run(graph, x), run(tmp_path / "q.onnx", x)
    assert float((int8 - reference).abs().max() / reference.abs().max()) < 0.1


def test_conv_layers_counts_channels_of_grouped_and_transposed_convs():
    weights = [numpy_helper.from_array(np.zeros(shape, np.float32), name)
               for name, shape in (("g.w", (8, 2, 3, 3, 3)), ("t.w", (8, 3, 2, 2, 2)))]
    nodes = [helper.make_node("Conv", ["x", "g.w"], ["y"], name="g", group=2),
             helper.make_node("ConvTranspose", ["y", "t.w"], ["z"], name="t", group=2)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 4, 4])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], weights)
    assert conv_layers(helper.make_model(graph)) == [ConvLayer("g", "Conv", 4, 8), ConvLayer("t", "ConvTranspose", 8, 6)]


def test_float_layers_by_recipe():
    layers = [ConvLayer(name, op, c_in, c_out) for name, (op, c_in, c_out) in LAYERS.items()]
    assert float_layers(layers, QuantRecipe(keep_ends=False)) == []
    assert float_layers(layers, QuantRecipe(keep_ends=True)) == ["stem", "head"]
    assert float_layers(layers, QuantRecipe(min_channels=16, keep_ends=False)) == ["stem", "down", "up", "mid", "head"]
    assert float_layers([], QuantRecipe()) == []


def test_bad_recipes_and_graphs_are_refused(tmp_path, tiles):
    with pytest.raises(QuantizationError, match=r"unknown calibration method 'max'; choose one of \('minmax', "):
        QuantRecipe("max")
    with pytest.raises(QuantizationError, match=r"unknown activation type 'fp8'; choose one of \('int8', 'uint8'\)"):
        QuantRecipe(activations="fp8")
    graph = helper.make_graph([helper.make_node("Relu", ["image"], ["y"])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 8, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8, 8])])
    onnx.save(helper.make_model(graph), str(tmp_path / "relu.onnx"))
    with pytest.raises(QuantizationError, match="has no Conv/ConvTranspose layers to quantize"):
        quantize_int8(tmp_path / "relu.onnx", tmp_path / "q.onnx", tiles, QuantRecipe())


def test_choose_recipe_keeps_the_best_by_agreement(graph, tiles, tmp_path):
    evaluation = torch.from_numpy(np.random.default_rng(3).standard_normal((2, 1, 8, 8, 8)).astype(np.float32))
    reference = run(graph, evaluation)
    recipes = (QuantRecipe("minmax", 0, False), QuantRecipe("minmax", 16, True))  # all float: agreement 1.0
    out = tmp_path / "model.int8.onnx"
    scores = choose_recipe(graph, out, tiles, evaluation, reference, lambda p: OnnxRuntimePredictor(p, "image", "head"),
                           recipes)
    assert [s.recipe for s in scores] == [recipes[1], recipes[0]]
    assert scores[0].agreement == 1.0 and scores[0].agreement >= scores[1].agreement
    assert scores[0].float_layers == list(LAYERS)
    assert not any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out)).graph.node)  # the winner's file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.onnx"]  # scratch files removed
    assert scores[0].to_dict()["name"] == "minmax, int8 activations, float below 16 channels, float ends"


def test_exported_demo_graph_has_the_same_structure(demo_graphs, tmp_path):
    """The same properties on a real export (PyTorch -> ONNX -> graph passes -> Q/DQ), not just a hand-built one."""
    path = tmp_path / "model.int8.onnx"
    quantize_int8(demo_graphs.fp32, path, demo_graphs.tiles[demo_graphs.calibration].numpy(), QuantRecipe())
    g = Graph(path)
    float_model = onnx.load(str(demo_graphs.fp32))
    assert [n.op_type for n in g.model.graph.node if n.op_type == "InstanceNormalization"] == \
        [n.op_type for n in float_model.graph.node if n.op_type == "InstanceNormalization"]
    kept = float_layers(conv_layers(float_model), QuantRecipe())
    assert sum(n.op_type == "ConvTranspose" and n.name not in kept for n in g.model.graph.node) == 3
    for node in g.qdq:
        zero_point = g.init[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any(), node.name
    for node in g.model.graph.node:
        if node.op_type == "InstanceNormalization":
            assert g.made_by(node.input[0]) in ("Conv", "ConvTranspose"), node.name
        if node.op_type in ("Conv", "ConvTranspose") and node.name not in kept:
            weight_dq = g.producer[node.input[1]]
            axis = next(a.i for a in weight_dq.attribute if a.name == "axis")
            channels = g.init[weight_dq.input[0]].shape[0 if node.op_type == "Conv" else 1]
            assert axis == (0 if node.op_type == "Conv" else 1) and g.init[weight_dq.input[1]].shape == (channels,)
    assert {n.op_type for n in g.model.graph.node if n.name in kept} <= {"Conv"} and len(kept) == 2
    assert not [n for n in g.consumers(g.model.graph.input[0].name) if n.op_type == "QuantizeLinear"]
    assert g.made_by(g.model.graph.output[0].name) not in ("DequantizeLinear", "QuantizeLinear")


def test_calibration_memory_is_estimated_from_the_conv_inputs_at_the_tile_size(graph):
    from nnslim.compiler.stages.quantize import calibration_bytes_per_tile, calibration_tiles_that_fit

    model = onnx.load(str(graph))
    # conv inputs: image 1 x P^3, stem 4 x P^3, down 16 x (P/2)^3, up 8 x P^3, mid 16 x P^3 (float32)
    for p in (8, 16):
        expected = 4 * (1 * p**3 + 4 * p**3 + 16 * (p // 2) ** 3 + 8 * p**3 + 16 * p**3)
        assert calibration_bytes_per_tile(model, (1, p, p, p)) == expected
    assert calibration_tiles_that_fit(graph, (1, 8, 8, 8), requested=4) == 4  # tiny tiles: all of them
    assert calibration_tiles_that_fit(graph, (1, 8, 8, 8), requested=4, budget_fraction=1e-12) == 1  # never 0
