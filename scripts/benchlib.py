"""What the memory benchmarks share: a job's peak memory, measured in a fresh process.

(Timing an exported model in ONNX Runtime is `nnslim.compiler.workflows.bench.onnx_latency`.)"""

from __future__ import annotations

import multiprocessing
import resource
from typing import Any, Callable


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` in a newly spawned process: its peak RSS is its own, and nothing an earlier
    job left in the allocator's caches counts against it. `fn` must be importable (module level)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)
