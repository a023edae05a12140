"""TensorRT: building plans and running them. The one module that imports `tensorrt` (lazily).

It lives in the runtime package because a deployment runs plans, and the build side may import
the runtime but not the other way round. Written against the TensorRT 10.x and 11.x Python API:

- Build: `Builder.create_network(flags)` -> `OnnxParser.parse_from_file` (every parser error is
  reported) -> `IBuilderConfig` with one optimization profile for the tile batch
  (min 1, opt and max = the engine's batch), `set_memory_pool_limit(MemoryPoolType.WORKSPACE)`,
  `builder_optimization_level`, `BuilderFlag.SPARSE_WEIGHTS` for 2:4-pruned weights, a timing
  cache (`create_timing_cache` / `set_timing_cache` / `serialize`) -> `build_serialized_network`.
- Precision: the network is strongly typed, so fp16 comes from the graph (nnslim's fp16 pass:
  fp16 convs, fp32 norms and I/O). TensorRT 11 only supports this (its `BuilderFlag.FP16` is
  gone and `STRONGLY_TYPED` is implied); on TensorRT 10, `fp16_mode="flag"` instead parses the
  fp32 graph weakly typed and sets `BuilderFlag.FP16`.
- Cache: plans are stored under a key of the ONNX file's sha256, the TensorRT version, the GPU's
  compute capability and the build settings, so a rebuild with the same inputs is a copy.
- Run: `Runtime.deserialize_cuda_engine`, name-based I/O (`num_io_tensors`, `get_tensor_name`,
  `get_tensor_mode`, `get_tensor_dtype`, `get_tensor_profile_shape`), `set_input_shape`,
  `set_tensor_address` on torch CUDA tensors and `execute_async_v3` on torch's current stream.

A plan runs only on the TensorRT version and GPU family it was built for; `check_compatibility`
compares the manifest's record with this machine before anything is deserialized.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from compiler.runtime.errors import EngineError, NnslimError
from compiler.runtime.files import write_bytes_atomic

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'nnslim[tensorrt]' on a machine with an NVIDIA GPU; or use --backend onnxruntime"


class BackendUnavailable(NnslimError):
    """The requested backend cannot run on this machine."""


class TensorRTBuildError(NnslimError):
    """TensorRT could not parse or build the network."""


def import_tensorrt() -> ModuleType:
    try:
        import tensorrt  # noqa: PLC0415 - optional dependency, imported only when asked for
    except ImportError as exc:
        raise BackendUnavailable(f"backend 'tensorrt' needs the TensorRT Python package: {INSTALL_HINT}") from exc
    return tensorrt


def tensorrt_available() -> bool:
    try:
        import_tensorrt()
    except BackendUnavailable:
        return False
    return torch.cuda.is_available()


@dataclass(frozen=True)
class TrtBuildSettings:
    """Everything besides the ONNX file that changes the plan (all part of the cache key).

    Attributes:
        max_batch: the profile's max (and opt) batch; min is 1.
        fp16_mode: "typed" (use the graph's own types; the fp16 pass made it fp16) or "flag"
            (TensorRT 10 only: weakly typed fp32 graph plus BuilderFlag.FP16).
        precision: "fp32" or "fp16", what the graph / flag gives.
        workspace_bytes: the WORKSPACE memory pool limit.
        optimization_level: builder optimization level 0..5 (TensorRT's default is 3).
        sparse_weights: allow 2:4 sparse kernels (SPARSE_WEIGHTS), for 2:4-pruned models.
    """

    max_batch: int = 2
    precision: str = "fp32"
    fp16_mode: str = "typed"
    workspace_bytes: int = 4 << 30
    optimization_level: int = 3
    sparse_weights: bool = False

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.precision not in ("fp32", "fp16") or self.fp16_mode not in ("typed", "flag"):
            raise ValueError(f"precision fp32|fp16 and fp16_mode typed|flag, got {self.precision}, {self.fp16_mode}")
        if not 0 <= self.optimization_level <= 5:
            raise ValueError(f"optimization level must be 0..5, got {self.optimization_level}")


def cache_key(onnx_sha256: str, tensorrt_version: str, compute_capability: tuple[int, int],
              settings: TrtBuildSettings, input_shape: tuple[int, ...]) -> str:
    """Key of a plan in the engine cache: identical inputs give an identical key, any change a new one."""
    record = {
        "onnx_sha256": onnx_sha256,
        "tensorrt": tensorrt_version,
        "compute_capability": list(compute_capability),
        "settings": asdict(settings),
        "input_shape": list(input_shape),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def default_cache_dir() -> Path:
    root = os.environ.get("NNSLIM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nnslim")
    return Path(root) / "tensorrt"


def gpu_record(device: int = 0) -> dict[str, Any]:
    """Name and compute capability of a CUDA device (torch's view)."""
    major, minor = torch.cuda.get_device_capability(device)
    return {"gpu": torch.cuda.get_device_name(device), "compute_capability": [major, minor]}


def check_compatibility(manifest: dict[str, Any], tensorrt_version: str, compute_capability: tuple[int, int],
                        rebuild: str) -> None:
    """Refuse a plan built for another TensorRT version or GPU family (before deserializing it)."""
    built = manifest.get("tensorrt") or {}
    if built.get("version") != tensorrt_version:
        raise EngineError(
            f"the plan was built with TensorRT {built.get('version')} but this machine has {tensorrt_version}; "
            f"plans only run on the version that built them; {rebuild}"
        )
    if list(built.get("compute_capability") or []) != list(compute_capability):
        raise EngineError(
            f"the plan was built for a GPU of compute capability {built.get('compute_capability')} "
            f"({built.get('gpu')}) but this GPU has {list(compute_capability)}; {rebuild}"
        )


def _parser_errors(parser: Any) -> list[str]:
    errors = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        where = getattr(error, "node_name", lambda: "")() or f"node {error.node()}"
        operator = getattr(error, "node_operator", lambda: "")()
        errors.append(f"{error.code()}: {error.desc()} ({where}{', ' + operator if operator else ''})")
    return errors


def build_plan(onnx_path: Path, plan_path: Path, settings: TrtBuildSettings, input_name: str,
               input_shape: tuple[int, ...], onnx_sha256: str, cache_dir: Path | None = None,
               timing_cache: Path | None = None) -> dict[str, Any]:
    """Build (or take from the cache) a plan for `onnx_path`; returns the manifest's `tensorrt` record.

    Args:
        input_shape: `[C, *patch]`, the input without its batch dimension.
        onnx_sha256: hash of `onnx_path` (the cache key's first part).
        cache_dir: engine cache (default: $NNSLIM_CACHE/tensorrt or ~/.cache/nnslim/tensorrt).
        timing_cache: TensorRT timing cache file, read if present and written back after a build.
    """
    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise BackendUnavailable(f"building TensorRT plans needs a CUDA GPU; none is visible. {INSTALL_HINT}")
    major = int(trt.__version__.split(".")[0])
    gpu = gpu_record()
    key = cache_key(onnx_sha256, trt.__version__, tuple(gpu["compute_capability"]), settings, input_shape)
    record = {"version": trt.__version__, **gpu, "settings": asdict(settings), "cache_key": key}
    cached = (cache_dir or default_cache_dir()) / f"{key}.plan"
    if cached.is_file():
        shutil.copyfile(cached, plan_path)
        logger.info("TensorRT plan taken from the cache (%s)", cached)
        return {**record, "cache_hit": True}

    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    flags = 0
    if settings.fp16_mode == "flag":
        if major >= 11:
            raise TensorRTBuildError("TensorRT 11 has no FP16 builder flag; build from the fp16 graph "
                                     "(--precision fp16 with the default fp16 mode)")
    elif major < 11:  # TensorRT 11 networks are always strongly typed
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = _parser_errors(parser)
        raise TensorRTBuildError(f"TensorRT cannot parse {onnx_path} ({len(errors)} error(s)):\n  " + "\n  ".join(errors))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    config.builder_optimization_level = settings.optimization_level
    if settings.fp16_mode == "flag" and settings.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    if settings.sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (1, *input_shape), (settings.max_batch, *input_shape), (settings.max_batch, *input_shape))
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b"")
    config.set_timing_cache(cache, False)  # ignore_mismatch=False: a foreign cache is an error

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildError("TensorRT failed to build the plan; its log above says why")
    data = bytes(serialized)
    write_bytes_atomic(plan_path, data)
    write_bytes_atomic(cached, data)
    if timing_cache:
        write_bytes_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    return {**record, "cache_hit": False}


_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16}


