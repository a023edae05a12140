"""TensorRT at run time: load a plan and run it. The one module that imports `tensorrt` (lazily).

Building plans is the build side's job (`nnslim.compiler.stages.tensorrt_builder`, which gets the
module from `import_tensorrt` here). Written against the TensorRT 10.x and 11.x Python API, and
checked against the real bindings of both by `tests/compiler/test_tensorrt_bindings.py`:

- Run: `Runtime.deserialize_cuda_engine`, name-based I/O (`num_io_tensors`, `get_tensor_name`,
  `get_tensor_mode`, `get_tensor_dtype`, `get_tensor_profile_shape`), `set_input_shape`,
  `set_tensor_address` on torch CUDA tensors and `execute_async_v3` on a dedicated CUDA stream.
- TensorRT objects are created through `create`, which turns the bindings' "factory function
  returned nullptr" (no usable GPU, a driver too old for the wheel's CUDA, mismatched libraries)
  into `BackendUnavailable` with what to check.

A plan runs only on the TensorRT version and GPU family it was built for; `check_compatibility`
compares the manifest's record with this machine before anything is deserialized.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable

from nnslim.errors import EngineError, NnslimError
from nnslim.extras import installed

if TYPE_CHECKING:
    from nnslim.compiler.runtime.backends import OpenRequest
    from nnslim.compiler.runtime.manifest import TensorRTRecord

logger = logging.getLogger(__name__)

INSTALL_HINT = ("pip install 'nnslim[tensorrt]' (the CUDA 13 set, driver 580 or newer; 'nnslim[tensorrt-cu12]' for a "
                "CUDA 12 driver) on a machine with an NVIDIA GPU; or use --backend onnxruntime")
NULL_FACTORY_HINT = (
    "check that `nvidia-smi` lists the GPU and CUDA_VISIBLE_DEVICES does not hide it, that the NVIDIA driver "
    "supports the CUDA major of the installed TensorRT wheel (tensorrt-cu13 needs driver 580 or newer, "
    "tensorrt-cu12 driver 525 or newer), and that the tensorrt-*-libs package has the same version as the "
    "bindings (pip list | grep -i tensorrt); TensorRT's own log lines above name the cause"
)


class BackendUnavailable(NnslimError):
    """The requested backend cannot run on this machine."""


def import_tensorrt() -> ModuleType:
    try:
        import tensorrt  # noqa: PLC0415 - optional dependency, imported only when asked for
    except ImportError as exc:
        raise BackendUnavailable(f"backend 'tensorrt' needs the TensorRT Python package: {INSTALL_HINT}") from exc
    return tensorrt


def tensorrt_available() -> bool:
    """TensorRT and torch installed (torch holds the device buffers) and a CUDA GPU visible."""
    from nnslim.compiler.runtime.backends import gpu_visible

    if not installed("tensorrt") or not gpu_visible():
        return False
    try:
        import_tensorrt()
    except BackendUnavailable:
        return False
    return True


def create(factory: Callable[..., Any], *args: Any) -> Any:
    """`factory(*args)` for a TensorRT class (`trt.Builder`, `trt.Runtime`, `trt.OnnxParser`).

    The bindings construct these through C factories (`createInferBuilder`, ...) that return NULL
    when TensorRT cannot start; pybind11 then raises a bare `TypeError`. That case becomes
    `BackendUnavailable` naming the object and what to check; any other TypeError is a bug and
    propagates unchanged.
    """
    try:
        return factory(*args)
    except TypeError as exc:
        if "returned nullptr" not in str(exc):
            raise
        name = getattr(factory, "__name__", repr(factory))
        raise BackendUnavailable(f"TensorRT could not create its {name} (the factory returned NULL): "
                                 f"{NULL_FACTORY_HINT}") from exc


def gpu_record(device: int = 0) -> dict[str, Any]:
    """Name and compute capability of a CUDA device (torch's view)."""
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return {"gpu": torch.cuda.get_device_name(device), "compute_capability": [major, minor]}


def check_compatibility(built: TensorRTRecord | None, tensorrt_version: str, compute_capability: tuple[int, int],
                        rebuild: str) -> None:
    """Refuse a plan built for another TensorRT version or GPU family (before deserializing it)."""
    version = built.version if built else None
    capability = list(built.compute_capability) if built else []
    if version != tensorrt_version:
        raise EngineError(
            f"the plan was built with TensorRT {version} but this machine has {tensorrt_version}; "
            f"plans only run on the version that built them; {rebuild}"
        )
    if capability != list(compute_capability):
        raise EngineError(
            f"the plan was built for a GPU of compute capability {capability or None} "
            f"({built.gpu if built else None}) but this GPU has {list(compute_capability)}; {rebuild}"
        )


def open_plan(request: OpenRequest) -> TensorRTPredictor:
    """The engine's plan on the GPU, after checking it was built for this TensorRT and GPU family
    (a request without a manifest is the build's own check of a plan it just made here)."""
    trt = import_tensorrt()
    manifest = request.manifest
    rebuild = manifest.rebuild_hint() if manifest is not None else "rebuild the engine on this machine"
    import torch

    if not torch.cuda.is_available():
        raise EngineError(f"{request.model_path} is a TensorRT plan, which needs a CUDA GPU; "
                          f"{rebuild} --backend onnxruntime")
    if manifest is not None:
        check_compatibility(manifest.tensorrt, trt.__version__, tuple(gpu_record()["compute_capability"]), rebuild)
    return TensorRTPredictor(request.model_path, request.input_name, request.output_name,
                             plan=request.model_bytes)



class TensorRTPredictor:
    """Runs a TensorRT plan on torch CUDA tensors: any batch from 1 to the profile's maximum.

    TensorRT runs on a stream of its own, not on torch's current stream: that is normally the
    legacy default stream, on which `execute_async_v3` forces extra device synchronisations.
    The two streams are ordered with `wait_stream` both ways, so to the caller the result behaves
    as if it had been computed on torch's current stream.
    """

    def __init__(self, plan_path: Path, input_name: str, output_name: str, device: int = 0,
                 plan: bytes | None = None) -> None:
        """`plan`: the plan's verified bytes (None: read `plan_path`)."""
        import torch

        trt = import_tensorrt()
        self.torch = torch
        self.device = torch.device("cuda", device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = create(trt.Runtime, self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(
                plan if plan is not None else Path(plan_path).read_bytes())
            if self.engine is None:
                raise EngineError(f"TensorRT cannot deserialize {plan_path}; rebuild the engine on this machine")
            # one execution context and stream per concurrent call, made when all are busy (written
            # out rather than `backends.Pool`, so the TensorRT bindings check can follow the context)
            self._idle = [_execution_context(self.engine, torch, self.device)]
            self._lock = threading.Lock()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        if input_name not in names or output_name not in names:
            raise EngineError(f"{plan_path} has tensors {names}, expected {input_name!r} and {output_name!r}")
        if self.engine.get_tensor_mode(input_name) != trt.TensorIOMode.INPUT:
            raise EngineError(f"{input_name!r} is not an input of {plan_path}")
        self.input_name, self.output_name = input_name, output_name
        dtypes = {"FLOAT": torch.float32, "HALF": torch.float16}
        self.input_dtype = dtypes[self.engine.get_tensor_dtype(input_name).name]
        self.output_dtype = dtypes[self.engine.get_tensor_dtype(output_name).name]
        self.max_batch = int(self.engine.get_tensor_profile_shape(input_name, 0)[2][0])

    def __call__(self, tiles):
        torch = self.torch
        if tiles.shape[0] > self.max_batch:
            raise EngineError(f"batch {tiles.shape[0]} exceeds the plan's profile maximum {self.max_batch}")
        tiles = torch.as_tensor(tiles).to(self.device, self.input_dtype, non_blocking=True).contiguous()
        with self._lock:
            slot = self._idle.pop() if self._idle else None
        if slot is None:  # every context is busy with another thread's call: one more
            slot = _execution_context(self.engine, torch, self.device)
        context, stream = slot
        try:
            if not context.set_input_shape(self.input_name, tuple(tiles.shape)):
                raise EngineError(f"TensorRT refused input shape {tuple(tiles.shape)}")
            out = torch.empty(tuple(context.get_tensor_shape(self.output_name)), dtype=self.output_dtype,
                              device=self.device)
            context.set_tensor_address(self.input_name, tiles.data_ptr())
            context.set_tensor_address(self.output_name, out.data_ptr())
            current = torch.cuda.current_stream(self.device)
            # Both tensors were made on torch's stream: TensorRT starts after that work, and anything
            # queued on torch's stream later (reading `out`, reusing the memory of `tiles`) waits for
            # TensorRT. Hence no record_stream is needed for these allocations.
            stream.wait_stream(current)
            if not context.execute_async_v3(stream.cuda_stream):
                raise EngineError("TensorRT execution failed; its log above says why")
            current.wait_stream(stream)
        finally:
            with self._lock:
                self._idle.append((context, stream))
        return out

    def close(self) -> None:
        """Release the execution contexts, the deserialized engine and its GPU memory."""
        with self._lock:
            self._idle.clear()
        self.engine = None


def _execution_context(engine: Any, torch: Any, device: Any) -> tuple[Any, Any]:
    """A new execution context of `engine` and a CUDA stream of its own (one per concurrent call)."""
    with torch.cuda.device(device):
        return engine.create_execution_context(), torch.cuda.Stream(device)
