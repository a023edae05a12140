"""build-engine: checkpoint -> engine directory, top to bottom in one function.

Stages (each recorded in the manifest with its settings and time):
    load (an nnslim checkpoint, or an nnU-Net v2 model folder) -> reparameterize -> prune (optional)
    -> export ONNX -> graph passes -> quantize (int8 candidates) -> select (parity and timing of every
    (backend, precision) candidate; the fastest inside its gate wins) -> TensorRT plan (GPU) -> manifest/report
Parity is measured against the trained model, or, when pruning changed the function on purpose,
against the pruned PyTorch model (its agreement with the unpruned one is recorded as well).
The directory is assembled under a temporary name beside the destination and renamed into
place only when every stage has passed, so an interrupted or failed build leaves nothing that
looks like an engine.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import onnx
import torch
from torch import nn

from nnslim.compiler.build.candidates import Candidate, CandidateResult, choose, measure, plan_candidates, ranking
from nnslim.compiler.build.engine_dir import staging_dir
from nnslim.compiler.build.engine_manifest import engine_manifest, write_report
from nnslim.compiler.build.export import ExportError, ExportSettings, export_onnx
from nnslim.compiler.build.model_stats import conv_macs, conv_weight_sparsity
from nnslim.compiler.build.parity import (
    ParityError,
    ParityReport,
    ParityTolerance,
    TileLayout,
    check_tensorrt_parity,
    disagreement_view,
    parity_crops,
    torch_agreement,
)
from nnslim.compiler.build.passes import ParityProbe, PassManager, default_passes
from nnslim.compiler.build.passes.tensorrt_support import tensorrt_qdq_issues
from nnslim.compiler.build.prune import PruneSettings, file_sizes, prune_for_deploy
from nnslim.compiler.build.quantize import DEFAULT_RECIPES, UINT8_RECIPES, calibration_tiles_that_fit, choose_recipe
from nnslim.compiler.build.source import Source, load_source
from nnslim.compiler.build.reparam_stage import reparameterize_for_deploy
from nnslim.compiler.build.report import write_disagreement_figure
from nnslim.compiler.runtime.errors import NnslimError
from nnslim.compiler.runtime.backends import OpenRequest, get_backend, open_predictor
from nnslim.compiler.runtime.files import write_json_atomic
from nnslim.compiler.runtime.manifest import MANIFEST, sha256_file
from nnslim.compiler.runtime.openvino_backend import cpu_has_vnni, cpu_record
from nnslim.compiler.runtime.precision import AUTO
from nnslim.compiler.runtime.predictors import TorchPredictor
from nnslim.compiler.runtime.tensorrt_runtime import BackendUnavailable, import_tensorrt, tensorrt_available
from nnslim.compiler.build.tensorrt_builder import TrtBuildSettings, build_plan
from nnslim.training.unet import count_parameters

logger = logging.getLogger(__name__)

BACKEND_CHOICES = ("auto", "onnxruntime", "openvino", "tensorrt")
PRECISION_CHOICES = ("auto", "fp32", "fp16", "bf16", "int8")


class BuildError(NnslimError):
    """A build setting or input that cannot produce an engine."""


@dataclass(frozen=True)
class BuildConfig:
    checkpoint: Path  # an nnslim checkpoint file, or an nnU-Net v2 model folder
    out_dir: Path
    patch_size: tuple[int, int, int] | None = None  # None: the checkpoint's training patch
    batch_size: int = 2
    backend: str = "auto"  # auto: TensorRT on a GPU machine, else the CPU backends
    parity_volume: Path | None = None
    parity_tiles: int = 4
    precision: str = "auto"  # auto: the fastest candidate inside its gate; fp32 alone keeps ONNX Runtime fp32
    tolerance: ParityTolerance | None = None  # None: each precision's own gate
    pass_parity: bool = True  # check ONNX Runtime parity after every graph pass
    prune: PruneSettings = PruneSettings()
    opset: int = 18
    folds: tuple[str, ...] = ("0",)  # nnU-Net model folders: folds to ensemble
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


@dataclass(frozen=True)
class BuildPlan:
    """What the build will produce, decided from the settings alone (before anything is loaded).

    Attributes:
        tensorrt: build a TensorRT plan (GPU) instead of choosing among CPU candidates.
        graph_precision: the precision of `model.opt.onnx` ("fp16" only for an explicit fp16 build).
        candidates: the (backend, precision) pairs to check and time.
        skipped: candidates left out, with the reason (recorded in the manifest).
    """

    tensorrt: bool
    graph_precision: str
    candidates: tuple[Candidate, ...]
    skipped: tuple[str, ...]


@dataclass
class BuildResult:
    out_dir: Path
    manifest: dict[str, Any]
    parity: ParityReport


def build_engine(config: BuildConfig) -> BuildResult:
    """Build an engine directory from a checkpoint (see module docstring)."""
    stages: list[dict[str, Any]] = []
    plan = plan_build(config)                                                    # settings first: fail fast
    with _timed(stages, "load", checkpoint=str(config.checkpoint)) as record:   # checkpoint or nnU-Net folder
        source = load_source(config.checkpoint, config.folds, config.nnunet_checkpoint)
        record.update(kind=source.kind, **source.details)
    with _timed(stages, "reparameterize") as record:                             # fuse blocks, fold BN
        deployed, fused = reparameterize_for_deploy(source.model)
        record.update(fused.to_dict())
    patch = _check_patch(config.patch_size or tuple(source.metadata["patch_size"]), source.total_stride)
    deployed, pruning = _prune(config, stages, source, deployed, patch)         # optional; after fusing
    reference = deployed if pruning is not None else source.model                # what parity compares with

    with staging_dir(config.out_dir, overwrite=config.overwrite, protect=(config.checkpoint,)) as staging:
        settings = ExportSettings(patch_size=patch, in_channels=source.in_channels, opset=config.opset)
        with _timed(stages, "export", opset=settings.opset, patch_size=list(patch)):  # PyTorch -> ONNX
            export_onnx(deployed, staging / "model.onnx", settings)
        tiles, tile_source, layout = parity_crops(patch, source.in_channels, config.parity_tiles,
                                                  config.parity_volume, source.preprocessing)
        passes = default_passes(plan.graph_precision, strict_tensorrt=plan.tensorrt)
        with _timed(stages, "passes", precision=plan.graph_precision,                 # graph passes
                    passes=[type(p).__name__ for p in passes]) as record:
            exported = onnx.shape_inference.infer_shapes(onnx.load(str(staging / "model.onnx")), strict_mode=True)
            probe = ParityProbe(exported, tiles.numpy()) if config.pass_parity else None
            optimized, pass_records = PassManager(passes).run(exported, probe)
            onnx.checker.check_model(optimized, full_check=True)
            onnx.save(optimized, str(staging / "model.opt.onnx"))
            record["results"] = [r.to_dict() for r in pass_records]
        expected = _run_batched(TorchPredictor(reference), tiles, config.batch_size)  # PyTorch fp32 logits
        models = {plan.graph_precision: staging / "model.opt.onnx"}
        if any(c.graph == "int8" for c in plan.candidates):                          # Q/DQ graph, recipe by measurement
            with _timed(stages, "quantize", calibration=[str(v) for v in _calibration_volumes(config)]) as record:
                models["int8"], record["recipes"] = _quantize(config, plan, source, patch, staging, tiles, expected)
        with _timed(stages, "select", tiles=tile_source, candidates=[c.label for c in plan.candidates],
                    skipped=list(plan.skipped)) as record:                            # parity + time, fastest passing wins
            results, reference_seconds = measure(
                list(plan.candidates), models, expected, tiles, config.batch_size, lambda p: _tolerance(config, p),
                tile_source, TorchPredictor(reference), repeats=3 if len(plan.candidates) > 1 else 0,
                threads=config.threads)
            chosen = choose(results)
            record["chosen"] = chosen.candidate.label
            if pruning is not None:
                record["pruned_vs_trained_argmax_agreement"] = torch_agreement(source.model, deployed, tiles)
        parity, tolerance = chosen.parity, chosen.tolerance
        runtime = {"backend": chosen.candidate.backend, "precision": chosen.candidate.precision,
                   "runtime_model": chosen.model}
        tensorrt_record = None
        if plan.tensorrt:                                                            # GPU: TensorRT plan, checked again
            with _timed(stages, "tensorrt", workspace_mb=config.trt_workspace_mb,
                        optimization_level=config.trt_optimization_level, fp16_mode=config.trt_fp16_mode) as record:
                tensorrt_record, onnx_parity = _build_tensorrt(config, staging, source.in_channels, patch), parity
                parity = check_tensorrt_parity(reference, staging / "engine.plan", tiles, tile_source, config.batch_size)
                record.update(cache_hit=tensorrt_record["cache_hit"], onnxruntime_parity=onnx_parity.to_dict())
            _check_within(parity, tolerance, "TensorRT")
            runtime = {**runtime, "backend": "tensorrt", "runtime_model": "engine.plan"}
        model_stats = {
            "parameters": count_parameters(deployed),
            "macs_per_patch": conv_macs(deployed, (source.in_channels, *patch)),
            "conv_weight_sparsity": conv_weight_sparsity(deployed),
            "reparameterization": fused.to_dict(),
            "pruning": pruning,
            "runtime_model_size": file_sizes(staging / runtime["runtime_model"]),
        }
        manifest = engine_manifest(config, runtime, source, patch, stages, parity, tolerance, model_stats)
        manifest["tensorrt"] = tensorrt_record
        manifest["selection"] = _selection_record(config, plan, runtime, results, reference_seconds, models)
        manifest["parity"]["figure"] = _parity_figure(staging, layout, tiles, parity, runtime)  # beside report.md
        write_report(staging / "report.md", manifest)
        manifest["files"] = {
            p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(staging.iterdir())
            if p.is_file()
        }
        write_json_atomic(staging / MANIFEST, manifest)                                    # last: marks it complete
    logger.info("engine written to %s (%s %s)", config.out_dir, runtime["backend"], runtime["precision"])
    return BuildResult(config.out_dir, manifest, parity)


def plan_build(config: BuildConfig) -> BuildPlan:
    """Check the settings and decide the candidates, before anything is loaded."""
    if config.backend not in BACKEND_CHOICES:
        raise BuildError(f"unknown backend {config.backend!r}; choose one of {BACKEND_CHOICES}")
    if config.precision not in PRECISION_CHOICES:
        raise BuildError(f"unknown precision {config.precision!r}; choose one of {PRECISION_CHOICES}")
    if config.batch_size < 1:
        raise BuildError(f"--batch must be >= 1, got {config.batch_size}")
    if config.parity_tiles < 1 or config.calibration_tiles < 1:
        raise BuildError(f"--parity-tiles and --calibration-tiles must be >= 1, got {config.parity_tiles}, "
                         f"{config.calibration_tiles}")
    if config.backend == "tensorrt" or (config.backend == AUTO and tensorrt_available()):
        return _tensorrt_plan(config)
    if config.tolerance is not None and config.precision == AUTO:
        raise BuildError("a parity tolerance sets one precision's gate; give an explicit precision with it "
                         "(precision auto checks each candidate against its own precision's gate)")
    if config.backend == AUTO and config.precision in ("fp32", "fp16"):  # fp32/fp16 alone: ONNX Runtime, as before
        candidates, skipped = plan_candidates("onnxruntime", config.precision, bool(_calibration_volumes(config)))
    else:
        candidates, skipped = plan_candidates(config.backend, config.precision, bool(_calibration_volumes(config)))
    if not candidates:
        raise BuildError(f"no {config.backend} backend runs precision {config.precision} here: " + "; ".join(skipped))
    graph = "fp16" if any(c.precision == "fp16" for c in candidates) else "fp32"
    if graph == "fp16" and len(candidates) > 1:
        raise BuildError("an fp16 graph cannot be checked beside other candidates; build fp16 alone (--precision fp16)")
    return BuildPlan(False, graph, tuple(candidates), tuple(skipped))


def _tensorrt_plan(config: BuildConfig) -> BuildPlan:
    import_tensorrt()  # raises with the install hint when missing
    if not torch.cuda.is_available():
        raise BackendUnavailable("backend 'tensorrt' needs a CUDA GPU and none is visible; use --backend onnxruntime "
                                 "or openvino")
    precision = "fp32" if config.precision == AUTO else config.precision
    if precision not in get_backend("tensorrt").precisions():
        raise BuildError(f"TensorRT engines are built in {', '.join(get_backend('tensorrt').precisions())} here, "
                         f"not {precision}")
    if precision == "int8" and not _calibration_volumes(config):
        raise BuildError("a TensorRT int8 build needs real calibration tiles: give --parity-volume or --calibration")
    if precision == "int8" and config.trt_fp16_mode == "flag":
        raise BuildError("--trt-fp16-mode flag is for fp16; int8 is built from the Q/DQ graph, strongly typed "
                         "(drop --trt-fp16-mode)")
    # the ONNX graph is checked with ONNX Runtime on the CPU first, the plan on the GPU after; int8 is the
    # Q/DQ graph made from the fp32 graph (`_quantize`), so the passes run in fp32
    graph = "fp32" if precision == "int8" else precision
    return BuildPlan(True, graph, (Candidate("onnxruntime", precision),), ())


def _calibration_volumes(config: BuildConfig) -> tuple[Path, ...]:
    return tuple(config.calibration) or ((config.parity_volume,) if config.parity_volume else ())


def _tolerance(config: BuildConfig, precision: str) -> ParityTolerance:
    """The user's tolerance for an explicit precision; each precision's own gate otherwise."""
    if config.tolerance is not None and config.precision != AUTO:
        return config.tolerance
    return ParityTolerance.for_precision(precision)


def _run_batched(predict: Any, tiles: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([predict(tiles[i : i + batch_size]).float().cpu() for i in range(0, len(tiles), batch_size)])


def _prune(config: BuildConfig, stages: list[dict[str, Any]], source: Source, deployed: nn.Module,
           patch: tuple[int, int, int]) -> tuple[nn.Module, dict[str, Any] | None]:
    """The optional prune stage: (the model to export, the pruning record or None)."""
    if not config.prune.active:
        return deployed, None
    if config.prune.structured_ratio is not None and source.kind != "nnslim-checkpoint":
        raise BuildError("structured pruning is implemented for nnslim's own U-Nets; "
                         "use magnitude pruning (--prune-sparsity) for an imported nnU-Net model")
    prune = config.prune
    if prune.finetune_steps and not prune.finetune_dataset:  # default: the dataset it was trained on
        prune = replace(prune, finetune_dataset=(source.metadata.get("dataset") or {}).get("name"))
    with _timed(stages, "prune", **asdict(prune)) as record:
        try:
            pruned, pruning = prune_for_deploy(deployed, prune, patch)
        except ValueError as exc:
            raise BuildError(f"cannot prune: {exc}") from exc
        record.update({k: v for k, v in pruning.items() if k != "settings"})
    return pruned, pruning


def _quantize(config: BuildConfig, plan: BuildPlan, source: Source, patch: tuple[int, int, int], staging: Path,
              tiles: torch.Tensor, expected: torch.Tensor) -> tuple[Path, list[dict[str, Any]]]:
    """The int8 graph (`model.int8.onnx`), its recipe chosen by agreement as run by the int8 backend."""
    volumes = _calibration_volumes(config)
    per_volume = max(1, calibration_tiles_that_fit(staging / "model.opt.onnx", (source.in_channels, *patch),
                                                   config.calibration_tiles * len(volumes)) // len(volumes))
    calibration = torch.cat([parity_crops(patch, source.in_channels, per_volume, volume,
                                          source.preprocessing, seed=1 + i)[0] for i, volume in enumerate(volumes)])
    # score recipes on the backend where int8 pays (OpenVINO's int8 kernels differ from ONNX Runtime's)
    int8_backends = [c.backend for c in plan.candidates if c.graph == "int8"]
    backend = "openvino" if "openvino" in int8_backends else int8_backends[0]
    # a TensorRT build: the symmetric recipes only, quantized into TensorRT's form, scored by ONNX Runtime
    recipes = DEFAULT_RECIPES
    if not plan.tensorrt and get_backend(backend).device == "cpu" and not cpu_has_vnni():  # see build.quantize
        recipes = (*DEFAULT_RECIPES, *UINT8_RECIPES)
    scores = choose_recipe(staging / "model.opt.onnx", staging / "model.int8.onnx", calibration.numpy(), tiles,
                           expected, lambda path: open_predictor(backend, OpenRequest(path, precision="int8")),
                           recipes, config.batch_size, tensorrt=plan.tensorrt)
    return staging / "model.int8.onnx", [s.to_dict() for s in scores]


def _selection_record(config: BuildConfig, plan: BuildPlan, runtime: dict[str, str], results: list[CandidateResult],
                      reference_seconds: float | None, models: dict[str, Path]) -> dict[str, Any]:
    """What `infer` needs to pick (and fall back among) the engine's runtime choices."""
    return {
        "requested": {"backend": config.backend, "precision": config.precision},
        "backend": runtime["backend"],
        "precision": runtime["precision"],
        "batch": config.batch_size,
        "reference_seconds_per_batch": reference_seconds,
        "candidates": [r.to_dict(reference_seconds) for r in ranking(results)],
        "skipped": list(plan.skipped),
        "models": {graph: path.name for graph, path in models.items()},
        "machine": cpu_record(),
    }


