"""Each graph pass on a tiny graph built here: rewrite count, op histogram, ONNX Runtime parity,
onnx.checker, and a graph where it must not fire."""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnslim.compiler.stages.passes import (
    CheckTensorRTCompatibilityPass,
    ConvertToFloat16Pass,
    FoldBatchNormIntoConvPass,
    FoldConstantsPass,
    MakeBatchDynamicPass,
    ParityProbe,
    PassError,
    PassManager,
    RemoveNoOpsPass,
    RemoveUnusedPass,
    default_passes,
)

RNG = np.random.default_rng(0)
SHAPE = [2, 4, 6, 7, 5]


def const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def model(nodes, initializers, output_channels=6, batch="batch", output_name="y"):
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *SHAPE[1:]])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, output_channels, *SHAPE[2:]])],
        initializers,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    onnx.checker.check_model(m, full_check=True)
    return m


def conv_weights(suffix="", out=6, cin=4, k=3):
    return [const(f"w{suffix}", RNG.standard_normal((out, cin, k, k, k)).astype(np.float32) * 0.2),
            const(f"b{suffix}", RNG.standard_normal(out).astype(np.float32))]


def run(m, x):
    session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def apply(graph_pass, m):
    x = RNG.standard_normal(SHAPE).astype(np.float32)
    out, records = PassManager([graph_pass]).run(m, ParityProbe(m, x))
    onnx.checker.check_model(out, full_check=True)
    np.testing.assert_allclose(run(out, x), run(m, x), rtol=1e-4, atol=1e-4)
    return out, records[0]


def ops(m):
    return Counter(n.op_type for n in m.graph.node)


def test_fold_constants():
    nodes = [
        helper.make_node("Mul", ["w", "two"], ["w2"]),  # computed weight: folds into a constant
        helper.make_node("Conv", ["x", "w2", "b"], ["y"], pads=[1] * 6),
    ]
    m = model(nodes, conv_weights() + [const("two", np.float32(2.0))])
    out, record = apply(FoldConstantsPass(), m)
    assert record.changed == 1 and ops(out) == Counter({"Conv": 1})
    _, record = apply(FoldConstantsPass(), out)
    assert record.changed == 0


def test_remove_noops():
    nodes = [
        helper.make_node("Identity", ["x"], ["a"]),
        helper.make_node("Cast", ["a"], ["c"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["c", "shape"], ["r"]),
        helper.make_node("Dropout", ["r"], ["d"]),
        helper.make_node("Conv", ["d", "w", "b"], ["conv"], pads=[1] * 6),
        helper.make_node("Identity", ["conv"], ["y"]),  # feeds the graph output: its name must survive
    ]
    m = model(nodes, conv_weights() + [const("shape", np.array([0, 4, 6, -1, 5], dtype=np.int64))])
    m = onnx.shape_inference.infer_shapes(m)
    out, record = apply(RemoveNoOpsPass(), m)
    assert record.changed == 5 and ops(out) == Counter({"Conv": 1})
    assert [o.name for o in out.graph.output] == ["y"]


def test_remove_noops_keeps_real_casts_and_reshapes():
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["r"]),  # a real reshape: 6x7 -> 7x6
        helper.make_node("Reshape", ["r", "back"], ["c"]),
        helper.make_node("Conv", ["c", "w", "b"], ["y"], pads=[1] * 6),
    ]
    m = model(nodes, conv_weights() + [const("shape", np.array([0, 4, 7, 6, 5], dtype=np.int64)),
                                       const("back", np.array([0, 4, 6, 7, 5], dtype=np.int64))])
    out, record = apply(RemoveNoOpsPass(), onnx.shape_inference.infer_shapes(m))
    assert record.changed == 0 and ops(out)["Reshape"] == 2


def _bn(prefix, channels=6, eps=1e-3):
    return [const(f"{prefix}scale", RNG.uniform(0.5, 1.5, channels).astype(np.float32)),
            const(f"{prefix}bias", RNG.standard_normal(channels).astype(np.float32)),
            const(f"{prefix}mean", RNG.standard_normal(channels).astype(np.float32)),
            const(f"{prefix}var", RNG.uniform(0.5, 2, channels).astype(np.float32))]


