"""Predictor adapters: `predict(tiles [B, C, *patch]) -> logits [B, K, *patch]` on one device.

Tiles and logits are torch tensors. The ONNX Runtime CPU adapter shares memory with numpy (no
copies); TensorRT lives in its own module (`compiler.tensorrt_engine`), imported lazily.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compiler.runtime.errors import EngineError

logger = logging.getLogger(__name__)


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


class OnnxRuntimePredictor:
    """An ONNX Runtime session on the CPU execution provider (GPU providers: issue #6 adapters).

    Args:
        model_path: the ONNX file.
        input_name / output_name: graph I/O names (from the manifest).
        threads: intra-op threads (0: ONNX Runtime's default, one per core).
    """

    def __init__(
        self,
        model_path: str | Path,
        input_name: str = "image",
        output_name: str = "logits",
        threads: int = 0,
        providers: list[str] | None = None,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        providers = providers or ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types per failure
            raise EngineError(f"ONNX Runtime cannot load {model_path}: {exc}") from exc
        names = [i.name for i in self.session.get_inputs()]
        if input_name not in names:
            raise EngineError(f"{model_path} has inputs {names}, expected {input_name!r}")
        self.input_name, self.output_name = input_name, output_name
        self.device = torch.device("cpu")
        self.providers = self.session.get_providers()
        logger.debug("ONNX Runtime session on %s", self.providers)

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(tiles.detach().cpu().numpy(), dtype=np.float32)
        (out,) = self.session.run([self.output_name], {self.input_name: array})
        return torch.from_numpy(out)
