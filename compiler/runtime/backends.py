"""Backends as data: one table of what can run an engine, on which device, in which precisions.

Each entry says whether it is available here, which precisions it runs on this machine, and how it
opens a model file as a `predict(tiles) -> logits` callable. The build side (candidates, parity,
Triton) and the runtime (`load_engine`) read this table; adding a backend is one entry plus its
adapter module.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from nnslim.compiler.runtime.errors import EngineError, InputError

Predictor = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class OpenRequest:
    """What a backend needs to open a model.

    Attributes:
        model_path: the engine's model file for the precision (ONNX graph or TensorRT plan).
        precision: a name from `nnslim.compiler.runtime.precision.PRECISIONS`.
        threads: CPU threads (0: the backend's default).
        ort_tensorrt: ONNX Runtime CUDA only: put its TensorRT execution provider first.
    """

    model_path: Path
    input_name: str = "image"
    output_name: str = "logits"
    precision: str = "fp32"
    threads: int = 0
    ort_tensorrt: bool = False


@dataclass(frozen=True)
class Backend:
    """One way of running an engine.

    Attributes:
        name: as written in manifests and on the command line.
        device: "cpu" or "cuda".
        model: what it reads: "onnx" or "plan" (a TensorRT plan built for one GPU).
        available: whether it can run on this machine now.
        precisions: the precisions it runs on this machine.
        open: opens a model as a predictor.
    """

    name: str
    device: str
    model: str
    available: Callable[[], bool]
    precisions: Callable[[], tuple[str, ...]]
    open: Callable[[OpenRequest], Predictor]


def cache_root() -> Path:
    """nnslim's cache folder: $NNSLIM_CACHE, else ~/.cache/nnslim."""
    return Path(os.environ.get("NNSLIM_CACHE") or Path.home() / ".cache" / "nnslim")


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _cuda() -> bool:
    return torch.cuda.is_available()


def _open_onnxruntime(request: OpenRequest) -> Predictor:
    from nnslim.compiler.runtime.predictors import OnnxRuntimePredictor

    return OnnxRuntimePredictor(request.model_path, request.input_name, request.output_name, threads=request.threads)


def _open_onnxruntime_cuda(request: OpenRequest) -> Predictor:
    from nnslim.compiler.runtime.predictors import OnnxRuntimeGpuPredictor

    return OnnxRuntimeGpuPredictor(request.model_path, request.input_name, request.output_name,
                                   tensorrt=request.ort_tensorrt, fp16=request.precision == "fp16")


def _openvino_precisions() -> tuple[str, ...]:
    from nnslim.compiler.runtime.openvino_backend import cpu_has_bf16

    return ("fp32", "bf16", "int8") if cpu_has_bf16() else ("fp32", "int8")


def _open_openvino(request: OpenRequest) -> Predictor:
    from nnslim.compiler.runtime.manifest import sha256_file
    from nnslim.compiler.runtime.openvino_backend import OpenVinoPredictor

    cache = cache_root() / "openvino" / sha256_file(Path(request.model_path))[:16]
    return OpenVinoPredictor(request.model_path, request.input_name, request.output_name,
                             precision=request.precision, threads=request.threads, cache_dir=cache)


def _tensorrt_available() -> bool:
    from nnslim.compiler.runtime.tensorrt_runtime import tensorrt_available

    return tensorrt_available()


def _open_tensorrt(request: OpenRequest) -> Predictor:
    from nnslim.compiler.runtime.tensorrt_runtime import TensorRTPredictor

    return TensorRTPredictor(request.model_path, request.input_name, request.output_name)


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("onnxruntime", "cpu", "onnx", lambda: _has("onnxruntime"), lambda: ("fp32", "fp16", "int8"),
                _open_onnxruntime),
        Backend("onnxruntime-cuda", "cuda", "onnx", lambda: _has("onnxruntime") and _cuda(), lambda: ("fp32", "fp16"),
                _open_onnxruntime_cuda),
        Backend("openvino", "cpu", "onnx", lambda: _has("openvino"), _openvino_precisions, _open_openvino),
        # int8: a plan built from the Q/DQ graph (explicit quantization, TensorRT 10 and 11)
        Backend("tensorrt", "cuda", "plan", _tensorrt_available, lambda: ("fp32", "fp16", "int8"), _open_tensorrt),
    )
}

