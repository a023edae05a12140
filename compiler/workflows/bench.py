"""The headline benchmark: the usual way against nnslim, stage by stage, one process, one run.

Rows, each segmenting the same volume with the same sliding-window numerics (step 0.5, Gaussian):
  usual          PyTorch eager, the trained (unfused) model, tile batch 1, fp32, full grid
  + reparam      the deploy form (FasterFusion fused, BatchNorm folded)
  magnitude      (side row) global magnitude pruning to --prune-sparsity (seed 001): smaller
                 compressed files, no speed change with dense kernels, some accuracy cost
  structured     (side row) --structured-ratio of every layer's channels removed, no fine-tuning
  + ONNX Runtime the build's graph passes and ONNX Runtime engine (of the re-parameterized model)
  + batched      the same engine with --batch tiles per call
  + skipping     the same with windows outside the body mask skipped
The pruning rows branch off the re-parameterized model instead of feeding the engine: on a CPU
they buy size (magnitude) or speed at an accuracy cost without fine-tuning (structured), which
each user weighs; the cumulative chain keeps the accuracy.
  TensorRT fp32 / fp16 rows only with TensorRT and a GPU (listed as skipped otherwise)

Per row: median seconds per volume over --repeats, speed-up against the first row, parameters,
conv MACs of all evaluated windows and the achieved GFLOP/s against this machine's measured
convolution peak (one large Conv3d in ONNX Runtime), model size raw and zlib-compressed, peak
resident memory while the row ran (sampled), windows, and argmax agreement / mean Dice against
the first row's segmentation.
"""

from __future__ import annotations

import io
import statistics
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from nnslim.compiler.build.model_stats import conv_macs
from nnslim.compiler.build.prune import PruneSettings, file_sizes, prune_for_deploy
from nnslim.compiler.build.reparam_stage import reparameterize_for_deploy
from nnslim.compiler.build.report import PerfRow, perf_table
from nnslim.compiler.runtime.engine import InferenceOptions, load_engine, segment_volume
from nnslim.compiler.runtime.files import write_json_atomic, write_text_atomic
from nnslim.compiler.runtime.metrics import mean_dice
from nnslim.compiler.runtime.predictors import TorchPredictor, open_session
from nnslim.compiler.runtime.volume_io import load_volume
from nnslim.training.checkpoint import load_model
from nnslim.training.unet import count_parameters


@dataclass(frozen=True)
class BenchConfig:
    checkpoint: Path
    volume: Path
    out_dir: Path
    patch_size: tuple[int, int, int] | None = None  # None: the checkpoint's training patch
    batch_size: int = 4
    repeats: int = 3
    prune_sparsity: float = 0.5
    structured_ratio: float = 0.25
    skip: str = "mask"
    threads: int = 0


class PeakMemory:
    """Peak resident memory of this process while the block runs (sampled every 5 ms, Linux)."""

    def __enter__(self) -> PeakMemory:
        self.peak, self._stop = 0, threading.Event()
        self._page = 4096
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mb(self) -> float:
        return self.peak / 2**20


def onnx_latency(
    model: torch.nn.Module, shape: tuple[int, ...], repeats: int, workdir: Path, threads: int = 0
) -> tuple[float, np.ndarray, dict]:
    """Export `model` for inputs `[1, *shape]`, run it once in ONNX Runtime (CPU) to warm up,
    then `repeats` times.

    Returns the median seconds per call, the warm-up output (for parity checks) and the ONNX
    file's size raw and compressed.
    """
    from nnslim.compiler.build.export import ExportSettings, export_onnx

    path = Path(workdir) / f"m{time.monotonic_ns()}.onnx"
    export_onnx(model, path, ExportSettings(patch_size=shape[1:], in_channels=shape[0]))
    session = open_session(path, ["CPUExecutionProvider"], threads)
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


def conv_peak_gflops(channels: int = 64, size: int = 64, repeats: int = 5, threads: int = 0) -> float:
    """Sustained throughput of one large 3x3x3 Conv3d in ONNX Runtime (CPU), GFLOP/s."""
    conv = torch.nn.Conv3d(channels, channels, 3, padding=1).eval()
    with tempfile.TemporaryDirectory() as tmp:
        seconds, _, _ = onnx_latency(conv, (channels, size, size, size), repeats, Path(tmp), threads)
    return 2 * channels * channels * 27 * size**3 / seconds / 1e9


def _state_size(model: torch.nn.Module) -> tuple[int, int]:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    data = buffer.getvalue()
    return len(data), len(zlib.compress(data, 6))


