"""The headline benchmark: the usual way against nnslim, stage by stage, one process, one run.

Rows, each segmenting the same volume with the same sliding-window numerics (step 0.5, Gaussian):
  usual          PyTorch eager, the trained (unfused) model, tile batch 1, fp32, full grid
  + reparam      the deploy form (FasterFusion fused, BatchNorm folded)
  magnitude      (side row) global magnitude pruning to --prune-sparsity (seed 001): smaller
                 compressed files, no speed change with dense kernels, some accuracy cost
  structured     (side row) --structured-ratio of every layer's channels removed, no fine-tuning
  + ONNX Runtime the build's graph passes and ONNX Runtime fp32 engine (of the re-parameterized model)
  + batched      the same engine with --batch tiles per call
  candidates     every other (backend, precision) candidate of `build-engine --precision auto`,
                 batched, each through the same runtime (OpenVINO fp32 / int8, ONNX Runtime int8, ...)
  + skipping     the engine's chosen candidate with windows outside the body mask skipped
  end to end     `nnslim infer` file to file in a subprocess: the usual way (`--torch-checkpoint`,
                 batch 1) and the engine as built (its chosen candidate), NIfTI read to NIfTI written
The pruning rows branch off the re-parameterized model instead of feeding the engine: on a CPU
they buy size (magnitude) or speed at an accuracy cost without fine-tuning (structured), which
each user weighs; the cumulative chain keeps the accuracy.
  TensorRT fp32 / fp16 rows only with TensorRT and a GPU (listed as skipped otherwise)

Per row: median seconds per volume over --repeats, speed-up against the first row, parameters,
conv MACs of all evaluated windows and the achieved GFLOP/s against this machine's measured
convolution peak in the row's precision (`conv_peaks`: one large Conv3d in fp32, bf16, int8), model
size raw and zlib-compressed, peak resident memory while the row ran (sampled), windows, argmax
agreement / mean Dice against the first row's segmentation, and mean Dice against reference labels
(inside a mask) when `labels` are given.
"""

from __future__ import annotations

import io
import statistics
import threading
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from nnslim.compiler.stages.model_stats import conv_macs
from nnslim.compiler.stages.prune import PruneSettings, file_sizes, prune_for_deploy
from nnslim.compiler.stages.reparam_stage import reparameterize_for_deploy
from nnslim.compiler.stages.report import PerfRow, perf_table
from nnslim.compiler.runtime.engine import InferenceOptions, load_engine
from nnslim.compiler.runtime.segmentation import segment_volume
from nnslim.errors import SettingsError
from nnslim.files import write_json_atomic, write_text_atomic
from nnslim.compiler.runtime.metrics import mean_dice
from nnslim.compiler.runtime.backends.onnx_runtime import open_session
from nnslim.compiler.runtime.backends.torch_module import TorchPredictor
from nnslim.compiler.runtime.volumes.volume import load_volume
from nnslim.training.checkpoint import load_model
from nnslim.parameters import count_parameters


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
    labels: Path | None = None  # reference labels: Dice per row against them
    mask: Path | None = None  # score the labels only where this volume is nonzero (a held-out band)
    side_rows: bool = True  # the pruning rows
    end_to_end: bool = True  # the `nnslim infer` rows


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
    from nnslim.compiler.stages.export import ExportSettings, export_onnx

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


def _state_size(model: torch.nn.Module) -> tuple[int, int]:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    data = buffer.getvalue()
    return len(data), len(zlib.compress(data, 6))


@dataclass
class _Way:
    """One row of the benchmark: how a volume is segmented, and the model whose size it reports."""

    name: str
    predictor: Any
    options: InferenceOptions
    model: torch.nn.Module
    sizes: tuple[int, int] | None  # (raw, compressed) bytes of the deployed file; None: the state dict's
    precision: str = "fp32"