# PyTorch is the reference every backend is checked against; it runs a module, not an engine file
# (`nnslim.compiler.runtime.predictors.TorchPredictor`, `infer --torch-checkpoint`).
REFERENCE = "torch"


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


@dataclass(frozen=True)
class RuntimeChoice:
    """One way to run an engine that its build checked: backend, precision and the model file."""

    backend: str
    precision: str
    model: str
    checked: bool = True  # False: the user asked for a combination the build did not time or gate

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision}"


def runtime_choices(manifest: dict) -> list[RuntimeChoice]:
    """The engine's checked choices, best first: the build's passing candidates fastest first (engines
    built with `--precision auto`), or the one backend an older or explicit build recorded."""
    chosen = RuntimeChoice(manifest["backend"], manifest.get("precision") or "fp32", manifest["runtime_model"])
    selection = manifest.get("selection") or {}
    others = [RuntimeChoice(c["backend"], c["precision"], c["model"])
              for c in selection.get("candidates", []) if c.get("passed")]
    return [chosen, *[c for c in others if (c.backend, c.precision) != (chosen.backend, chosen.precision)]]


def resolve_runtime(manifest: dict, backend: str | None = None, precision: str | None = None,
                    device: str = "cpu") -> tuple[RuntimeChoice, str | None]:
    """Pick how to run an engine here: the recorded choice, the user's override, or the next checked
    choice that this machine can run. Returns the choice and a note when it is a fallback."""
    choices = runtime_choices(manifest)
    if device == "cuda":  # the ONNX graphs checked on the CPU run on ONNX Runtime's CUDA provider
        choices = [RuntimeChoice("onnxruntime-cuda", c.precision, c.model) if c.backend == "onnxruntime" else c
                   for c in choices]
        choices = [c for c in choices if c.backend not in BACKENDS or BACKENDS[c.backend].device == "cuda"]
        backend = "onnxruntime-cuda" if backend == "onnxruntime" else backend
    wanted = [c for c in choices if backend in (None, c.backend) and precision in (None, c.precision)]
    if not wanted and backend is not None and precision in (None, "fp32") and get_backend(backend).model == "onnx":
        fp32 = next((c for c in choices if c.precision == "fp32" and c.model.endswith(".onnx")), None)
        if fp32 is not None:  # the same fp32 graph on another ONNX backend: allowed, said to be unchecked
            wanted = [RuntimeChoice(backend, "fp32", fp32.model, checked=False)]
    if not wanted:
        raise EngineError(f"the engine was not built for {backend or 'any backend'} {precision or ''}; it offers "
                          f"{', '.join(c.label for c in choices)}; rebuild with --backend/--precision to add it")
    reasons = []
    for choice in wanted:
        entry = BACKENDS.get(choice.backend)
        if entry is None:  # recorded by a newer nnslim
            reasons.append(f"{choice.label}: backend unknown to this nnslim (a newer version built the engine)")
        elif not entry.available():
            reasons.append(f"{choice.label}: backend not available here")
        elif choice.precision not in entry.precisions():
            reasons.append(f"{choice.label}: this machine cannot run {choice.precision} on {choice.backend}")
        else:
            note = None
            if reasons:
                note = f"falling back to {choice.label} ({'; '.join(reasons)})"
            elif not choice.checked:
                note = f"running {choice.label}, which the build did not check against PyTorch"
            return choice, note
    raise EngineError("no recorded way of running this engine works here: " + "; ".join(reasons))
