"""What the benchmark scripts share: timing an exported model in ONNX Runtime (CPU), and
measuring a job's peak memory in a fresh process."""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch import nn

from compiler.export import ExportSettings, export_onnx
from compiler.prune import file_sizes
from compiler.runtime.predictors import open_session


def onnx_latency(model: nn.Module, shape: tuple[int, ...], repeats: int, workdir: Path) -> tuple[float, np.ndarray, dict]:
    """Export `model` for inputs `[1, *shape]`, run it once to warm up, then `repeats` times.

    Returns the median seconds per call, the warm-up output (for parity checks) and the ONNX
    file's size raw and compressed.
    """
    path = workdir / f"m{time.monotonic_ns()}.onnx"
    export_onnx(model, path, ExportSettings(patch_size=shape[1:], in_channels=shape[0]))
    session = open_session(path, ["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, *shape), dtype=np.float32)
    out = session.run(None, {"image": x})[0]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, {"image": x})
        times.append(time.perf_counter() - started)
    sizes = file_sizes(path)
    path.unlink()
    return statistics.median(times), out, sizes


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` in a newly spawned process: its peak RSS is its own, and nothing an earlier
    job left in the allocator's caches counts against it. `fn` must be importable (module level)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)
