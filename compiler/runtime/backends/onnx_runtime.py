"""ONNX Runtime: the engine's ONNX graph on the CPU execution provider, or on CUDA with I/O binding.

A predictor is `predict(tiles [B, C, *patch]) -> logits [B, K, *patch]` on one device. The CPU
adapter takes and returns numpy arrays (the CPU runtime needs no torch); the GPU adapter binds torch
CUDA tensors to the session (I/O binding), so tiles and logits never leave the GPU (torch is
imported there, only then).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nnslim.cache import private_folder
from nnslim.errors import EngineError

if TYPE_CHECKING:
    from nnslim.compiler.runtime.backends import OpenRequest

logger = logging.getLogger(__name__)


def open_session(model_path: str | Path, providers: list, threads: int = 0, where: str = "",
                 model_bytes: bytes | None = None) -> object:
    """An ONNX Runtime session with all graph optimizations, from `model_bytes` when given (the
    verified bytes: the path is not opened again), else from the path; load failures become EngineError."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model_bytes if model_bytes is not None else str(model_path), options,
                                    providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types per failure
        raise EngineError(f"ONNX Runtime cannot load {model_path}{where}: {exc}") from exc


class OnnxRuntimePredictor:
    """An ONNX Runtime session on the CPU execution provider (`OnnxRuntimeGpuPredictor` for CUDA).

    Args:
        model_path: the ONNX file.
        input_name / output_name: graph I/O names (from the manifest).
        threads: intra-op threads (0: ONNX Runtime's default, one per core).
        model_bytes: the model's verified bytes (None: read `model_path`).
    """

    def __init__(
        self,
        model_path: str | Path,
        input_name: str = "image",
        output_name: str = "logits",
        threads: int = 0,
        providers: list[str] | None = None,
        model_bytes: bytes | None = None,
    ) -> None:
        self.session = open_session(model_path, providers or ["CPUExecutionProvider"], threads,
                                    model_bytes=model_bytes)
        names = [i.name for i in self.session.get_inputs()]
        if input_name not in names:
            raise EngineError(f"{model_path} has inputs {names}, expected {input_name!r}")
        self.input_name, self.output_name = input_name, output_name
        self.device = "cpu"
        self.providers = self.session.get_providers()
        logger.debug("ONNX Runtime session on %s", self.providers)

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        """numpy in, numpy out (a torch CPU tensor is read without a copy)."""
        (out,) = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(tiles, dtype=np.float32)})
        return out

    def close(self) -> None:
        """Release the session (ONNX Runtime sessions are safe to call from many threads until then)."""
        self.session = None


class OnnxRuntimeGpuPredictor:
    """ONNX Runtime on the GPU: CUDA execution provider (optionally TensorRT's first) with I/O binding.

    Inputs and outputs are torch CUDA tensors bound by address, so nothing is copied through the
    host. With `tensorrt=True` the TensorRT execution provider builds its own engines, cached in
    `cache_dir` (its engine and timing caches), and falls back to CUDA for unsupported nodes.

    ONNX Runtime lists the CUDA provider as available whenever the wheel has it, and when the
    provider then fails to load (CUDA or cuDNN libraries missing, wrong CUDA major, no driver) it
    quietly runs the session on the CPU. The providers the session really got are checked after
    it is created, and a session without every requested GPU provider is refused.
    """

    def __init__(
        self,
        model_path: str | Path,
        input_name: str = "image",
        output_name: str = "logits",
        device: int = 0,
        tensorrt: bool = False,
        cache_dir: Path | None = None,
        fp16: bool = False,
        model_bytes: bytes | None = None,
    ) -> None:
        import onnxruntime as ort
        import torch

        self.torch = torch
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available or not torch.cuda.is_available():
            raise EngineError(
                f"ONNX Runtime on the GPU needs onnxruntime-gpu with CUDA and a visible GPU; providers here: {available}"
            )
        providers: list = [("CUDAExecutionProvider", {"device_id": device})]
        if tensorrt:
            # the provider's engine cache is ONNX Runtime's and is not hash-checked: keep it in a private folder, or off
            cache = Path(cache_dir) if cache_dir else private_folder("ort-tensorrt")
            cached = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                      "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache)} if cache else {}
            providers.insert(0, ("TensorrtExecutionProvider", {"device_id": device, "trt_fp16_enable": fp16,
                                                               **cached}))
        self.session = open_session(model_path, providers, where=" on the GPU", model_bytes=model_bytes)
        self.providers = self.session.get_providers()
        self._refuse_fallback(model_path, [name for name, _ in providers], self.providers)
        self.input_name, self.output_name = input_name, output_name
        self.device = torch.device("cuda", device)
        output = next(o for o in self.session.get_outputs() if o.name == output_name)
        self.output_channels_and_patch = tuple(output.shape[1:])
        self.output_dtype = torch.float16 if "float16" in output.type else torch.float32

    def __call__(self, tiles):
        torch = self.torch
        tiles = torch.as_tensor(tiles).to(self.device, torch.float32, non_blocking=True).contiguous()
        out = torch.empty((tiles.shape[0], *self.output_channels_and_patch), dtype=self.output_dtype, device=self.device)
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cuda", self.device.index, np.float32, tuple(tiles.shape), tiles.data_ptr())
        binding.bind_output(self.output_name, "cuda", self.device.index,
                            np.float16 if self.output_dtype == torch.float16 else np.float32,
                            tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # ORT runs on its own stream
        self.session.run_with_iobinding(binding)
        return out

    def close(self) -> None:
        """Release the session and the GPU memory it holds."""
        self.session = None

    @staticmethod
    def _refuse_fallback(model_path: str | Path, requested: list[str], active: list[str]) -> None:
        """EngineError when ONNX Runtime dropped a requested GPU provider (it falls back silently)."""
        missing = [name for name in requested if name not in active]
        if not missing:
            return
        import onnxruntime as ort

        cuda = getattr(getattr(ort.capi, "build_and_package_info", None), "cuda_version", "?")
        needs = ("the TensorRT libraries its TensorRT provider links (libnvinfer.so.10 for onnxruntime-gpu 1.31), "
                 if "TensorrtExecutionProvider" in missing else "")
        raise EngineError(
            f"ONNX Runtime {ort.__version__} could not start {missing} for {model_path}: the session would run on "
            f"{active}. This onnxruntime-gpu is built for CUDA {cuda}; it needs {needs}that CUDA major's runtime, cuBLAS "
            f"and cuDNN 9 libraries and a driver that supports it (pip install 'nnslim[tensorrt-cu13]' installs a "
            f"matching set; ONNX Runtime's log above names the library it could not load); or use --device cpu"
        )


def open_cpu(request: OpenRequest) -> OnnxRuntimePredictor:
    return OnnxRuntimePredictor(request.model_path, request.input_name, request.output_name, threads=request.threads,
                                model_bytes=request.model_bytes)


def open_cuda(request: OpenRequest) -> OnnxRuntimeGpuPredictor:
    return OnnxRuntimeGpuPredictor(request.model_path, request.input_name, request.output_name,
                                   tensorrt=request.ort_tensorrt, fp16=request.precision == "fp16",
                                   model_bytes=request.model_bytes)
