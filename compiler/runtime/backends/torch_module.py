"""PyTorch: the reference every backend is checked against. It runs a module, not an engine file
(`infer --torch-checkpoint`, the build's parity checks). It needs the `build` extra (torch)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


class TorchPredictor:
    """Runs a PyTorch module in eval mode without autograd.

    On the CPU it takes and returns numpy arrays like the other CPU predictors (torch tensors are
    taken too); on a GPU, torch tensors on its device.
    """

    def __init__(self, module: nn.Module, device: torch.device | str = "cpu") -> None:
        self.torch_device = torch.device(device)
        self.device = "cpu" if self.torch_device.type == "cpu" else str(self.torch_device)
        self.module = module.to(self.torch_device).eval()
        self.dtype = next((p.dtype for p in self.module.parameters()), torch.float32)  # tiles are cast to it

    @torch.inference_mode()
    def __call__(self, tiles: Any) -> Any:
        host = isinstance(tiles, np.ndarray)
        tiles = torch.from_numpy(np.ascontiguousarray(tiles)) if host else tiles  # flipped views have negative strides
        out = self.module(tiles.to(self.torch_device, self.dtype))
        if isinstance(out, (list, tuple)):  # deep supervision left on: keep full resolution
            out = out[0]
        return out.numpy() if host else out
