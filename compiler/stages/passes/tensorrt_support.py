"""Which ONNX operators TensorRT 10.x / 11.x can parse, checked before any GPU is involved.

Where TensorRT is installed and can start, its own parser decides (`OnnxParser.supports_model_v2`
and the unsupported subgraphs it reports). Otherwise a table does: the operator list is transcribed
from onnx-tensorrt's operator support matrix (docs/operators.md), restrictions are checked for the
operators a U-Net export uses, and the highest opset depends on the TensorRT version
(`OPSET_LIMITS`). Operators of a non-default domain need a TensorRT plugin and are reported too.

For int8, `tensorrt_qdq_issues` checks that a Q/DQ graph has the form TensorRT's explicit
quantization takes (symmetric int8, weight scales on the axis its kernels use, Q/DQ only on conv inputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from nnslim.compiler.stages.passes.base import PassError, PassResult
from nnslim.compiler.runtime.backends.tensorrt_plan import BackendUnavailable, create, import_tensorrt

# (first TensorRT release, highest ONNX opset its parser supports), oldest first. Sources:
# onnx-tensorrt docs/operators.md of 10.0/10.1 ("opset 9 to opset 20") and of 10.15 ("9 to 24");
# the TensorRT 11.5 release notes ("Added support for ONNX opset 25"), so 11.0-11.4 stop at 24;
# NVIDIA's ONNX opset guide for 11.x (maximum 25). Releases in between are taken at the lower bound.
OPSET_LIMITS: tuple[tuple[tuple[int, int], int], ...] = (
    ((10, 0), 20),
    ((10, 15), 24),
    ((11, 0), 24),
    ((11, 5), 25),
)
MAJORS = sorted({release[0] for release, _ in OPSET_LIMITS})


def max_opset(tensorrt_version: str) -> int:
    """The highest opset the ONNX parser of `tensorrt_version` ("10.16.1.11", or "11") supports."""
    parts = [int(p) for p in tensorrt_version.split(".")[:2] if p.isdigit()]
    release = (parts[0], parts[1] if len(parts) > 1 else 0)
    known = [limit for first, limit in OPSET_LIMITS if first <= release]
    if not known:
        raise ValueError(f"TensorRT {tensorrt_version} is older than nnslim supports (10.0)")
    return known[-1]


MAX_OPSET = max_opset("10")  # the highest opset every supported TensorRT parses

SUPPORTED = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike
Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv
DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
GridSample GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN
LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg
NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal
RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink
Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan
Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

RESIZE_MODES = {"nearest", "linear"}
RESIZE_TRANSFORMS = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}


@dataclass(frozen=True)
class Incompatibility:
    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op} {self.node!r}: {self.reason}"


def _opset_incompatibilities(opset: int | None, tensorrt_version: str | None) -> list[Incompatibility]:
    if opset is None:
        return []
    versions = [tensorrt_version] if tensorrt_version else [str(major) for major in MAJORS]
    too_new = [v for v in versions if opset > max_opset(v)]
    return [Incompatibility("<model>", "opset", f"opset {opset} is above TensorRT {v}'s {max_opset(v)}") for v in too_new]


def tensorrt_incompatibilities(graph: gs.Graph, opset: int | None = None,
                               tensorrt_version: str | None = None) -> list[Incompatibility]:
    """Every node TensorRT's ONNX parser would reject, with the reason, by the table.

    Args:
        tensorrt_version: the target TensorRT; None checks the opset against every supported
            major version's oldest release.
    """
    found = _opset_incompatibilities(opset, tensorrt_version)
    for node in graph.nodes:
        name = node.name or (node.outputs[0].name if node.outputs else node.op)
        if node.domain not in (None, "", "ai.onnx"):
            found.append(Incompatibility(name, node.op, f"custom domain {node.domain!r} needs a TensorRT plugin"))
        elif node.op not in SUPPORTED:
            found.append(Incompatibility(name, node.op, "not supported by the TensorRT ONNX parser"))
        else:
            reason = _restriction(node)
            if reason:
                found.append(Incompatibility(name, node.op, reason))
    return found


def installed_tensorrt_version() -> str | None:
    try:
        return import_tensorrt().__version__
    except BackendUnavailable:
        return None


def parser_incompatibilities(model: onnx.ModelProto) -> list[Incompatibility] | None:
    """What the installed TensorRT's own ONNX parser says; None when TensorRT is absent or cannot start."""
    try:
        trt = import_tensorrt()
        trt_logger = trt.Logger(trt.Logger.ERROR)
        builder = create(trt.Builder, trt_logger)  # needs a GPU: BackendUnavailable without one
        parser = create(trt.OnnxParser, builder.create_network(0), trt_logger)
    except BackendUnavailable:
        return None
    if parser.supports_model_v2(model.SerializeToString()):
        return []
    found = []
    for subgraph in range(parser.num_subgraphs):
        if parser.is_subgraph_supported(subgraph):
            continue
        for index in parser.get_subgraph_nodes(subgraph):
            node = model.graph.node[index]
            found.append(Incompatibility(node.name or node.output[0], node.op_type,
                                         f"TensorRT {trt.__version__}'s ONNX parser cannot take it"))
    errors = [parser.get_error(i).desc() for i in range(parser.num_errors)]
    return found or [Incompatibility("<model>", "model", f"TensorRT {trt.__version__}'s ONNX parser rejects it: "
                                     + ("; ".join(errors) or "no reason given"))]


