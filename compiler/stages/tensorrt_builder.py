"""TensorRT plans: build one from the engine's ONNX file, or take it from the plan cache.

Written against the TensorRT 10.x and 11.x Python API (the module itself comes from the runtime's
`import_tensorrt`, so `nnslim.compiler.runtime.backends.tensorrt_plan` stays the one module that imports
`tensorrt`; the runtime only loads and runs plans):

- `Builder.create_network(flags)` -> `OnnxParser.parse_from_file` (every parser error is
  reported) -> `IBuilderConfig` with one optimization profile for the tile batch
  (min 1, opt and max = the engine's batch), `set_memory_pool_limit(MemoryPoolType.WORKSPACE)`,
  `builder_optimization_level`, `BuilderFlag.SPARSE_WEIGHTS` for 2:4-pruned weights, a timing
  cache (`create_timing_cache` / `set_timing_cache` / `serialize`) -> `build_serialized_network`.
- Precision: the network is strongly typed, so fp16 comes from the graph (nnslim's fp16 pass:
  fp16 convs, fp32 norms and I/O). TensorRT 11 only supports this (its `BuilderFlag.FP16` is
  gone and `STRONGLY_TYPED` is implied); on TensorRT 10, `fp16_mode="flag"` instead parses the
  fp32 graph weakly typed and sets `BuilderFlag.FP16`. An fp32 build needs no flag, so
  `fp16_mode="flag"` with fp32 is accepted on TensorRT 11 too.
- int8: explicit quantization only. The caller parses the Q/DQ graph (`model.int8.onnx`, symmetric
  int8 checked by `passes.tensorrt_support.tensorrt_qdq_issues`) strongly typed on TensorRT 10 and
  11 alike: no `BuilderFlag.INT8` and no calibrator (both gone in 11, and needless in 10, where
  TensorRT's "Explicit Quantization" guide says to use strong typing and no precision flags).
- Cache: plans are stored under a key of the ONNX file's sha256, the TensorRT version, the GPU's
  compute capability and the build settings, so a rebuild with the same inputs is a copy.
- Timing cache: the file the user names is keyed by TensorRT version and GPU
  (`trt.cache` -> `trt.trt10.16.1.11.sm86.NVIDIA-A10.cache`), because TensorRT rejects a cache
  from another version or device. A cache TensorRT still rejects (damaged) is logged, left out
  and overwritten after the build.

The names used here are checked against the real TensorRT 10.x and 11.x bindings by
`tests/compiler/test_tensorrt_bindings.py` (no GPU needed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from nnslim.cache import private_folder, read_entry, write_entry
from nnslim.compiler.runtime.backends import get_backend
from nnslim.compiler.stages.artifacts import Artifact, ArtifactJob
from nnslim.compiler.stages.engine_manifest import shipped_name
from nnslim.compiler.stages.passes.tensorrt_support import tensorrt_qdq_issues
from nnslim.errors import NnslimError
from nnslim.files import sha256_file, write_bytes_atomic
from nnslim.compiler.runtime.backends.tensorrt_plan import (
    INSTALL_HINT,
    BackendUnavailable,
    create,
    gpu_record,
    import_tensorrt,
)

logger = logging.getLogger(__name__)

# TensorRT builds what its backend record runs (int8: the Q/DQ graph, explicit quantization, never a builder flag)
PRECISIONS = get_backend("tensorrt").precisions()


class TensorRTBuildError(NnslimError):
    """TensorRT could not parse or build the network."""


@dataclass(frozen=True)
class TrtBuildSettings:
    """Everything besides the ONNX file that changes the plan (all part of the cache key).

    Attributes:
        max_batch: the profile's max (and opt) batch; min is 1.
        fp16_mode: "typed" (use the graph's own types; the fp16 pass made it fp16) or "flag"
            (TensorRT 10 only: weakly typed fp32 graph plus BuilderFlag.FP16).
        precision: "fp32", "fp16" or "int8", what the graph (or TensorRT 10's FP16 flag) gives.
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
        if self.precision not in PRECISIONS or self.fp16_mode not in ("typed", "flag"):
            raise ValueError(f"precision {'|'.join(PRECISIONS)} and fp16_mode typed|flag, got {self.precision}, "
                             f"{self.fp16_mode}")
        if self.precision == "int8" and self.fp16_mode == "flag":
            raise ValueError("int8 comes from the Q/DQ graph parsed strongly typed; fp16_mode 'flag' (a weakly typed "
                             "fp32 graph) cannot carry it: use fp16_mode 'typed'")
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


def timing_cache_path(base: Path, tensorrt_version: str, gpu: dict[str, Any]) -> Path:
    """The timing-cache file for this TensorRT version and GPU, next to the one the user named."""
    capability = "".join(str(int(c)) for c in gpu["compute_capability"])
    device = re.sub(r"[^A-Za-z0-9]+", "-", str(gpu["gpu"])).strip("-") or "gpu"
    return base.with_name(f"{base.stem}.trt{tensorrt_version}.sm{capability}.{device}{base.suffix or '.cache'}")


def network_flags(trt: Any, settings: TrtBuildSettings) -> int:
    """`create_network` flags: strongly typed (fp32, fp16 and int8 graphs alike), except TensorRT 10's
    weakly typed fp16-flag build."""
    major = int(trt.__version__.split(".")[0])
    if settings.fp16_mode == "flag":
        if major >= 11 and settings.precision == "fp16":
            raise TensorRTBuildError(f"TensorRT {trt.__version__} has no FP16 builder flag; build from the fp16 "
                                     "graph (--precision fp16 with the default --trt-fp16-mode typed)")
        return 0  # weakly typed (TensorRT 10; on 11 every network is strongly typed anyway)
    if major >= 11:
        return 0  # strongly typed is implied and the only mode
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _parser_errors(parser: Any) -> list[str]:
    errors = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        where = getattr(error, "node_name", lambda: "")() or f"node {error.node()}"
        operator = getattr(error, "node_operator", lambda: "")()
        errors.append(f"{error.code()}: {error.desc()} ({where}{', ' + operator if operator else ''})")
    return errors


def _parse(trt: Any, builder: Any, trt_logger: Any, onnx_path: Path, flags: int) -> tuple[Any, Any]:
    """The network parsed from `onnx_path`, and its parser (which owns the weights: keep it alive)."""
    network = builder.create_network(flags)
    parser = create(trt.OnnxParser, network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = _parser_errors(parser)
        raise TensorRTBuildError(f"TensorRT cannot parse {onnx_path} ({len(errors)} error(s)):\n  " + "\n  ".join(errors))
    return network, parser


def _builder_config(trt: Any, builder: Any, settings: TrtBuildSettings, input_name: str,
                    input_shape: tuple[int, ...]) -> Any:
    """Memory pool, optimization level, flags and the one optimization profile (batch 1..max)."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    config.builder_optimization_level = settings.optimization_level
    if settings.fp16_mode == "flag" and settings.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)  # TensorRT 10 only: network_flags refuses this on 11
    if settings.sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    profile = builder.create_optimization_profile()
    largest = (settings.max_batch, *input_shape)
    profile.set_shape(input_name, (1, *input_shape), largest, largest)
    if config.add_optimization_profile(profile) < 0:
        raise TensorRTBuildError(f"TensorRT refused the optimization profile {input_name}: batch 1..{settings.max_batch} "
                                 f"of {list(input_shape)}; its log above says why")
    return config


def _attach_timing_cache(config: Any, path: Path | None) -> bool:
    """Give the build a timing cache, the saved one when TensorRT accepts it; True when it did."""
    saved = path.read_bytes() if path is not None and path.is_file() else b""
    if saved:
        cache = config.create_timing_cache(saved)
        if cache is not None and config.set_timing_cache(cache, False):  # ignore_mismatch=False: refuse a foreign cache
            return True
        logger.warning("TensorRT rejected the timing cache %s (damaged, or from another TensorRT or GPU); "
                       "building without it, and the file will be overwritten", path)
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, False):
        raise TensorRTBuildError("TensorRT refused an empty timing cache; its log above says why")
    return False


def build_plan(onnx_path: Path, plan_path: Path, settings: TrtBuildSettings, input_name: str,
               input_shape: tuple[int, ...], onnx_sha256: str, cache_dir: Path | None = None,
               timing_cache: Path | None = None) -> dict[str, Any]:
    """Build (or take from the cache) a plan for `onnx_path`; returns the manifest's `tensorrt` record.

    Args:
        input_shape: `[C, *patch]`, the input without its batch dimension.
        onnx_sha256: hash of `onnx_path` (the cache key's first part).
        cache_dir: plan cache (default: $NNSLIM_CACHE/tensorrt or ~/.cache/nnslim/tensorrt), a private
            folder whose entries are checked before use (`nnslim.cache`); skipped when not private.
        timing_cache: base name of the TensorRT timing cache; the file used is keyed by TensorRT
            version and GPU (`timing_cache_path`), read if present and written after a build.
    """
    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise BackendUnavailable(f"building TensorRT plans needs a CUDA GPU; none is visible. {INSTALL_HINT}")
    gpu = gpu_record()
    key = cache_key(onnx_sha256, trt.__version__, tuple(gpu["compute_capability"]), settings, input_shape)
    record = {"version": trt.__version__, **gpu, "settings": asdict(settings), "cache_key": key}
    cache = private_folder("tensorrt", cache_dir)
    cached = read_entry(cache, key) if cache is not None else None
    if cached is not None:
        write_bytes_atomic(plan_path, cached)  # the bytes that were checked, not the file again
        logger.info("TensorRT plan taken from the cache (%s)", cache)
        return {**record, "cache_hit": True}

    flags = network_flags(trt, settings)  # refuses TensorRT 11 + FP16 flag before any GPU work
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = create(trt.Builder, trt_logger)
    network, parser = _parse(trt, builder, trt_logger, onnx_path, flags)
    config = _builder_config(trt, builder, settings, input_name, input_shape)
    timing_file = timing_cache_path(timing_cache, trt.__version__, gpu) if timing_cache else None
    timing_loaded = _attach_timing_cache(config, timing_file)

    serialized = builder.build_serialized_network(network, config)
    del parser  # the weights it owns were needed until the build finished
    if serialized is None:
        raise TensorRTBuildError("TensorRT failed to build the plan; its log above says why")
    data = bytes(serialized)
    write_bytes_atomic(plan_path, data)
    if cache is not None:
        write_entry(cache, key, data)
    if timing_file:
        write_bytes_atomic(timing_file, bytes(config.get_timing_cache().serialize()))
    timing = {"path": shipped_name(timing_file), "loaded": timing_loaded} if timing_file else None  # no folders
    return {**record, "cache_hit": False, "timing_cache": timing}


def check(config: Any, precision: str) -> None:
    """The build hook's plan-time check (`stages.artifacts`): TensorRT and a GPU here, a mode that fits."""
    import_tensorrt()  # raises with the install hint when missing
    if not torch.cuda.is_available():
        raise BackendUnavailable("backend 'tensorrt' needs a CUDA GPU and none is visible; use --backend onnxruntime "
                                 "or openvino")
    if precision == "int8" and config.trt_fp16_mode == "flag":
        raise TensorRTBuildError("--trt-fp16-mode flag is for fp16; int8 is built from the Q/DQ graph, strongly "
                                 "typed (drop --trt-fp16-mode)")


def build(job: ArtifactJob) -> Artifact:
    """The build hook (`stages.artifacts`): `engine.plan` from the graph of the job's precision
    (TensorRT 10's FP16 flag: the exported fp32 graph); the manifest's `tensorrt` record names the
    graph TensorRT parsed."""
    from nnslim.compiler.runtime.manifest import TensorRTRecord

    config = job.config
    settings = TrtBuildSettings(
        max_batch=config.batch_size, precision=job.precision, fp16_mode=config.trt_fp16_mode,
        workspace_bytes=config.trt_workspace_mb << 20, optimization_level=config.trt_optimization_level,
        sparse_weights=config.prune.two_four,
    )
    if job.precision == "fp16" and config.trt_fp16_mode == "flag":
        onnx_file = job.staging / "model.onnx"
    else:
        onnx_file = job.models[job.precision if job.precision in job.models else "fp32"]
    if job.precision == "int8":  # explicit quantization: the Q/DQ graph, strongly typed (TensorRT 10 and 11)
        import onnx

        issues = tensorrt_qdq_issues(onnx.load(str(onnx_file)))
        if issues:
            raise TensorRTBuildError(f"{onnx_file.name} is not a Q/DQ graph TensorRT takes ({len(issues)} issue(s)):"
                                     "\n  " + "\n  ".join(issues[:20]))
    record = build_plan(onnx_file, job.staging / "engine.plan", settings, "image", (job.in_channels, *job.patch),
                        sha256_file(onnx_file), config.engine_cache, config.timing_cache)
    known = {"version", "gpu", "compute_capability", "cache_hit"}
    tensorrt = TensorRTRecord(version=record["version"], gpu=record["gpu"],
                              compute_capability=tuple(record["compute_capability"]), onnx_model=onnx_file.name,
                              cache_hit=record["cache_hit"], extra={k: v for k, v in record.items() if k not in known})
    return Artifact("engine.plan", {"tensorrt": tensorrt},
                    {"cache_hit": record["cache_hit"], "workspace_mb": config.trt_workspace_mb,
                     "optimization_level": config.trt_optimization_level, "fp16_mode": config.trt_fp16_mode})