def run_bench(config: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every row (module docstring); write `report.md`, plots and `bench.json` to out_dir."""
    from nnslim.compiler.build.pipeline import BuildConfig, build_engine
    from nnslim.compiler.runtime.tensorrt_runtime import tensorrt_available

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trained, metadata = load_model(config.checkpoint)
    patch = tuple(config.patch_size or metadata["patch_size"])
    volume = load_volume(config.volume, trained.config.in_channels)
    log("measuring this machine's convolution peak ...")
    peak = conv_peak_gflops(threads=config.threads)

    engine_dir = out / "engine"
    build_engine(BuildConfig(checkpoint=config.checkpoint, out_dir=engine_dir, patch_size=patch,
                             batch_size=config.batch_size, parity_volume=config.volume, parity_tiles=2))
    engine = load_engine(engine_dir, threads=config.threads)
    spec = engine.spec
    if spec.patch_size != patch:
        raise ValueError(f"engine patch {spec.patch_size} differs from the requested {patch}")
    deployed, _ = reparameterize_for_deploy(trained)
    magnitude, _ = prune_for_deploy(deployed, PruneSettings(sparsity=config.prune_sparsity), patch)
    try:
        structured, _ = prune_for_deploy(deployed, PruneSettings(structured_ratio=config.structured_ratio), patch)
        structured_skipped = None
    except ValueError as exc:  # e.g. FasterFusion units: no channel pruning for them
        structured, structured_skipped = None, str(exc)
    onnx_sizes = file_sizes(engine_dir / "model.opt.onnx")

    one = InferenceOptions(batch_size=1, mirror=False, progress=False)
    batched = replace(one, batch_size=config.batch_size)
    skipping = replace(batched, skip=config.skip)
    ways: list[tuple[str, Any, InferenceOptions, torch.nn.Module, tuple[int, int] | None]] = [
        ("usual: PyTorch eager, trained form, batch 1", TorchPredictor(trained), one, trained, None),
        ("+ re-parameterization", TorchPredictor(deployed), one, deployed, None),
        (f"re-param + magnitude pruning {config.prune_sparsity:.0%} (side)", TorchPredictor(magnitude), one,
         magnitude, None),
        (f"re-param + structured pruning {config.structured_ratio:.0%} (side)", TorchPredictor(structured), one,
         structured, None) if structured is not None else None,
        ("+ graph passes, ONNX Runtime engine", engine.predictor, one, deployed,
         (onnx_sizes["bytes"], onnx_sizes["compressed_bytes"])),
        (f"+ batched tiles ({config.batch_size})", engine.predictor, batched, deployed,
         (onnx_sizes["bytes"], onnx_sizes["compressed_bytes"])),
        (f"+ window skipping ({config.skip})", engine.predictor, skipping, deployed,
         (onnx_sizes["bytes"], onnx_sizes["compressed_bytes"])),
    ]
    ways = [w for w in ways if w is not None]
    macs_per_tile = {id(m): conv_macs(m, (trained.config.in_channels, *patch))
                     for m in (trained, deployed, magnitude, structured) if m is not None}
    rows: list[PerfRow] = []
    labels: dict[str, np.ndarray] = {}
    times: dict[str, list[float]] = {name: [] for name, *_ in ways}
    peaks: dict[str, float] = {}
    reports: dict[str, Any] = {}
    for repeat in range(config.repeats):  # interleaved: every row sees the same machine load
        for name, predictor, options, _, _ in ways:
            log(f"[{repeat + 1}/{config.repeats}] {name}")
            with PeakMemory() as memory:
                started = time.perf_counter()
                labels[name], reports[name] = segment_volume(volume, predictor, spec, options)
                times[name].append(time.perf_counter() - started)
            peaks[name] = max(peaks.get(name, 0.0), memory.mb)
    first = ways[0][0]
    for name, _, _, model, sizes in ways:
        raw, compressed = sizes or _state_size(model)
        rows.append(PerfRow(
            name=name, seconds=statistics.median(times[name]), parameters=count_parameters(model),
            macs=macs_per_tile[id(model)] * reports[name].evaluated, model_bytes=raw, model_bytes_compressed=compressed,
            peak_memory_mb=peaks[name], agreement=float((labels[name] == labels[first]).mean()),
            dice=mean_dice(labels[name], labels[first], spec.num_classes), windows=reports[name].evaluated,
        ))
    if structured_skipped:
        rows.append(PerfRow(name=f"re-param + structured pruning {config.structured_ratio:.0%} (side)",
                            note=f"skipped: {structured_skipped}"))
    if not tensorrt_available():
        rows.append(PerfRow(name="TensorRT fp32 / fp16", note="skipped: needs TensorRT and a CUDA GPU"))
    result = {
        "checkpoint": str(config.checkpoint), "volume": str(config.volume), "volume_shape": list(volume.data.shape[1:]),
        "patch": list(patch), "batch": config.batch_size, "repeats": config.repeats,
        "conv_peak_gflops": peak, "threads": torch.get_num_threads(), "rows": [r.to_dict() for r in rows],
    }
    write_json_atomic(out / "bench.json", result)
    _write_report(out, result, rows, peak)
    return result


def _write_report(out: Path, result: dict[str, Any], rows: list[PerfRow], peak: float) -> None:
    measured = [r for r in rows if r.seconds]
    _plots(out, measured)
    lines = [
        "# nnslim headline benchmark",
        "",
        f"Checkpoint `{result['checkpoint']}`, volume `{result['volume']}` {tuple(result['volume_shape'])}, "
        f"tiles {tuple(result['patch'])}, median of {result['repeats']} interleaved runs, "
        f"CPU ({result['threads']} threads). Convolution peak of this machine (one 64->64 3x3x3 Conv3d "
        f"on 64^3 in ONNX Runtime): {peak:.1f} GFLOP/s.",
        "",
        *perf_table(rows, peak),
        "",
        "![seconds per volume](time_per_stage.png) ![accuracy against speed](accuracy_vs_speed.png)",
        "",
    ]
    write_text_atomic(out / "report.md", "\n".join(lines))


def _plots(out: Path, rows: list[PerfRow]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    ax.barh(names[::-1], [r.seconds for r in rows][::-1], color="#4477aa")
    ax.set_xlabel("seconds per volume (median)")
    fig.tight_layout()
    fig.savefig(out / "time_per_stage.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    base = rows[0].seconds
    for r in rows:
        ax.scatter(base / r.seconds, r.agreement, s=30)
        ax.annotate(r.name, (base / r.seconds, r.agreement), fontsize=6)
    ax.set_xlabel("speed-up against the usual way")
    ax.set_ylabel("argmax agreement with the usual way")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_speed.png", dpi=100)
    plt.close(fig)
