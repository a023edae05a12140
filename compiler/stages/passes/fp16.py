"""fp16 conversion with precision in the graph (what TensorRT 11's strongly-typed mode needs).

Every node computes in fp16 except the ops in `keep_fp32` (normalizations and Softmax, whose
statistics overflow or lose precision in fp16). Float initializers take their consumer's
precision; wherever a float tensor flows between an fp16 and an fp32 node an explicit Cast is
inserted (one per tensor and direction, shared by all its consumers). With `keep_io_fp32` the
graph's inputs and outputs stay float32, so callers feed and receive float32 as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from nnslim.compiler.stages.graphs import GraphJob
from nnslim.compiler.stages.passes.base import ParityProbe, PassManager, PassResult, replace_tensor
from nnslim.compiler.stages.passes.tensorrt_support import CheckTensorRTCompatibilityPass

FLOAT_TYPES = (np.float32, np.float16)
KEEP_FP32 = ("InstanceNormalization", "GroupNormalization", "LayerNormalization", "BatchNormalization",
             "Softmax", "LogSoftmax")
# ops whose output type is set by an attribute or that only move shapes: left as they are
TYPE_NEUTRAL = ("Cast", "Shape", "Size", "ConstantOfShape")


class ConvertToFloat16Pass:
    exact: ClassVar[bool] = False

    def __init__(self, keep_fp32: tuple[str, ...] = KEEP_FP32, keep_io_fp32: bool = True) -> None:
        self.keep_fp32 = set(keep_fp32)
        self.keep_io_fp32 = keep_io_fp32

    def run(self, graph: gs.Graph) -> PassResult:
        _infer_dtypes(graph)
        precision = {id(n): (np.float32 if n.op in self.keep_fp32 else np.float16)
                     for n in graph.nodes if n.op not in TYPE_NEUTRAL}
        converted = self._convert_constants(graph, precision)
        # float activations take their producer's precision
        for node in graph.nodes:
            if id(node) in precision:
                for out in node.outputs:
                    if _is_float(out):
                        out.dtype = precision[id(node)]
        if not self.keep_io_fp32:
            for tensor in graph.inputs:
                if _is_float(tensor):
                    tensor.dtype = np.float16
        casts = self._insert_casts(graph, precision)
        casts += self._restore_output_types(graph)
        graph.cleanup().toposort()
        return PassResult(converted + casts, f"{converted} initializer(s) to fp16, {casts} Cast(s) inserted; "
                          f"kept in fp32: {sorted(self.keep_fp32 & {n.op for n in graph.nodes})}")

    @staticmethod
    def _convert_constants(graph: gs.Graph, precision: dict[int, type]) -> int:
        converted = 0
        for tensor in list(graph.tensors().values()):
            if not isinstance(tensor, gs.Constant) or np.asarray(tensor.values).dtype != np.float32:
                continue
            wanted = {precision[id(c)] for c in tensor.outputs if id(c) in precision}
            if wanted == {np.float16}:
                tensor.values = np.asarray(tensor.values).astype(np.float16)
                converted += 1
            elif len(wanted) == 2:  # consumed in both precisions: give fp16 consumers their own copy
                half = gs.Constant(f"{tensor.name}_fp16", np.asarray(tensor.values).astype(np.float16))
                for consumer in list(tensor.outputs):
                    if precision.get(id(consumer)) == np.float16:
                        replace_tensor(consumer.inputs, tensor, half)
                converted += 1
        return converted

    @staticmethod
    def _insert_casts(graph: gs.Graph, precision: dict[int, type]) -> int:
        made: dict[tuple[str, type], gs.Variable] = {}
        for node in list(graph.nodes):
            want = precision.get(id(node))
            if want is None:
                continue
            for i, tensor in enumerate(node.inputs):
                if isinstance(tensor, gs.Constant) or not _is_float(tensor) or np.dtype(tensor.dtype) == want:
                    continue
                key = (tensor.name, want)
                if key not in made:
                    suffix = "fp16" if want == np.float16 else "fp32"
                    cast_out = gs.Variable(f"{tensor.name}_{suffix}", dtype=want, shape=tensor.shape)
                    graph.nodes.append(gs.Node("Cast", f"{tensor.name}_to_{suffix}", {"to": _onnx_type(want)},
                                               inputs=[tensor], outputs=[cast_out]))
                    made[key] = cast_out
                node.inputs[i] = made[key]
        return len(made)

    def _restore_output_types(self, graph: gs.Graph) -> int:
        if not self.keep_io_fp32:
            return 0
        casts = 0
        for index, tensor in enumerate(list(graph.outputs)):
            if not _is_float(tensor) or np.dtype(tensor.dtype) == np.float32:
                continue
            # the producer keeps a renamed fp16 tensor; a Cast recreates the output under its name
            half = gs.Variable(f"{tensor.name}_fp16", dtype=np.float16, shape=tensor.shape)
            for producer in list(tensor.inputs):
                replace_tensor(producer.outputs, tensor, half)
            for consumer in list(tensor.outputs):
                replace_tensor(consumer.inputs, tensor, half)
            tensor.dtype = np.float32
            graph.nodes.append(gs.Node("Cast", f"{tensor.name}_to_fp32", {"to": onnx.TensorProto.FLOAT},
                                       inputs=[half], outputs=[tensor]))
            casts += 1
        return casts


def _is_float(tensor: gs.Tensor) -> bool:
    return tensor.dtype is not None and np.dtype(tensor.dtype) in [np.dtype(t) for t in FLOAT_TYPES]


def _onnx_type(dtype: type) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _infer_dtypes(graph: gs.Graph) -> None:
    """Fill in the element type of every tensor (ONNX shape inference on an exported copy)."""
    model = onnx.shape_inference.infer_shapes(gs.export_onnx(graph.copy()))
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    for name, tensor in graph.tensors().items():
        if isinstance(tensor, gs.Variable) and tensor.dtype is None and types.get(name):
            tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(types[name])


def float16_graph(job: GraphJob) -> tuple[Path, dict[str, Any]]:
    """The fp16 precision's producer (`stages.graphs`): `model.fp16.onnx` from the optimized fp32
    graph, parity-checked in ONNX Runtime after the conversion, and checked for TensorRT (strictly
    when TensorRT compiles it)."""
    fp32 = onnx.load(str(job.fp32))
    probe = ParityProbe(fp32, job.tiles.numpy()) if job.pass_parity else None
    passes = (ConvertToFloat16Pass(), CheckTensorRTCompatibilityPass(strict=job.compiled_for == "tensorrt"))
    converted, records = PassManager(passes).run(fp32, probe)
    onnx.checker.check_model(converted, full_check=True)
    out = job.staging / "model.fp16.onnx"
    onnx.save(converted, str(out))
    return out, {"passes": [type(p).__name__ for p in passes], "results": [r.to_dict() for r in records]}
