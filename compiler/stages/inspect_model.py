"""`nnslim inspect`: what is in an ONNX model or an engine directory.

MACs are counted per sample (batch 1) from ONNX shape inference: a Conv costs
`output elements x (C_in / groups) x kernel volume`, a ConvTranspose
`input elements x (C_out / groups) x kernel volume`.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from nnslim.errors import InputError
from nnslim.compiler.runtime.manifest import MANIFEST, EngineManifest, load_manifest, manifest_digest


@dataclass
class ModelSummary:
    path: Path
    ops: Counter
    parameters: int
    macs: int
    initializer_dtypes: Counter
    io: list[tuple[str, str, str, list]]  # (kind, name, dtype, shape)
    conv_weight_sparsity: float
    tensorrt_issues: list[str]
    opset: int
    manifest: EngineManifest | None = None
    manifest_sha256: str | None = None


def inspect_path(path: Path) -> ModelSummary:
    """Summarize `path`: an .onnx file, or an engine directory (its runtime model + manifest)."""
    path = Path(path)
    manifest = None
    if path.is_dir():
        manifest = load_manifest(path)  # verified: a tampered engine is reported as such
        path = path / manifest.runtime_model
    if not path.is_file():
        raise InputError(f"no ONNX model at {path}")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise InputError(f"{path} is not a readable ONNX model: {exc}") from exc
    summary = _summarize(model, path)
    summary.manifest = manifest
    if manifest is not None:
        summary.manifest_sha256 = manifest_digest(Path(path).parent)
    return summary


def _summarize(model: onnx.ModelProto, path: Path) -> ModelSummary:
    from nnslim.compiler.stages.passes import model_tensorrt_incompatibilities

    inits = {i.name: i for i in model.graph.initializer}
    arrays = {name: numpy_helper.to_array(t) for name, t in inits.items()}
    shapes = _shapes_at_batch_one(model)
    macs, zeros, weights = 0, 0, 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose") or node.input[1] not in arrays:
            continue
        w = arrays[node.input[1]]
        zeros += int((w == 0).sum())
        weights += w.size
        kernel = math.prod(w.shape[2:])
        if node.op_type == "Conv":
            out = shapes.get(node.output[0])
            macs += math.prod(out) * w.shape[1] * kernel if out else 0  # weight [C_out, C_in/groups, *k]
        else:
            inp = shapes.get(node.input[0])
            macs += math.prod(inp) * w.shape[1] * kernel if inp else 0  # weight [C_in, C_out/groups, *k]
    io = [("input", v.name, _dtype_name(v.type.tensor_type.elem_type), _dims(v)) for v in model.graph.input if v.name not in inits]
    io += [("output", v.name, _dtype_name(v.type.tensor_type.elem_type), _dims(v)) for v in model.graph.output]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    issues = [str(i) for i in model_tensorrt_incompatibilities(model)]
    return ModelSummary(
        path=path,
        ops=Counter(n.op_type for n in model.graph.node),
        parameters=int(sum(a.size for a in arrays.values() if np.issubdtype(a.dtype, np.floating))),
        macs=int(macs),
        initializer_dtypes=Counter(_dtype_name(t.data_type) for t in inits.values()),
        io=io,
        conv_weight_sparsity=zeros / weights if weights else 0.0,
        tensorrt_issues=issues,
        opset=opset,
    )


def _dtype_name(elem_type: int) -> str:
    return onnx.TensorProto.DataType.Name(elem_type).lower() if elem_type else "?"


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _shapes_at_batch_one(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Static shapes of every tensor with symbolic input dimensions set to 1."""
    fixed = copy.deepcopy(model)
    for value in fixed.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.Clear()
                dim.dim_value = 1
    del fixed.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(fixed)
    shapes = {}
    for value in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if dims and all(d > 0 for d in dims):
            shapes[value.name] = tuple(dims)
    return shapes


def format_summary(summary: ModelSummary) -> str:
    lines = [f"{summary.path}  (opset {summary.opset})"]
    for kind, name, dtype, shape in summary.io:
        lines.append(f"  {kind:<6} {name}: {dtype} {shape}")
    lines.append(f"  parameters        {summary.parameters:,}")
    lines.append(f"  conv MACs/sample  {summary.macs / 1e9:.3f} G")
    lines.append(f"  conv sparsity     {summary.conv_weight_sparsity:.1%}")
    lines.append(f"  initializers      {dict(summary.initializer_dtypes)}")
    lines.append("  ops               " + ", ".join(f"{op} {n}" for op, n in summary.ops.most_common()))
    if summary.tensorrt_issues:
        lines.append(f"  TensorRT 10.x/11.x: {len(summary.tensorrt_issues)} incompatible node(s)")
        lines += [f"    - {issue}" for issue in summary.tensorrt_issues]
    else:
        lines.append("  TensorRT 10.x/11.x: every node is supported by the ONNX parser")
    m = summary.manifest
    if m is not None:
        low, opt, high = m.io.batch
        lines.append(f"  engine            backend {m.backend}, precision {m.precision}, built {m.created}")
        lines.append(f"  labels            {', '.join(m.labels)}")
        lines.append(f"  batch             {{'min': {low}, 'opt': {opt}, 'max': {high}}}")
        lines.append(f"  parity vs PyTorch max |logit error| {m.parity.max_abs_logit_error:.2e}, "
                     f"argmax agreement {m.parity.argmax_agreement:.6f}")
        lines.append(f"  files             {', '.join(sorted(m.files))} (see {MANIFEST})")
        if summary.manifest_sha256:
            lines.append(f"  manifest sha256   {summary.manifest_sha256} (pin it: infer --engine-sha256, "
                         "load_engine(expected_sha256=...))")
    return "\n".join(lines)
