"""TensorRT: the one module that imports `tensorrt` (lazily).

Building plans and running them arrive with the TensorRT issue; until then this module only
tells whether TensorRT can be used here and says how to get it when it cannot.
"""

from __future__ import annotations

from types import ModuleType

from compiler.runtime.errors import NnslimError


class BackendUnavailable(NnslimError):
    """The requested backend cannot run on this machine."""


def import_tensorrt() -> ModuleType:
    try:
        import tensorrt  # noqa: PLC0415 - optional dependency, imported only when asked for
    except ImportError as exc:
        raise BackendUnavailable(
            "backend 'tensorrt' needs the TensorRT Python package and an NVIDIA GPU: "
            "pip install 'nnslim[tensorrt]'; or use --backend onnxruntime"
        ) from exc
    return tensorrt


def tensorrt_available() -> bool:
    try:
        import_tensorrt()
    except BackendUnavailable:
        return False
    import torch

    return torch.cuda.is_available()