def test_fold_batchnorm_into_conv_and_conv_transpose():
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1] * 6, name="conv"),
        helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["n"], epsilon=1e-3),
        helper.make_node("ConvTranspose", ["n", "tw"], ["t"], name="up"),  # 1x1x1 transposed conv, no bias
        helper.make_node("BatchNormalization", ["t", "tscale", "tbias", "tmean", "tvar"], ["y"], epsilon=1e-3),
    ]
    inits = conv_weights() + _bn("") + _bn("t") + [const("tw", RNG.standard_normal((6, 6, 1, 1, 1)).astype(np.float32))]
    out, record = apply(FoldBatchNormIntoConvPass(), model(nodes, inits))
    assert record.changed == 2 and ops(out) == Counter({"Conv": 1, "ConvTranspose": 1})


def test_fold_batchnorm_refuses_shared_weights_and_graph_input_weights():
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c1"], pads=[1] * 6),
        helper.make_node("Conv", ["x", "w", "b"], ["c2"], pads=[1] * 6),  # shares w and b
        helper.make_node("BatchNormalization", ["c1", "scale", "bias", "mean", "var"], ["n"], epsilon=1e-3),
        helper.make_node("Add", ["n", "c2"], ["y"]),
    ]
    out, record = apply(FoldBatchNormIntoConvPass(), model(nodes, conv_weights() + _bn("")))
    assert record.changed == 0 and ops(out)["BatchNormalization"] == 1


def test_remove_unused():
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1] * 6),
        helper.make_node("Relu", ["x"], ["dead"]),
    ]
    m = model(nodes, conv_weights() + [const("unused", np.ones(3, np.float32))])
    out, record = apply(RemoveUnusedPass(), m)
    assert record.changed == 2 and ops(out) == Counter({"Conv": 1})  # the node and its output
    assert [i.name for i in out.graph.initializer] == ["w", "b"]
    _, record = apply(RemoveUnusedPass(), out)
    assert record.changed == 0


def test_make_batch_dynamic():
    m = model([helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1] * 6)], conv_weights(), batch=2)
    out, record = apply(MakeBatchDynamicPass(), m)
    assert record.changed == 2
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = RNG.standard_normal([5, *SHAPE[1:]]).astype(np.float32)
    assert run(out, x).shape[0] == 5
    _, record = apply(MakeBatchDynamicPass(), out)
    assert record.changed == 0


def test_make_batch_dynamic_refuses_a_hard_coded_batch():
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]),
             helper.make_node("Conv", ["r", "w", "b"], ["y"], pads=[1] * 6)]
    m = model(nodes, conv_weights() + [const("shape", np.array(SHAPE, dtype=np.int64))], batch=2)
    with pytest.raises(PassError, match="hard-codes the batch size 2"):
        PassManager([MakeBatchDynamicPass()]).run(m)


def _unet_like():
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1] * 6),
        helper.make_node("InstanceNormalization", ["c", "s", "t"], ["n"], epsilon=1e-5),
        helper.make_node("LeakyRelu", ["n"], ["a"], alpha=0.01),
        helper.make_node("Slice", ["a", "starts", "ends", "axes"], ["q"]),
        helper.make_node("Conv", ["q", "w2", "b2"], ["y"], pads=[1] * 6),
    ]
    inits = conv_weights() + conv_weights("2", out=6, cin=3) + [
        const("s", RNG.uniform(0.5, 1.5, 6).astype(np.float32)), const("t", RNG.standard_normal(6).astype(np.float32)),
        const("starts", np.array([0], np.int64)), const("ends", np.array([3], np.int64)), const("axes", np.array([1], np.int64))]
    return model(nodes, inits)