def _parity_figure(staging: Path, layout: TileLayout | None, tiles: torch.Tensor, parity: ParityReport,
                   runtime: dict[str, str]) -> str | None:
    """`parity_disagreement.png` from the chosen engine's parity (no second run); its name, or None without one."""
    if parity.disagreement is None:
        return None
    image, marks, spacing, shown = disagreement_view(layout, tiles, parity.disagreement)
    title = f"where {runtime['backend']} {runtime['precision']} and PyTorch fp32 disagree (argmax)"
    path = write_disagreement_figure(staging / "parity_disagreement.png", image, marks, spacing, shown,
                                     int(parity.disagreement.sum()), int(parity.disagreement.size), title)
    return None if path is None else path.name


def _check_within(parity: ParityReport, tolerance: ParityTolerance, runtime: str) -> None:
    if not parity.within(tolerance):
        raise ParityError(
            f"{runtime} disagrees with PyTorch: max |logit error| {parity.max_abs_logit_error:.3g} = "
            f"{parity.max_rel_logit_error:.2e} of the largest logit (allowed {tolerance.max_rel_logit_error:.2e}), "
            f"argmax agreement "
            f"{parity.argmax_agreement:.5f} (needed {tolerance.min_argmax_agreement}); engine not written"
        )


def _build_tensorrt(config: BuildConfig, staging: Path, in_channels: int, patch: tuple[int, int, int]) -> dict[str, Any]:
    """The plan from the graph of the requested precision; the record names the graph TensorRT parsed."""
    precision = "fp32" if config.precision == AUTO else config.precision
    settings = TrtBuildSettings(
        max_batch=config.batch_size, precision=precision,
        fp16_mode=config.trt_fp16_mode, workspace_bytes=config.trt_workspace_mb << 20,
        optimization_level=config.trt_optimization_level, sparse_weights=config.prune.two_four,
    )
    if precision == "int8":  # explicit quantization: the Q/DQ graph, strongly typed (TensorRT 10 and 11)
        onnx_file = staging / "model.int8.onnx"
        issues = tensorrt_qdq_issues(onnx.load(str(onnx_file)))
        if issues:
            raise BuildError(f"{onnx_file.name} is not a Q/DQ graph TensorRT takes ({len(issues)} issue(s)):\n  "
                             + "\n  ".join(issues[:20]))
    else:
        onnx_file = staging / ("model.onnx" if config.trt_fp16_mode == "flag" else "model.opt.onnx")
    record = build_plan(onnx_file, staging / "engine.plan", settings, "image", (in_channels, *patch),
                        sha256_file(onnx_file), config.engine_cache, config.timing_cache)
    return {**record, "onnx_model": onnx_file.name}


def _check_patch(patch: tuple[int, ...], stride: tuple[int, int, int]) -> tuple[int, int, int]:
    if len(patch) != 3 or any(p < 1 for p in patch):
        raise BuildError(f"patch must be three positive sizes, got {patch}")
    bad = [p for p, s in zip(patch, stride) if p % s]
    if bad:
        raise BuildError(
            f"patch {tuple(patch)} is not a multiple of the network's total stride {stride}; "
            f"try {tuple(max(s, round(p / s) * s) for p, s in zip(patch, stride))}"
        )
    return (int(patch[0]), int(patch[1]), int(patch[2]))


@contextmanager
def _timed(stages: list[dict[str, Any]], name: str, **settings: Any) -> Iterator[dict[str, Any]]:
    """Time a stage and append it to `stages`; the yielded dict collects what the stage reports."""
    started = time.perf_counter()
    logger.info("stage %s ...", name)
    results: dict[str, Any] = {}
    yield results
    stages.append({"name": name, "settings": settings, **results, "seconds": round(time.perf_counter() - started, 3)})


__all__ = ["BuildConfig", "BuildError", "BuildResult", "ExportError", "build_engine"]
