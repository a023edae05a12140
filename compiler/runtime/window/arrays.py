"""The window's arrays: numpy on the CPU, torch tensors on a GPU, through one small namespace.

The sliding window, its accumulators and the postprocessing are written once against `Arrays`:
`arrays_for(device)` is numpy's for a CPU predictor (the CPU runtime never imports torch) and
torch's for a CUDA device (the image, tiles and accumulators stay device tensors; torch is
imported then, and only then). The two share most of what the window does as plain operators and
methods (`+`, `*`, `/`, comparisons, indexing and in-place `+=`, `.sum()`, `.any()`, `.argmax(0)`,
`.shape`); `Arrays` holds the dozen operations whose spelling differs, plus what only a GPU
needs: host memory that is pinned, and falling back to it when the device is full.

Why not the array API standard through `array-api-compat` (what scipy and scikit-learn use): it
would cover the same dozen operations, but importing its numpy namespace takes about 0.17 s here,
a third of the lean runtime's start-up budget, and the GPU fallbacks would still be written by hand.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)

DTYPES = ("float32", "float16")  # what accumulators are kept in


TORCH_CPU = "torch-cpu"  # torch tensors on the CPU: how the runtime computed before numpy (the numerics tests)


def device_of(predictor: Any) -> str:
    """A predictor's device as a string: "cpu" (numpy arrays), "cuda:N", or "torch-cpu" for a
    predictor that declares a `torch.device("cpu")` (it takes torch tensors on the host)."""
    device = getattr(predictor, "device", "cpu")
    if not isinstance(device, str) and str(device) == "cpu":
        return TORCH_CPU
    device = str(device)
    return "cuda:0" if device == "cuda" else device


def arrays_for(device: str) -> NumpyArrays | TorchArrays:
    """The namespace for arrays that live on `device`."""
    if device == "cpu":
        return NumpyArrays()
    return TorchArrays("cpu" if device == TORCH_CPU else device)


def to_numpy(x: Any) -> np.ndarray:
    """A host numpy array of `x` (a numpy array as it is; a tensor copied from its device)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def itemsize(dtype: str) -> int:
    return np.dtype(dtype).itemsize


