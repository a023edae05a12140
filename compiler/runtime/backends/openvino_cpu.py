"""OpenVINO on the CPU: reads the engine's ONNX file directly, fp32, bf16 or int8 (from Q/DQ).

- fp32: `INFERENCE_PRECISION_HINT=f32`, the accuracy mode.
- bf16: the fp32 graph with `INFERENCE_PRECISION_HINT=bf16`; only on CPUs that have bf16
  arithmetic (AVX512_BF16 or AMX: OpenVINO lists "BF16" in the CPU's OPTIMIZATION_CAPABILITIES).
- int8: the Q/DQ graph; OpenVINO fuses Q/DQ pairs into int8 convolutions and runs the layers left
  in float in bf16 where the CPU has it, else fp32.

Compiled models are cached by nnslim, not by OpenVINO's `CACHE_DIR` (whose blobs OpenVINO loads
unchecked): the compiled model is exported once into a private cache entry keyed by the model's
sha256, the OpenVINO version, the CPU and the settings, and later runs import the entry's bytes
after nnslim has checked them (`nnslim.cache`). A missing or damaged entry only costs a compile.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nnslim.cache import entry_key, private_folder, read_entry, write_entry
from nnslim.compiler.runtime.backends import Pool
from nnslim.errors import EngineError
from nnslim.extras import installed
from nnslim.files import sha256_file

if TYPE_CHECKING:
    from nnslim.compiler.runtime.backends import OpenRequest

logger = logging.getLogger(__name__)

PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")


def openvino_available() -> bool:
    return installed("openvino")


@lru_cache(maxsize=1)
def _core() -> Any:
    import openvino as ov

    return ov.Core()


@lru_cache(maxsize=1)
def cpu_record() -> dict[str, Any]:
    """The CPU as OpenVINO and the kernel see it (recorded in manifests next to timings)."""
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as info:
            line = next((ln for ln in info if ln.startswith("flags")), "")
        wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
        flags = [f for f in line.split(":", 1)[-1].split() if f in wanted]
    except OSError:
        pass
    record: dict[str, Any] = {"cores": os.cpu_count(), "flags": flags}
    if openvino_available():
        core = _core()
        record["name"] = str(core.get_property("CPU", "FULL_DEVICE_NAME"))
        record["openvino_capabilities"] = [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    return record


def cpu_has_bf16() -> bool:
    return "BF16" in cpu_record().get("openvino_capabilities", [])


def cpu_has_vnni() -> bool:
    """Whether int8 dot products have a native instruction (AVX512_VNNI, AVX_VNNI or AMX)."""
    return any(f in cpu_record()["flags"] for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


class OpenVinoPredictor:
    """An OpenVINO compiled model on the CPU: `predict(tiles) -> logits`, any batch size.

    Args:
        model_path: the engine's ONNX file (the fp32 graph, or the Q/DQ int8 graph).
        precision: "fp32", "bf16" or "int8" (see the module docstring).
        threads: inference threads (0: OpenVINO's default, one per physical core).
        cache_dir: a private folder for the compiled model (`nnslim.cache.private_folder`; None: none).
        performance_hint: "LATENCY" (one stream) or "THROUGHPUT" (several streams).
        model_bytes: the model file's bytes, already verified (None: read `model_path`); what runs
            is then exactly what was hashed.
    """

    def __init__(self, model_path: str | Path, input_name: str = "image", output_name: str = "logits",
                 precision: str = "fp32", threads: int = 0, cache_dir: Path | None = None,
                 performance_hint: str = "LATENCY", model_bytes: bytes | None = None) -> None:
        if precision == "bf16" and not cpu_has_bf16():
            raise EngineError(f"OpenVINO bf16 needs a CPU with bf16 arithmetic (AVX512_BF16 or AMX); this one has "
                              f"{cpu_record().get('openvino_capabilities')}; use precision fp32 or int8")
        if performance_hint not in PERFORMANCE_HINTS:
            raise EngineError(f"performance hint must be one of {PERFORMANCE_HINTS}, got {performance_hint!r}")
        core = _core()
        reduced = "bf16" if precision in ("bf16", "int8") and cpu_has_bf16() else "f32"
        config: dict[str, Any] = {"PERFORMANCE_HINT": performance_hint, "INFERENCE_PRECISION_HINT": reduced}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = _compiled(core, model_path, model_bytes, config, cache_dir)
        names = {name for port in self.compiled.inputs for name in port.get_names()}
        if input_name not in names:
            raise EngineError(f"{model_path} has inputs {sorted(names)}, expected {input_name!r}")
        outputs = {name for port in self.compiled.outputs for name in port.get_names()}
        if output_name not in outputs:
            raise EngineError(f"{model_path} has outputs {sorted(outputs)}, expected {output_name!r}")
        self.input_name, self.output = input_name, self.compiled.output(output_name)
        self.requests = Pool(self.compiled.create_infer_request)  # one per concurrent call: requests are not shared
        self.device = "cpu"
        self.precision, self.inference_precision = precision, reduced
        logger.debug("OpenVINO %s on %s (%s)", precision, cpu_record().get("name"), config)

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        """numpy in, numpy out (a torch CPU tensor is read without a copy)."""
        array = np.ascontiguousarray(tiles, dtype=np.float32)
        with self.requests.take() as request:
            # share_inputs: no copy of the tiles; outputs are copied (the request reuses its buffers)
            return request.infer({self.input_name: array}, share_inputs=True)[self.output]

    def close(self) -> None:
        """Release the infer requests and the compiled model."""
        self.requests.clear()
        self.compiled = None


def _compiled(core: Any, model_path: str | Path, model_bytes: bytes | None, config: dict[str, Any],
              cache_dir: Path | None) -> Any:
    """The compiled model: imported from a checked cache entry, else compiled (and stored)."""
    import openvino as ov

    model_sha = hashlib.sha256(model_bytes).hexdigest() if model_bytes is not None else sha256_file(model_path)
    record = cpu_record()
    key = entry_key("openvino", ov.__version__, record.get("name"), record.get("openvino_capabilities"),
                    model_sha, sorted(config.items()))
    blob = read_entry(cache_dir, key) if cache_dir is not None else None
    if blob is not None:
        try:
            return core.import_model(blob, "CPU", config)
        except Exception as exc:  # an entry from another OpenVINO build: compile afresh and replace it
            logger.warning("OpenVINO could not import its cached model (%s); compiling again", exc)
    try:
        model = core.read_model(model_bytes) if model_bytes is not None else core.read_model(str(model_path))
        compiled = core.compile_model(model, "CPU", config)
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own for any failure
        raise EngineError(f"OpenVINO cannot compile {model_path}: {exc}") from exc
    if cache_dir is not None:
        stream = io.BytesIO()
        compiled.export_model(stream)
        write_entry(cache_dir, key, stream.getvalue())
    return compiled


def precisions() -> tuple[str, ...]:
    """What OpenVINO runs on this CPU: bf16 only where the CPU has bf16 arithmetic."""
    return ("fp32", "bf16", "int8") if cpu_has_bf16() else ("fp32", "int8")


def open_cpu(request: OpenRequest) -> OpenVinoPredictor:
    """The engine's graph compiled for this CPU, through nnslim's private, checked cache."""
    return OpenVinoPredictor(request.model_path, request.input_name, request.output_name,
                             precision=request.precision, threads=request.threads,
                             cache_dir=private_folder("openvino"), model_bytes=request.model_bytes)
