"""`--device auto`: the GPU when the engine's backend can use one here, else the CPU.

The decision is a pure function of what the engine offers and what this machine has
(`pick_device`), so it is testable with explicit inputs; `detect_device` gathers those facts.
ONNX Runtime lists its CUDA provider whenever the wheel has it (also on a machine without a GPU),
so a visible CUDA GPU is required as well.
"""

from __future__ import annotations

import importlib.util
from typing import Sequence

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def pick_device(backends: Sequence[str], providers: Sequence[str], gpu_visible: bool,
                tensorrt_installed: bool = False) -> tuple[str, str]:
    """The device for an engine that can run on `backends` (its checked choices, best first).

    Args:
        backends: backend names from the engine's manifest (e.g. "openvino", "onnxruntime").
        providers: ONNX Runtime's available execution providers.
        gpu_visible: whether a CUDA GPU is visible (torch.cuda.is_available()).
        tensorrt_installed: whether nnslim's TensorRT backend can be imported.

    Returns:
        `("cuda" | "cpu", why)`.
    """
    if not gpu_visible:
        return "cpu", "no CUDA GPU is visible"
    if "onnxruntime" in backends and "CUDAExecutionProvider" in providers:
        return "cuda", "a CUDA GPU and ONNX Runtime's CUDA execution provider are available"
    if "tensorrt" in backends and tensorrt_installed:
        return "cuda", "the engine holds a TensorRT plan and TensorRT is installed"
    if "onnxruntime" in backends:
        return "cpu", f"ONNX Runtime here has no CUDA execution provider (providers: {', '.join(providers) or 'none'})"
    return "cpu", f"the engine's backends ({', '.join(backends)}) have no GPU runtime here"


def detect_device(backends: Sequence[str]) -> tuple[str, str]:
    """`pick_device` with this machine's facts."""
    import torch

    providers: list[str] = []
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        providers = list(onnxruntime.get_available_providers())
    tensorrt = False
    if "tensorrt" in backends:
        from nnslim.compiler.runtime.tensorrt_runtime import tensorrt_available

        tensorrt = tensorrt_available()
    return pick_device(backends, providers, torch.cuda.is_available(), tensorrt)
