"""Backends as data: the one table of what can run an engine, on which device, in which precisions.

Each `Backend` record says whether it is available here, which precisions it runs on this
machine, how it opens a model file as a `predict(tiles) -> logits` callable, what kind of model it
reads (an ONNX graph, or a compiled artifact such as a TensorRT plan, and so how Triton serves
it), and, for a compiled artifact, the build hook that makes one. The CLI's choices, the build's
candidates, the runtime's choice and fallback (`choice`), `--device auto` (`devices`) and the
Triton export all read this table; adding a backend is its adapter module plus one entry here.

Importing this module imports no inference library and no torch: availability and adapters are
looked up when called.
"""

from __future__ import annotations

import importlib
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterator, TypeVar

from nnslim.errors import EngineError, InputError
from nnslim.extras import installed

if TYPE_CHECKING:
    from nnslim.compiler.runtime.manifest import EngineManifest
    from nnslim.compiler.runtime.window.config import Predictor


@dataclass(frozen=True)
class ModelKind:
    """What a backend reads, and how a Triton Inference Server serves that kind of file.

    Attributes:
        name: "onnx" (an ONNX graph of the engine) or "plan" (an artifact compiled for one GPU).
        triton_platform: Triton's `platform` for it.
        triton_file: the file name Triton expects in a model version folder.
    """

    name: str
    triton_platform: str
    triton_file: str


MODEL_KINDS = {k.name: k for k in (ModelKind("onnx", "onnxruntime_onnx", "model.onnx"),
                                   ModelKind("plan", "tensorrt_plan", "model.plan"))}


@dataclass(frozen=True)
class OpenRequest:
    """What a backend needs to open a model.

    Attributes:
        model_path: the engine's model file for the precision (ONNX graph or compiled artifact).
        precision: a name from `nnslim.compiler.runtime.precision.PRECISIONS`.
        threads: CPU threads (0: the backend's default).
        ort_tensorrt: ONNX Runtime CUDA only: put its TensorRT execution provider first.
        manifest: the engine's manifest, for backends whose artifact must match this machine.
        model_bytes: the bytes of `model_path` that were checked against the manifest's sha256; a
            backend hands these to its library (never the path again), so a file swapped after
            the check cannot run. None: the backend reads the path (build-time candidates, and
            models with external-data files, which their libraries resolve by path).
    """

    model_path: Path
    input_name: str = "image"
    output_name: str = "logits"
    precision: str = "fp32"
    threads: int = 0
    ort_tensorrt: bool = False
    manifest: EngineManifest | None = None
    model_bytes: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Backend:
    """One way of running an engine.

    Attributes:
        name: as written in manifests and on the command line.
        device: "cpu" or "cuda".
        model: the key of its `ModelKind` in `MODEL_KINDS`.
        available: whether it can run on this machine now.
        precisions: the precisions it runs on this machine.
        open: opens a model as a predictor.
        gpu_twin: the backend that runs the same model file on the GPU (`--device cuda`).
        build: for a compiled artifact, the build hook module that compiles it (`check` and `build`,
            see `nnslim.compiler.stages.artifacts`); the runtime never imports it.
        triton_accelerator: Triton's CPU execution accelerator for this backend's ONNX graph.
    """

    name: str
    device: str
    model: str
    available: Callable[[], bool]
    precisions: Callable[[], tuple[str, ...]]
    open: Callable[[OpenRequest], Predictor]
    gpu_twin: str | None = None
    build: str | None = None
    triton_accelerator: str | None = None

    @property
    def kind(self) -> ModelKind:
        return MODEL_KINDS[self.model]


# where an NVIDIA driver shows its GPUs (Linux; WSL's /dev/dxg); without one, torch is not imported to ask
_GPU_NODES = ("/proc/driver/nvidia/gpus", "/dev/nvidia0", "/dev/dxg")


def gpu_visible() -> bool:
    """A CUDA GPU this process may use: a driver's device node, not hidden by CUDA_VISIBLE_DEVICES,
    and torch (the GPU path's array library) seeing it. On a machine without a GPU this costs no
    torch import (about 2 s)."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return False
    if not any(os.path.exists(node) for node in _GPU_NODES) or not installed("torch"):
        return False
    import torch

    return torch.cuda.is_available()


def _onnxruntime_cuda() -> bool:
    """onnxruntime-gpu with its CUDA provider, and a visible GPU (the provider is listed without one)."""
    if not (installed("onnxruntime") and gpu_visible()):
        return False
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _adapter(module: str, function: str) -> Callable[..., Any]:
    """A function of an adapter module, imported on first call (the table stays import-free)."""

    def call(*args: Any) -> Any:
        return getattr(importlib.import_module(f"{__name__}.{module}"), function)(*args)

    call.__name__ = function
    return call


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("onnxruntime", "cpu", "onnx", lambda: installed("onnxruntime"), lambda: ("fp32", "fp16", "int8"),
                _adapter("onnx_runtime", "open_cpu"), gpu_twin="onnxruntime-cuda"),
        Backend("onnxruntime-cuda", "cuda", "onnx", _onnxruntime_cuda, lambda: ("fp32", "fp16"),
                _adapter("onnx_runtime", "open_cuda")),
        Backend("openvino", "cpu", "onnx", lambda: installed("openvino"), _adapter("openvino_cpu", "precisions"),
                _adapter("openvino_cpu", "open_cpu"), triton_accelerator="openvino"),
        # int8: a plan built from the Q/DQ graph (explicit quantization, TensorRT 10 and 11)
        Backend("tensorrt", "cuda", "plan", _adapter("tensorrt_plan", "tensorrt_available"),
                lambda: ("fp32", "fp16", "int8"), _adapter("tensorrt_plan", "open_plan"),
                build="nnslim.compiler.stages.tensorrt_builder"),
    )
}


T = TypeVar("T")


class Pool(Generic[T]):
    """One `make()` per concurrent caller, for library objects that serve one call at a time (an
    OpenVINO infer request, a TensorRT execution context and its stream): a call takes an idle one,
    or makes one when all are busy, and gives it back. One thread keeps reusing one; N threads at
    once end with N. `clear()` drops the idle ones (closing)."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make, self._idle, self._lock = make, [make()], threading.Lock()

    @contextmanager
    def take(self) -> Iterator[T]:
        with self._lock:
            item = self._idle.pop() if self._idle else None
        if item is None:
            item = self._make()
        try:
            yield item
        finally:
            with self._lock:
                self._idle.append(item)

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise InputError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}") from None


def runs(backend: str, precision: str) -> bool:
    """Whether `backend` is available here and runs `precision` on this machine."""
    entry = get_backend(backend)
    return entry.available() and precision in entry.precisions()


def open_predictor(backend: str, request: OpenRequest) -> Predictor:
    entry = get_backend(backend)
    if not entry.available():
        raise EngineError(f"backend {backend!r} is not available on this machine")
    if request.precision not in entry.precisions():
        raise EngineError(f"backend {backend!r} does not run {request.precision} on this machine "
                          f"(it runs {', '.join(entry.precisions())})")
    return entry.open(request)
