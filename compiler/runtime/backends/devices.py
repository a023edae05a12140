"""`--device auto`: the GPU when the engine's backend can use one here, else the CPU.

The decision is a pure function of what the engine offers and what this machine has
(`pick_device`), so it is testable with explicit inputs; `detect_device` gathers those facts from
the backends table: a backend runs on the GPU itself (device "cuda") or through its GPU twin (the
same graph on ONNX Runtime's CUDA provider), and that GPU backend must be available here.
"""

from __future__ import annotations

from typing import Collection, Sequence

from nnslim.compiler.runtime.backends import BACKENDS, gpu_visible

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def gpu_form(backend: str) -> str | None:
    """The backend that runs `backend`'s model on the GPU: itself, its GPU twin, or None."""
    entry = BACKENDS.get(backend)
    if entry is None:
        return None
    return backend if entry.device == "cuda" else entry.gpu_twin


def pick_device(backends: Sequence[str], visible: bool, ready: Collection[str]) -> tuple[str, str]:
    """The device for an engine that can run on `backends` (its checked choices, best first).

    Args:
        backends: backend names from the engine's manifest (e.g. "openvino", "onnxruntime").
        visible: whether a CUDA GPU is visible (`backends.gpu_visible`).
        ready: the GPU backends that can run here (`Backend.available()` of each "cuda" entry).

    Returns:
        `("cuda" | "cpu", why)`.
    """
    if not visible:
        return "cpu", "no CUDA GPU is visible"
    forms = [(b, gpu_form(b)) for b in backends]
    for backend, gpu in forms:
        if gpu is not None and gpu in ready:
            return "cuda", f"a CUDA GPU is visible and {gpu} can run the engine's {backend} model"
    missing = sorted({gpu for _, gpu in forms if gpu is not None})
    if missing:
        return "cpu", f"{', '.join(missing)} cannot run here (not installed, or no CUDA provider)"
    return "cpu", f"the engine's backends ({', '.join(backends)}) have no GPU runtime"


def detect_device(backends: Sequence[str]) -> tuple[str, str]:
    """`pick_device` with this machine's facts."""
    visible = gpu_visible()
    ready = {b.name for b in BACKENDS.values() if b.device == "cuda" and visible and b.available()}
    return pick_device(backends, visible, ready)