def model_tensorrt_incompatibilities(model: onnx.ModelProto) -> list[Incompatibility]:
    """TensorRT's own parser when it can run here, else the table (shape-inferred first, for rank checks)."""
    verdict = parser_incompatibilities(model) if installed_tensorrt_version() else None
    if verdict is not None:
        return verdict
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    return tensorrt_incompatibilities(graph, opset, installed_tensorrt_version())


def _restriction(node: gs.Node) -> str | None:
    if node.op in ("Conv", "ConvTranspose", "MaxPool", "AveragePool"):
        weight_or_input = node.inputs[1] if node.op.startswith("Conv") else node.inputs[0]
        rank = len(weight_or_input.shape) if weight_or_input.shape is not None else None
        if rank is not None and rank not in (4, 5):
            return f"only 2D or 3D is supported, got a rank-{rank} tensor"
    if node.op == "MaxPool":
        if len(node.outputs) > 1 and node.outputs[1].outputs:
            return "the Indices output is unsupported"
        if any(d != 1 for d in node.attrs.get("dilations", [])):
            return "dilations must be empty or all ones"
    if node.op in ("Slice", "Pad") and len(node.inputs) > 3:  # axes is input 3 of both
        if not isinstance(node.inputs[3], gs.Constant):
            return "`axes` must be an initializer"
    if node.op == "Dropout" and len(node.inputs) > 2:
        mode = node.inputs[2]
        if not isinstance(mode, gs.Constant) or bool(np.asarray(mode.values)):
            return "`training_mode` must be an initializer that is False"
    if node.op == "Resize":
        mode = node.attrs.get("mode", "nearest")
        transform = node.attrs.get("coordinate_transformation_mode", "half_pixel")
        if mode not in RESIZE_MODES:
            return f"mode {mode!r} is unsupported (nearest, linear only)"
        if transform not in RESIZE_TRANSFORMS:
            return f"coordinate_transformation_mode {transform!r} is unsupported"
    return None


class CheckTensorRTCompatibilityPass:
    """Rewrites nothing; lists every node TensorRT cannot parse, and with `strict` fails the build."""

    exact: ClassVar[bool] = True

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.incompatibilities: list[Incompatibility] = []

    def run(self, graph: gs.Graph) -> PassResult:
        if installed_tensorrt_version():
            self.incompatibilities = model_tensorrt_incompatibilities(gs.export_onnx(graph))
        else:
            self.incompatibilities = tensorrt_incompatibilities(graph, graph.opset)
        if self.incompatibilities and self.strict:
            raise PassError("TensorRT cannot parse this graph:\n  " + "\n  ".join(map(str, self.incompatibilities)))
        verdict = "TensorRT 10.x/11.x compatible" if not self.incompatibilities else (
            f"{len(self.incompatibilities)} node(s) TensorRT cannot parse: "
            + "; ".join(map(str, self.incompatibilities[:10])))
        return PassResult(0, verdict)


