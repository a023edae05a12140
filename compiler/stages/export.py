"""PyTorch -> ONNX export (torch.export-based exporter), checked by `onnx.checker`.

The exported graph has one input `image [batch, C, *patch]` and one output
`logits [batch, K, *patch]`; the batch dimension is symbolic, the patch fixed. Training-only
heads (deep supervision) are switched off first, and the model is put in eval mode.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from nnslim.errors import NnslimError

logger = logging.getLogger(__name__)

# The highest IR version the supported ONNX Runtime releases load.
MAX_IR_VERSION = 10


class ExportError(NnslimError, RuntimeError):
    """The model could not be exported, or the exported graph is invalid."""


@dataclass(frozen=True)
class ExportSettings:
    patch_size: tuple[int, int, int]
    in_channels: int
    opset: int = 18
    input_name: str = "image"
    output_name: str = "logits"
    max_batch: int = 1024  # upper bound of the symbolic batch dimension


def strip_source_paths(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node Python stack traces (`pkg.torch.onnx.stack_trace`: file paths of
    this machine's torch and of the training code), which would ship inside every engine."""
    graphs = [proto.graph, *(f for f in proto.functions)]
    for graph in graphs:
        for node in graph.node:
            kept = [p for p in node.metadata_props if "stack_trace" not in p.key]
            if len(kept) != len(node.metadata_props):
                del node.metadata_props[:]
                node.metadata_props.extend(kept)


def export_onnx(model: nn.Module, path: Path, settings: ExportSettings) -> onnx.ModelProto:
    """Export `model` to `path` and return the checked ONNX model."""
    if settings.opset < 17:
        raise ExportError(f"opset {settings.opset} is too old; use 17 or newer")
    model = copy.deepcopy(model).cpu().eval()
    if hasattr(model, "set_deep_supervision"):
        model.set_deep_supervision(False)
    example = torch.zeros(2, settings.in_channels, *settings.patch_size)
    batch = torch.export.Dim("batch", min=1, max=settings.max_batch)
    quiet = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript")]
    levels = [q.level for q in quiet]
    for q in quiet:  # the exporter logs every internal step (and that torchvision is absent)
        q.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's chatter about its own internals
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=settings.opset,
                input_names=[settings.input_name],
                output_names=[settings.output_name],
                dynamic_shapes=({0: batch},),
                optimize=True,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many internal types
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    proto = program.model_proto
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    proto.producer_name = "nnslim"
    strip_source_paths(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported graph {path} fails onnx.checker: {exc}") from exc
    return onnx.load(str(path))
