"""ONNX graph passes (the only package that imports onnx_graphsurgeon).

`default_passes()` is the one ordered pipeline build-engine runs between export and the engine's
graphs (it gives `model.opt.onnx`, the optimized fp32 graph); see `base` for the pass interface
and the manager. The fp16 graph is made from that one by `fp16.float16_graph`, the fp16
precision's producer.
"""

from __future__ import annotations

from nnslim.compiler.stages.passes.base import GraphPass, ParityProbe, PassError, PassManager, PassRecord, PassResult
from nnslim.compiler.stages.passes.fp16 import ConvertToFloat16Pass
from nnslim.compiler.stages.passes.rewrites import (
    FoldBatchNormIntoConvPass,
    FoldConstantsPass,
    MakeBatchDynamicPass,
    RemoveNoOpsPass,
    RemoveUnusedPass,
)
from nnslim.compiler.stages.passes.tensorrt_support import (
    CheckTensorRTCompatibilityPass,
    model_tensorrt_incompatibilities,
    tensorrt_incompatibilities,
)

def default_passes(strict_tensorrt: bool = False) -> tuple[GraphPass, ...]:
    """The build's pass list, in order.

    Args:
        strict_tensorrt: fail when a node is not TensorRT-compatible (for TensorRT builds).
    """
    return (
        FoldConstantsPass(),
        RemoveNoOpsPass(),
        FoldBatchNormIntoConvPass(),
        RemoveUnusedPass(),
        MakeBatchDynamicPass(),
        CheckTensorRTCompatibilityPass(strict=strict_tensorrt),
    )


__all__ = [
    "CheckTensorRTCompatibilityPass", "ConvertToFloat16Pass", "FoldBatchNormIntoConvPass", "FoldConstantsPass",
    "GraphPass", "MakeBatchDynamicPass", "ParityProbe", "PassError", "PassManager", "PassRecord", "PassResult",
    "RemoveNoOpsPass", "RemoveUnusedPass", "default_passes", "model_tensorrt_incompatibilities",
    "tensorrt_incompatibilities",
]
