"""Which ONNX operators TensorRT 10.x / 11.x can parse, checked before any GPU is involved.

Where TensorRT is installed and can start, its own parser decides (`OnnxParser.supports_model_v2`
and the unsupported subgraphs it reports). Otherwise a table does: the operator list is transcribed
from onnx-tensorrt's operator support matrix (docs/operators.md), restrictions are checked for the
operators a U-Net export uses, and the highest opset depends on the TensorRT version
(`OPSET_LIMITS`). Operators of a non-default domain need a TensorRT plugin and are reported too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from nnslim.compiler.build.passes.base import PassError, PassResult
from nnslim.compiler.runtime.tensorrt_runtime import BackendUnavailable, create, import_tensorrt

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
