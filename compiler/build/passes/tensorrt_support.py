"""Which ONNX operators TensorRT 10.x / 11.x can parse, checked before any GPU is involved.

The table is transcribed from onnx-tensorrt's operator support matrix (docs/operators.md of
the ONNX-TensorRT 10.1 release, "TensorRT 10.0 supports operators in the inclusive range of opset
9 to opset 20"); restrictions are checked for the operators a U-Net export uses. Operators of a
non-default domain need a TensorRT plugin and are reported too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from nnslim.compiler.build.passes.base import PassError, PassResult

MAX_OPSET = 20

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


def tensorrt_incompatibilities(graph: gs.Graph, opset: int | None = None) -> list[Incompatibility]:
    """Every node TensorRT 10.x/11.x's ONNX parser would reject, with the reason."""
    found = []
    if opset is not None and opset > MAX_OPSET:
        found.append(Incompatibility("<model>", "opset", f"opset {opset} is above TensorRT's {MAX_OPSET}"))
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


def model_tensorrt_incompatibilities(model: onnx.ModelProto) -> list[Incompatibility]:
    """`tensorrt_incompatibilities` for an ONNX model (shape-inferred first, for rank checks)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return tensorrt_incompatibilities(gs.import_onnx(onnx.shape_inference.infer_shapes(model)), opset)


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
        self.incompatibilities = tensorrt_incompatibilities(graph, graph.opset)
        if self.incompatibilities and self.strict:
            raise PassError("TensorRT cannot parse this graph:\n  " + "\n  ".join(map(str, self.incompatibilities)))
        verdict = "TensorRT 10.x/11.x compatible" if not self.incompatibilities else (
            f"{len(self.incompatibilities)} node(s) TensorRT cannot parse: "
            + "; ".join(map(str, self.incompatibilities[:10])))
        return PassResult(0, verdict)