# ---------------------------------------------------------------- int8: the Q/DQ form TensorRT takes
#
# TensorRT quantizes explicitly (the only int8 of TensorRT 11): it reads QuantizeLinear /
# DequantizeLinear pairs and fuses them into the op they feed. What it takes, and how nnslim's graph
# meets it:
# - symmetric only: "zeroPt must only contain zero-valued coefficients, because only symmetric
#   quantization is supported"; scales strictly positive; a scalar scale per tensor or a 1-D scale
#   per channel (IDequantizeLayer reference, TensorRT 10.x). So int8 with zero point 0: the uint8
#   recipes (asymmetric activations, for CPUs without VNNI) never reach a TensorRT build.
# - activations per tensor, weights per channel on the output channels of a Conv (axis 0 of its
#   `[C_out, C_in, ...]` weight). ConvTranspose is the exception: TensorRT's deconvolution int8
#   kernels take one scale per channel of axis 0 of the ONNX weight `[C_in, C_out / group, ...]`
#   (NVIDIA/TensorRT#2380: "We don't support per-output-channel quant for ConvTranspose", the
#   kernels "assume per-input-channel quant"; NVIDIA/TensorRT#1694 and NVIDIA's own quantization
#   toolkits, pytorch-quantization and TensorRT Model Optimizer, set axis 0 for ConvTranspose
#   weights). ONNX Runtime's default is axis 1, so a TensorRT build quantizes with
#   `quantize_int8(..., tensorrt=True)`, which sets TENSORRT_WEIGHT_AXES.
# - Q/DQ only where TensorRT fuses them: here the data and weight inputs of Conv / ConvTranspose;
#   a DequantizeLinear feeding anything else would leave an int8 tensor TensorRT must convert back.
TENSORRT_WEIGHT_AXES = {"Conv": 0, "ConvTranspose": 0}
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def _qdq_node_issues(node: onnx.NodeProto, init: dict[str, np.ndarray]) -> list[str]:
    """Type, zero point and scale of one QuantizeLinear / DequantizeLinear."""
    name, issues = node.name or node.output[0], []
    scale = init.get(node.input[1])
    if scale is None:
        issues.append(f"{node.op_type} {name!r}: its scale {node.input[1]!r} is not an initializer (TensorRT needs a "
                      "build-time constant)")
    elif scale.ndim > 1 or not np.all(scale > 0):
        issues.append(f"{node.op_type} {name!r}: scale must be a positive scalar or 1-D tensor, got shape "
                      f"{scale.shape}, min {float(scale.min()):.3g}")
    zero_point = init.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if zero_point is None and len(node.input) > 2 and node.input[2]:
        issues.append(f"{node.op_type} {name!r}: zero point {node.input[2]!r} is not an initializer")
    elif zero_point is not None and zero_point.dtype != np.int8:
        issues.append(f"{node.op_type} {name!r}: zero point of type {zero_point.dtype} (TensorRT takes int8 only; "
                      "a uint8 recipe's graph runs on CPU backends only)")
    elif zero_point is not None and zero_point.any():
        issues.append(f"{node.op_type} {name!r}: non-zero zero point {zero_point.ravel()[:4].tolist()} (TensorRT "
                      "quantizes symmetrically only)")
    return issues


def _placement_issues(node: onnx.NodeProto, consumers: list[tuple[onnx.NodeProto, int]],
                      init: dict[str, np.ndarray]) -> list[str]:
    """Where one DequantizeLinear sits: it must feed only a conv's data or weight, on the right axis."""
    name = node.name or node.output[0]
    wrong = [f"{c.op_type} {c.name!r} input {i}" for c, i in consumers
             if c.op_type not in TENSORRT_WEIGHT_AXES or i > 1]
    if wrong or not consumers:
        return [f"DequantizeLinear {name!r} feeds {', '.join(wrong) or 'nothing'}: TensorRT fuses Q/DQ only into "
                f"the data and weight inputs of {'/'.join(TENSORRT_WEIGHT_AXES)} here"]
    scale = init.get(node.input[1])
    per_channel = scale is not None and scale.ndim == 1 and scale.size > 1
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    issues = []
    for consumer, index in consumers:
        if index == 0 and per_channel:
            issues.append(f"DequantizeLinear {name!r}: activation of {consumer.name!r} quantized per channel "
                          "(TensorRT takes one scale per activation tensor)")
        if index == 1 and per_channel and axis != TENSORRT_WEIGHT_AXES[consumer.op_type]:
            issues.append(f"DequantizeLinear {name!r}: {consumer.op_type} {consumer.name!r} weight scales on axis "
                          f"{axis}; TensorRT needs axis {TENSORRT_WEIGHT_AXES[consumer.op_type]} "
                          "(quantize with quantize_int8(..., tensorrt=True))")
    return issues


def tensorrt_qdq_issues(model: onnx.ModelProto) -> list[str]:
    """Why TensorRT's explicit quantization would refuse or mis-handle this Q/DQ graph (empty: it takes it)."""
    init = _initializers(model)
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for index, tensor in enumerate(node.input):
            consumers.setdefault(tensor, []).append((node, index))
    issues = []
    for node in model.graph.node:
        if node.op_type not in QDQ_OPS or node.domain not in ("", "ai.onnx"):
            continue
        issues += _qdq_node_issues(node, init)
        if node.op_type == "DequantizeLinear":
            issues += _placement_issues(node, consumers.get(node.output[0], []), init)
        elif any(c.op_type != "DequantizeLinear" for c, _ in consumers.get(node.output[0], [])):
            issues.append(f"QuantizeLinear {node.name or node.output[0]!r} feeds an op other than DequantizeLinear")
    return issues
