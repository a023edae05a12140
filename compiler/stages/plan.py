"""What a build will do, decided from its settings alone, before anything is loaded.

`BuildConfig` is `build-engine`'s settings; `plan_build` checks them against the tables
(backends, precisions) and this machine and returns a `BuildPlan`: the (backend, precision)
candidates to measure, the graphs they need, and the backend whose compiled artifact the build
makes, if any (`stages.artifacts`). A setting that cannot produce an engine fails here, fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnslim.compiler.runtime.backends import BACKENDS, Backend
from nnslim.compiler.runtime.manifest import Tolerance
from nnslim.compiler.runtime.manifest.schema import MAX_BATCH
from nnslim.compiler.runtime.precision import AUTO, PRECISIONS, get_precision
from nnslim.compiler.runtime.safety import detached_data_files
from nnslim.compiler.stages.artifacts import compiled_backend, hook
from nnslim.compiler.stages.candidates import Candidate, plan_candidates
from nnslim.compiler.stages.prune import PruneSettings
from nnslim.errors import NnslimError
from nnslim.extras import require


class BuildError(NnslimError):
    """A build setting or input that cannot produce an engine."""


@dataclass(frozen=True)
class BuildConfig:
    checkpoint: Path | None  # an nnslim checkpoint file, or an nnU-Net v2 model folder (None: `module`)
    out_dir: Path
    patch_size: tuple[int, int, int] | None = None  # None: the checkpoint's training patch
    batch_size: int = 2
    backend: str = "auto"  # auto: a compiled GPU artifact (TensorRT) where one can be built, else the CPU backends
    parity_volume: Path | None = None
    parity_tiles: int = 4
    precision: str = "auto"  # auto: the fastest candidate inside its gate; fp32 alone keeps ONNX Runtime fp32
    postprocessing_steps: tuple[dict, ...] = ()  # nnU-Net's post-processing steps the engine applies to its labels
    tolerance: Tolerance | None = None  # None: each precision's own gate
    pass_parity: bool = True  # check ONNX Runtime parity after every graph pass
    prune: PruneSettings = PruneSettings()
    opset: int = 18
    folds: tuple[str, ...] | None = None  # nnU-Net model folders: folds to ensemble (None: every fold there)
    nnunet_checkpoint: str = "checkpoint_final.pth"
    calibration: tuple[Path, ...] = ()  # int8 calibration volumes (default: the parity volume)
    calibration_tiles: int = 4  # per calibration volume
    threads: int = 0  # CPU threads of the candidates (0: each backend's default)
    overwrite: bool = False  # replace an --out that is not an nnslim engine
    # TensorRT (backend "tensorrt", or "auto" on a machine with TensorRT and a GPU)
    trt_workspace_mb: int = 4096
    trt_optimization_level: int = 3
    trt_fp16_mode: str = "typed"  # "flag": TensorRT 10's BuilderFlag.FP16 on the fp32 graph
    engine_cache: Path | None = None  # None: $NNSLIM_CACHE/tensorrt or ~/.cache/nnslim/tensorrt
    timing_cache: Path | None = None
    module: Any = None  # a `source.Source` read from an nn.Module (the Python API), instead of `checkpoint`

    @property
    def inputs(self) -> tuple[Path, ...]:
        """Every path the build reads or updates: the checkpoint (or nnU-Net model folder), the parity
        and calibration volumes (and the voxel files their detached headers name), a fine-tune dataset folder, the TensorRT plan and timing caches.
        `out_dir` may contain none of them, even with `overwrite` (`engine_dir.check_replaceable`)."""
        dataset = self.prune.finetune_dataset  # a dataset name, or a raw-layout folder
        folder = Path(dataset) if dataset and Path(dataset).exists() else None
        volumes = [Path(p) for p in (self.parity_volume, *self.calibration) if p is not None]
        data = [f for v in volumes for f in detached_data_files(v)]  # a .mhd's .raw is an input too
        return tuple(Path(p) for p in (self.checkpoint, *volumes, *data, folder, self.engine_cache, self.timing_cache)
                     if p is not None)

    @property
    def calibration_volumes(self) -> tuple[Path, ...]:
        """The calibration volumes: `calibration`, else the parity volume, else none."""
        return tuple(self.calibration) or ((self.parity_volume,) if self.parity_volume else ())

    def tolerance_for(self, precision: str) -> Tolerance:
        """The user's tolerance for an explicit precision; each precision's own gate otherwise."""
        if self.tolerance is not None and self.precision != AUTO:
            return self.tolerance
        return get_precision(precision).tolerance


@dataclass(frozen=True)
class BuildPlan:
    """What the build will produce (module docstring).

    Attributes:
        candidates: the (backend, precision) pairs whose ONNX graphs are checked and timed.
        graphs: the graph kinds the candidates need beyond the fp32 one, in table order.
        skipped: candidates left out, with the reason (recorded in the manifest).
        compiled: the backend whose artifact is built from the chosen graph (None: the graph runs).
    """

    candidates: tuple[Candidate, ...]
    graphs: tuple[str, ...]
    skipped: tuple[str, ...]
    compiled: Backend | None = None


def plan_build(config: BuildConfig) -> BuildPlan:
    """Check the settings and decide the candidates, before anything is loaded."""
    if config.backend != AUTO and config.backend not in BACKENDS:
        raise BuildError(f"unknown backend {config.backend!r}; choose one of {(AUTO, *BACKENDS)}")
    if config.precision != AUTO and config.precision not in PRECISIONS:
        raise BuildError(f"unknown precision {config.precision!r}; choose one of {(AUTO, *PRECISIONS)}")
    if not 1 <= config.batch_size <= MAX_BATCH:
        raise BuildError(f"--batch must be in [1, {MAX_BATCH}] (the most tiles per call nnslim's runtime accepts), "
                         f"got {config.batch_size}")
    if config.parity_tiles < 1 or config.calibration_tiles < 1:
        raise BuildError(f"--parity-tiles and --calibration-tiles must be >= 1, got {config.parity_tiles}, "
                         f"{config.calibration_tiles}")
    require("onnxruntime", "building an engine (every graph pass and candidate is checked with ONNX Runtime)")
    compiled = compiled_backend(config.backend)
    if compiled is not None:
        return _compiled_plan(config, compiled)
    if config.tolerance is not None and config.precision == AUTO:
        raise BuildError("a parity tolerance sets one precision's gate; give an explicit precision with it "
                         "(precision auto checks each candidate against its own precision's gate)")
    backend = config.backend
    if backend == AUTO and config.precision != AUTO and not get_precision(config.precision).cpu_auto:
        backend = _graph_checker(config.precision).name  # a GPU precision alone: its graph on the first backend
    elif backend == AUTO and config.precision == "fp32":
        backend = _graph_checker("fp32").name  # fp32 alone: ONNX Runtime fp32, as before
    candidates, skipped = plan_candidates(backend, config.precision, bool(config.calibration_volumes))
    if not candidates:
        raise BuildError(f"no {config.backend} backend runs precision {config.precision} here: " + "; ".join(skipped))
    return BuildPlan(tuple(candidates), _graphs(candidates), tuple(skipped))


def _compiled_plan(config: BuildConfig, backend: Backend) -> BuildPlan:
    """A compiled artifact: the graph of one precision, checked with an ONNX backend on the CPU
    first, then compiled (`stages.artifacts`) and checked again on the artifact's device."""
    precision = "fp32" if config.precision == AUTO else config.precision
    hook(backend).check(config, precision)
    if precision not in backend.precisions():
        raise BuildError(f"{backend.name} engines are built in {', '.join(backend.precisions())} here, not {precision}")
    if get_precision(precision).calibrated and not config.calibration_volumes:
        raise BuildError(f"a {backend.name} {precision} build needs real calibration tiles: give --parity-volume or "
                         "--calibration")
    candidates = (Candidate(_graph_checker(precision).name, precision),)
    return BuildPlan(candidates, _graphs(candidates), (), backend)


def _graph_checker(precision: str) -> Backend:
    """The first available CPU backend that runs an ONNX graph in `precision` (ONNX Runtime)."""
    for entry in BACKENDS.values():
        if entry.device == "cpu" and entry.kind.name == "onnx" and entry.available() and precision in entry.precisions():
            return entry
    raise BuildError(f"no CPU backend here runs the {precision} ONNX graph to check it; install onnxruntime")


def _graphs(candidates: tuple[Candidate, ...] | list[Candidate]) -> tuple[str, ...]:
    wanted = {c.graph for c in candidates}
    return tuple(g for g in dict.fromkeys(p.graph for p in PRECISIONS.values()) if g in wanted and g != "fp32")