class TensorRTPredictor:
    """Runs a TensorRT plan on torch CUDA tensors: any batch from 1 to the profile's maximum."""

    def __init__(self, plan_path: Path, input_name: str, output_name: str, device: int = 0) -> None:
        trt = import_tensorrt()
        self.device = torch.device("cuda", device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
            if self.engine is None:
                raise EngineError(f"TensorRT cannot deserialize {plan_path}; rebuild the engine on this machine")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        if input_name not in names or output_name not in names:
            raise EngineError(f"{plan_path} has tensors {names}, expected {input_name!r} and {output_name!r}")
        if self.engine.get_tensor_mode(input_name) != trt.TensorIOMode.INPUT:
            raise EngineError(f"{input_name!r} is not an input of {plan_path}")
        self.input_name, self.output_name = input_name, output_name
        self.input_dtype = _TORCH_DTYPES[self.engine.get_tensor_dtype(input_name).name]
        self.output_dtype = _TORCH_DTYPES[self.engine.get_tensor_dtype(output_name).name]
        self.max_batch = int(self.engine.get_tensor_profile_shape(input_name, 0)[2][0])

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        if tiles.shape[0] > self.max_batch:
            raise EngineError(f"batch {tiles.shape[0]} exceeds the plan's profile maximum {self.max_batch}")
        tiles = tiles.to(self.device, self.input_dtype, non_blocking=True).contiguous()
        if not self.context.set_input_shape(self.input_name, tuple(tiles.shape)):
            raise EngineError(f"TensorRT refused input shape {tuple(tiles.shape)}")
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.output_dtype,
                          device=self.device)
        self.context.set_tensor_address(self.input_name, tiles.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineError("TensorRT execution failed")
        return out  # ordered on torch's stream: later torch ops on it see the result