def run_bench(config: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every row (module docstring); write `report.md`, plots and `bench.json` to out_dir."""
    from nnslim.compiler.runtime.backends.tensorrt_plan import tensorrt_available
    from nnslim.compiler.workflows.conv_peaks import conv_peaks

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trained, metadata = load_model(config.checkpoint)
    patch = tuple(config.patch_size or metadata["patch_size"])
    volume = load_volume(config.volume, trained.config.in_channels)
    log("measuring this machine's convolution peak per precision ...")
    peaks = conv_peaks(threads=config.threads)
    engine = _build_bench_engine(config, out / "engine", patch)
    ways, structured_skipped = _ways(config, trained, engine, patch)
    truth = _reference_labels(config)
    rows = _measure(ways, volume, engine.spec, config.repeats, (trained.config.in_channels, *patch), log, truth)
    if config.end_to_end:
        rows += _end_to_end(config, out, engine, rows[0], truth, log)
    if structured_skipped:
        rows.append(PerfRow(name=f"re-param + structured pruning {config.structured_ratio:.0%} (side)",
                            note=f"skipped: {structured_skipped}"))
    rows += [PerfRow(name=f"{reason.split(':')[0]}", note=f"skipped: {reason.split(': ', 1)[-1]}")
             for reason in engine.manifest.selection.skipped]
    if not tensorrt_available():
        rows.append(PerfRow(name="TensorRT fp32 / fp16", note="skipped: needs TensorRT and a CUDA GPU"))
    result = {
        "checkpoint": str(config.checkpoint), "volume": str(config.volume), "volume_shape": list(volume.data.shape[1:]),
        "patch": list(patch), "batch": config.batch_size, "repeats": config.repeats,
        "conv_peaks_gflops": peaks, "threads": torch.get_num_threads(), "rows": [r.to_dict() for r in rows],
        "engine": {"backend": engine.manifest.backend, "precision": engine.manifest.precision,
                   "selection": engine.manifest.selection.to_dict()},
    }
    write_json_atomic(out / "bench.json", result)
    _write_report(out, result, rows, peaks)
    return result


def _build_bench_engine(config: BenchConfig, engine_dir: Path, patch: tuple[int, ...]):
    """The engine as `build-engine --precision auto` builds it (every CPU candidate checked and timed
    on the volume's tiles), loaded with its chosen candidate."""
    from nnslim.compiler.stages.pipeline import BuildConfig, build_engine

    build_engine(BuildConfig(checkpoint=config.checkpoint, out_dir=engine_dir, patch_size=patch, precision="auto",
                             batch_size=config.batch_size, parity_volume=config.volume, parity_tiles=4,
                             threads=config.threads, overwrite=True))
    engine = load_engine(engine_dir, threads=config.threads)
    if engine.spec.patch_size != patch:
        raise SettingsError(f"engine patch {engine.spec.patch_size} differs from the requested {patch}")
    return engine


def _candidate_ways(config: BenchConfig, engine, deployed, batched: InferenceOptions) -> list[_Way]:
    """One batched row per candidate of the engine's selection (ONNX Runtime fp32 comes earlier)."""
    from nnslim.compiler.runtime.backends import OpenRequest, open_predictor

    ways = []
    for c in engine.manifest.selection.candidates:
        if (c.backend, c.precision) == ("onnxruntime", "fp32") or c.error:
            continue
        path = engine.directory / c.model
        sizes = file_sizes(path)
        chosen = (c.backend, c.precision) == (engine.manifest.backend, engine.manifest.precision)
        gate = "" if c.passed else ", outside its parity gate"
        ways.append(_Way(f"{c.label} engine, batched{' (chosen)' if chosen else ''}{gate}",
                         open_predictor(c.backend, OpenRequest(path, precision=c.precision, threads=config.threads)),
                         batched, deployed, (sizes["bytes"], sizes["compressed_bytes"]), c.precision))
    return ways


def _ways(config: BenchConfig, trained, engine, patch) -> tuple[list[_Way], str | None]:
    """The rows in order (the usual way first), and why structured pruning was skipped, if it was."""
    from nnslim.compiler.runtime.backends import OpenRequest, open_predictor

    deployed, _ = reparameterize_for_deploy(trained)
    one = InferenceOptions(batch_size=1, mirror=False, progress=False)
    batched = replace(one, batch_size=config.batch_size)
    ways = [_Way("usual: PyTorch eager, trained form, batch 1", TorchPredictor(trained), one, trained, None),
            _Way("+ re-parameterization", TorchPredictor(deployed), one, deployed, None)]
    structured_skipped = None
    if config.side_rows:
        side, structured_skipped = _pruned_ways(config, deployed, one, patch)
        ways += side
    fp32 = engine.directory / "model.opt.onnx"
    onnx_sizes = file_sizes(fp32)
    sizes = (onnx_sizes["bytes"], onnx_sizes["compressed_bytes"])
    ort = open_predictor("onnxruntime", OpenRequest(fp32, threads=config.threads))
    precision = engine.manifest.precision
    ways += [
        _Way("+ graph passes, ONNX Runtime fp32 engine", ort, one, deployed, sizes),
        _Way(f"+ batched tiles ({config.batch_size})", ort, batched, deployed, sizes),
        *_candidate_ways(config, engine, deployed, batched),
        _Way(f"+ window skipping ({config.skip}), {engine.runtime.label}", engine.predictor,
             replace(batched, skip=config.skip), deployed, sizes, precision),
    ]
    return ways, structured_skipped


def _pruned_ways(config: BenchConfig, deployed, one: InferenceOptions, patch) -> tuple[list[_Way], str | None]:
    """The side rows: magnitude pruning, and structured pruning where the model allows it."""
    magnitude, _ = prune_for_deploy(deployed, PruneSettings(sparsity=config.prune_sparsity), patch)
    ways = [_Way(f"re-param + magnitude pruning {config.prune_sparsity:.0%} (side)", TorchPredictor(magnitude), one,
                 magnitude, None)]
    try:
        structured = prune_for_deploy(deployed, PruneSettings(structured_ratio=config.structured_ratio), patch)[0]
    except ValueError as exc:  # e.g. FasterFusion units: no channel pruning for them
        return ways, str(exc)
    ways.append(_Way(f"re-param + structured pruning {config.structured_ratio:.0%} (side)",
                     TorchPredictor(structured), one, structured, None))
    return ways, None


def _reference_labels(config: BenchConfig) -> tuple[np.ndarray, np.ndarray | None] | None:
    if config.labels is None:
        return None
    labels = np.asarray(load_volume(config.labels, 1).data[0], dtype=np.uint8)
    mask = None if config.mask is None else load_volume(config.mask, 1).data[0] > 0
    return labels, mask


def _dice_vs_labels(labels: np.ndarray, truth, num_classes: int) -> float | None:
    if truth is None:
        return None
    reference, mask = truth
    if mask is not None:
        labels, reference = labels[mask], reference[mask]
    return mean_dice(labels, reference, num_classes)


def _measure(ways: list[_Way], volume, spec, repeats: int, tile: tuple[int, ...], log, truth=None) -> list[PerfRow]:
    """Segment the volume `repeats` times per way, interleaved (every row sees the same machine
    load), and compare each way's labels with the first's (and with reference labels)."""
    labels: dict[str, np.ndarray] = {}
    times: dict[str, list[float]] = {way.name: [] for way in ways}
    peaks: dict[str, float] = {}
    reports: dict[str, Any] = {}
    for repeat in range(repeats):
        for way in ways:
            log(f"[{repeat + 1}/{repeats}] {way.name}")
            with PeakMemory() as memory:
                started = time.perf_counter()
                labels[way.name], reports[way.name] = segment_volume(volume, way.predictor, spec, way.options)
                times[way.name].append(time.perf_counter() - started)
            peaks[way.name] = max(peaks.get(way.name, 0.0), memory.mb)
    macs_per_tile = {id(way.model): conv_macs(way.model, tile) for way in ways}
    first = labels[ways[0].name]
    rows = []
    for way in ways:
        raw, compressed = way.sizes or _state_size(way.model)
        evaluated = reports[way.name].evaluated
        rows.append(PerfRow(
            name=way.name, seconds=statistics.median(times[way.name]), parameters=count_parameters(way.model),
            macs=macs_per_tile[id(way.model)] * evaluated, model_bytes=raw, model_bytes_compressed=compressed,
            peak_memory_mb=peaks[way.name], agreement=float((labels[way.name] == first).mean()),
            dice=mean_dice(labels[way.name], first, spec.num_classes), windows=evaluated, precision=way.precision,
            dice_labels=_dice_vs_labels(labels[way.name], truth, spec.num_classes),
        ))
    labels.clear()
    return rows


def _end_to_end(config: BenchConfig, out: Path, engine, usual: PerfRow, truth, log) -> list[PerfRow]:
    """`nnslim infer` file to file, the usual way (PyTorch, batch 1) and the engine as built, interleaved."""
    import subprocess
    import sys

    # this interpreter's nnslim (`python -m nnslim`), not whichever `nnslim` executable is on PATH
    common = [sys.executable, "-m", "nnslim", "infer", str(engine.directory), str(config.volume), "--no-progress",
              "--overwrite"]
    runs = {
        "end to end: nnslim infer --torch-checkpoint (usual way, batch 1)":
            (["--torch-checkpoint", str(config.checkpoint), "--batch", "1"], "fp32", out / "e2e_torch.nii.gz"),
        f"end to end: nnslim infer, {engine.runtime.label} engine":
            ([], engine.manifest.precision, out / "e2e_engine.nii.gz"),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(config.repeats):
        for name, (extra, _, target) in runs.items():
            log(f"[{repeat + 1}/{config.repeats}] {name}")
            target.unlink(missing_ok=True)
            started = time.perf_counter()
            subprocess.run([*common, "-o", str(target), *extra], check=True, capture_output=True)
            times[name].append(time.perf_counter() - started)
    first = next(iter(runs.values()))[2]
    reference = np.asarray(load_volume(first, 1).data[0], dtype=np.uint8)
    rows = []
    for name, (_, precision, target) in runs.items():
        labels = np.asarray(load_volume(target, 1).data[0], dtype=np.uint8)
        rows.append(PerfRow(name=name, seconds=statistics.median(times[name]), windows=usual.windows,
                            agreement=float((labels == reference).mean()), precision=precision,
                            dice=mean_dice(labels, reference, engine.spec.num_classes),
                            dice_labels=_dice_vs_labels(labels, truth, engine.spec.num_classes),
                            note="whole command, speed-up against the first end-to-end row"))
    return rows


def _write_report(out: Path, result: dict[str, Any], rows: list[PerfRow], peaks: dict[str, float]) -> None:
    measured = [r for r in rows if r.seconds and not r.name.startswith("end to end")]
    _plots(out, measured)
    lines = [
        "# nnslim headline benchmark",
        "",
        f"Checkpoint `{result['checkpoint']}`, volume `{result['volume']}` {tuple(result['volume_shape'])}, "
        f"tiles {tuple(result['patch'])}, median of {result['repeats']} interleaved runs, "
        f"CPU ({result['threads']} threads). Convolution peak of this machine per precision (one 64->64 "
        f"3x3x3 Conv3d on 48^3; \"of peak\" uses the row's precision): "
        + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()) + ". "
        f"Engine chosen by `build-engine --precision auto`: {result['engine']['backend']} "
        f"{result['engine']['precision']}.",
        "",
        *perf_table([r for r in rows if not r.name.startswith("end to end")], peaks),
        "",
        "End to end (`nnslim infer`, file to file, whole command):",
        "",
        *perf_table([r for r in rows if r.name.startswith("end to end")], peaks),
        "",
        "![seconds per volume](time_per_stage.png) ![accuracy against speed](accuracy_vs_speed.png)",
        "",
    ]
    write_text_atomic(out / "report.md", "\n".join(lines))


def _plots(out: Path, rows: list[PerfRow]) -> None:
    from nnslim.compiler.stages.report import import_pyplot

    plt = import_pyplot()

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