def test_fp16_keeps_norms_and_io_in_fp32_with_explicit_casts():
    m = _unet_like()
    x = RNG.standard_normal(SHAPE).astype(np.float32)
    out, records = PassManager([ConvertToFloat16Pass()]).run(m, ParityProbe(m, x))
    onnx.checker.check_model(out, full_check=True)
    assert ops(out) == Counter({"Conv": 2, "InstanceNormalization": 1, "LeakyRelu": 1, "Slice": 1, "Cast": 4})
    types = {i.name: i.data_type for i in out.graph.initializer}
    assert types["w"] == types["b"] == types["w2"] == TensorProto.FLOAT16
    assert types["s"] == types["t"] == TensorProto.FLOAT and types["starts"] == TensorProto.INT64
    assert out.graph.input[0].type.tensor_type.elem_type == out.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    reference, half = run(m, x), run(out, x)
    assert np.abs(half - reference).max() < 0.05 * np.abs(reference).max()
    assert records[0].argmax_agreement >= 0.995


def test_fp16_with_fp16_io():
    out, _ = PassManager([ConvertToFloat16Pass(keep_io_fp32=False)]).run(_unet_like())
    assert out.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert out.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    session = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": RNG.standard_normal(SHAPE).astype(np.float16)})[0].dtype == np.float16


def test_tensorrt_check_flags_a_planted_unsupported_op():
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1] * 6),
        helper.make_node("Hardmax", ["c"], ["h"]),                       # supported
        helper.make_node("Cast", ["c"], ["h8"], to=TensorProto.UINT8),
        helper.make_node("BitwiseNot", ["h8"], ["mi"]),                  # planted: not supported
        helper.make_node("Cast", ["mi"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["h", "mf"], ["y"]),
    ]
    m = model(nodes, conv_weights())
    check = CheckTensorRTCompatibilityPass()
    PassManager([check]).run(m)
    assert [(i.op, i.reason) for i in check.incompatibilities] == [("BitwiseNot", "not supported by the TensorRT ONNX parser")]
    with pytest.raises(PassError, match="BitwiseNot"):
        PassManager([CheckTensorRTCompatibilityPass(strict=True)]).run(m)
    clean = CheckTensorRTCompatibilityPass(strict=True)
    PassManager([clean]).run(_unet_like())
    assert clean.incompatibilities == []


def test_manager_names_the_failing_pass_and_those_before_it():
    class BreakGraphPass:
        exact = True

        def run(self, graph):
            head = [n for n in graph.nodes if n.op == "Conv"][-1]  # not followed by a norm
            head.inputs[1].values = head.inputs[1].values * 2  # an "exact" pass that changes the math
            from nnslim.compiler.stages.passes import PassResult
            return PassResult(1, "doubled a weight")

    m = _unet_like()
    with pytest.raises(PassError, match=r"BreakGraphPass failed \(passes run before it: FoldConstantsPass, RemoveUnusedPass\)"):
        PassManager([FoldConstantsPass(), RemoveUnusedPass(), BreakGraphPass()]).run(
            m, ParityProbe(m, RNG.standard_normal(SHAPE).astype(np.float32)))


def test_default_pipeline_order():
    names = [type(p).__name__ for p in default_passes()]
    assert names == ["FoldConstantsPass", "RemoveNoOpsPass", "FoldBatchNormIntoConvPass", "RemoveUnusedPass",
                     "MakeBatchDynamicPass", "CheckTensorRTCompatibilityPass"]


def test_fold_batchnorm_refuses_weights_that_are_graph_inputs():
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 6),
         helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"], epsilon=1e-3)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [6, 4, 3, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6, *SHAPE[2:]])],
        _bn(""),
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    out, records = PassManager([FoldBatchNormIntoConvPass()]).run(m)
    assert records[0].changed == 0 and ops(out)["BatchNormalization"] == 1


def test_fp16_pass_does_not_fire_twice():
    once, _ = PassManager([ConvertToFloat16Pass()]).run(_unet_like())
    twice, records = PassManager([ConvertToFloat16Pass()]).run(once)
    assert records[0].changed == 0 and ops(twice) == ops(once)