class NumpyArrays:
    """numpy, on the host."""

    device = "cpu"

    def asarray(self, x: Any, dtype: str | None = None) -> np.ndarray:
        """`x` as a numpy array (a tensor on the host is shared, not copied)."""
        x = to_numpy(x)
        return x if dtype is None or x.dtype == dtype else x.astype(dtype)

    def zeros(self, shape: Sequence[int], dtype: str = "float32") -> np.ndarray:
        return np.zeros(tuple(shape), dtype=dtype)

    def zeros_like(self, x: np.ndarray) -> np.ndarray:
        return np.zeros_like(x)

    def zeros_beside(self, shape: Sequence[int], like: np.ndarray) -> np.ndarray:
        return np.zeros(tuple(shape), dtype=like.dtype)

    def stack(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack(arrays)

    def add_weighted(self, total: np.ndarray, x: np.ndarray, weight: np.ndarray, scratch: dict) -> None:
        """`total += x * weight` over the leading axis of `x`, without a temporary the size of `x`:
        each class is multiplied into one reused buffer and added (fresh 10 MB temporaries per tile
        cost page faults; a reused buffer stays in memory)."""
        dtype = np.result_type(x, weight)
        buffer = scratch.get((weight.shape, dtype))
        if buffer is None:
            buffer = scratch[(weight.shape, dtype)] = np.empty(weight.shape, dtype=dtype)
        for part, into in zip(x, total):
            np.multiply(part, weight, out=buffer)
            into += buffer

    def concat(self, arrays: Sequence[np.ndarray], axis: int) -> np.ndarray:
        return np.concatenate(arrays, axis=axis)

    def flip(self, x: np.ndarray, axes: Sequence[int]) -> np.ndarray:
        return np.flip(x, axis=tuple(axes))

    def permute(self, x: np.ndarray, axes: Sequence[int]) -> np.ndarray:
        return np.transpose(x, tuple(axes))

    def where(self, condition: np.ndarray, x: Any, y: Any) -> np.ndarray:
        return np.where(condition, x, y)

    def astype(self, x: np.ndarray, dtype: str) -> np.ndarray:
        return x if x.dtype == dtype else x.astype(dtype)

    def exp(self, x: np.ndarray) -> np.ndarray:
        return np.exp(x)

    def dtype_name(self, x: np.ndarray) -> str:
        return str(x.dtype)

    def place(self, x: Any, what: str) -> np.ndarray:
        return self.asarray(x)

    def to_device(self, x: np.ndarray) -> np.ndarray:
        return x

    def beside(self, x: np.ndarray, other: np.ndarray) -> np.ndarray:
        return x

    def zeros_or_host(self, shape: Sequence[int], dtype: str, what: str) -> np.ndarray:
        return self.zeros(shape, dtype)


class TorchArrays:
    """torch tensors on a CUDA device; host tensors (pinned) where the device cannot hold them."""

    def __init__(self, device: str) -> None:
        import torch  # the GPU path's array library, imported only here

        self.torch = torch
        self.device = torch.device(device)

    def asarray(self, x: Any, dtype: str | None = None) -> Any:
        torch = self.torch
        x = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
        return x if dtype is None else x.to(getattr(torch, dtype))

    def zeros(self, shape: Sequence[int], dtype: str = "float32") -> Any:
        return self.torch.zeros(tuple(shape), dtype=getattr(self.torch, dtype), device=self.device)

    def zeros_like(self, x: Any) -> Any:
        return self.torch.zeros_like(x)

    def zeros_beside(self, shape: Sequence[int], like: Any) -> Any:
        """Zeros of `like`'s dtype where `like` is (the device, or pinned host memory after a fallback)."""
        return self.torch.zeros(tuple(shape), dtype=like.dtype, device=like.device)

    def stack(self, arrays: Sequence[Any]) -> Any:
        return self.torch.stack(list(arrays))

    def add_weighted(self, total: Any, x: Any, weight: Any, scratch: dict) -> None:
        """`total += x * weight` in place (one fused kernel on the device)."""
        total.addcmul_(x, weight)

    def concat(self, arrays: Sequence[Any], axis: int) -> Any:
        return self.torch.cat(list(arrays), dim=axis)

    def flip(self, x: Any, axes: Sequence[int]) -> Any:
        return self.torch.flip(x, list(axes))

    def permute(self, x: Any, axes: Sequence[int]) -> Any:
        return x.permute(*axes)

    def where(self, condition: Any, x: Any, y: Any) -> Any:
        return self.torch.where(condition, x, y)

    def astype(self, x: Any, dtype: str) -> Any:
        return x.to(getattr(self.torch, dtype))

    def exp(self, x: Any) -> Any:
        return self.torch.exp(x)

    def dtype_name(self, x: Any) -> str:
        return str(x.dtype).removeprefix("torch.")

    def place(self, x: Any, what: str) -> Any:
        """`x` on the device; if the device cannot hold it, in pinned host memory (tiles are then
        copied over one batch at a time, without blocking the host: `to_device`)."""
        x = self.asarray(x)
        if x.device == self.device:
            return x
        try:
            return x.to(self.device)
        except self.torch.OutOfMemoryError:
            logger.warning("not enough GPU memory for %s %s; keeping it in pinned host memory", what, tuple(x.shape))
            self.torch.cuda.empty_cache()
            return x.cpu().pin_memory()

    def to_device(self, x: Any) -> Any:
        """A batch of tiles on the device (from pinned host memory, non-blocking)."""
        if x.device == self.device:
            return x
        return x.pin_memory().to(self.device, non_blocking=True)

    def beside(self, x: Any, other: Any) -> Any:
        """`x` where `other` is (the device, or the host after a fallback)."""
        return x if x.device == other.device else x.to(other.device)

    def zeros_or_host(self, shape: Sequence[int], dtype: str, what: str) -> Any:
        """Zeros on the device, or on the host when the device is full (nnU-Net's fallback)."""
        try:
            return self.zeros(shape, dtype)
        except self.torch.OutOfMemoryError:
            logger.warning("not enough GPU memory for %s; keeping them on the CPU", what)
            self.torch.cuda.empty_cache()
            return self.torch.zeros(tuple(shape), dtype=getattr(self.torch, dtype))
