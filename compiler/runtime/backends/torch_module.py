"""PyTorch: the reference every backend is checked against. It runs a module, not an engine file
(`infer --torch-checkpoint`, the build's parity checks)."""

from __future__ import annotations

import torch
from torch import nn


class TorchPredictor:
    """Runs a PyTorch module in eval mode without autograd."""

    def __init__(self, module: nn.Module, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        out = self.module(tiles.to(self.device))
        if isinstance(out, (list, tuple)):  # deep supervision left on: keep full resolution
            out = out[0]
        return out
