"""ONNX graph passes (the only package that imports onnx_graphsurgeon).

`default_passes(precision)` is the one ordered pipeline build-engine runs between export and
engine build; see `base` for the pass interface and the manager.
"""

from __future__ import annotations

from nnslim.compiler.build.passes.base import GraphPass, ParityProbe, PassError, PassManager, PassRecord, PassResult
from nnslim.compiler.build.passes.fp16 import ConvertToFloat16Pass
from nnslim.compiler.build.passes.rewrites import (
    FoldBatchNormIntoConvPass,
    FoldConstantsPass,
    MakeBatchDynamicPass,
    RemoveNoOpsPass,
    RemoveUnusedPass,
)
from nnslim.compiler.build.passes.tensorrt_support import (
    CheckTensorRTCompatibilityPass,
    model_tensorrt_incompatibilities,
    tensorrt_incompatibilities,
)

PRECISIONS = ("fp32", "fp16")


def default_passes(precision: str = "fp32", strict_tensorrt: bool = False) -> tuple[GraphPass, ...]:
    """The build's pass list, in order.

    Args:
        precision: "fp16" adds the fp16 conversion (normalizations and I/O stay fp32).
        strict_tensorrt: fail when a node is not TensorRT-compatible (for TensorRT builds).
    """
    if precision not in PRECISIONS:
        raise PassError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    passes: tuple[GraphPass, ...] = (
        FoldConstantsPass(),
        RemoveNoOpsPass(),
        FoldBatchNormIntoConvPass(),
        RemoveUnusedPass(),
        MakeBatchDynamicPass(),
    )
    if precision == "fp16":
        passes += (ConvertToFloat16Pass(),)
    return passes + (CheckTensorRTCompatibilityPass(strict=strict_tensorrt),)


__all__ = [
    "CheckTensorRTCompatibilityPass", "ConvertToFloat16Pass", "FoldBatchNormIntoConvPass", "FoldConstantsPass",
    "GraphPass", "MakeBatchDynamicPass", "ParityProbe", "PassError", "PassManager", "PassRecord", "PassResult",
    "RemoveNoOpsPass", "RemoveUnusedPass", "default_passes", "model_tensorrt_incompatibilities",
    "tensorrt_incompatibilities",
]
