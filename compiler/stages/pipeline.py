"""build-engine: checkpoint -> engine directory, top to bottom in one function.

Stages (each recorded in the manifest with its settings and time):
    load (an nnslim checkpoint, or an nnU-Net v2 model folder) -> reparameterize -> prune (optional)
    -> export ONNX -> graph passes (the fp32 graph) -> the candidates' other graphs (each made by its
    precision's producer: fp16, int8) -> select (parity and timing of every (backend, precision)
    candidate; the fastest inside its gate wins) -> compiled artifact (a TensorRT plan, when the
    build makes one) -> manifest/report
Parity is measured against the trained model, or, when pruning changed the function on purpose,
against the pruned PyTorch model (its agreement with the unpruned one is recorded as well).
The directory is assembled under a temporary name beside the destination and renamed into
place only when every stage has passed and its manifest reads back as the runtime will read it,
so an interrupted or failed build leaves nothing that looks like an engine.
"""

from __future__ import annotations

import copy
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import onnx
import torch
from torch import nn

from nnslim.compiler.runtime.backends import OpenRequest, open_predictor
from nnslim.compiler.runtime.backends.openvino_cpu import cpu_record
from nnslim.compiler.runtime.backends.torch_module import TorchPredictor
from nnslim.compiler.runtime.manifest import MANIFEST, EngineManifest, FileRecord, SelectionRecord, load_manifest
from nnslim.compiler.runtime.manifest.schema import MAX_PATCH, label_names_ok
from nnslim.compiler.runtime.manifest.verify import onnx_external_data
from nnslim.compiler.runtime.safety import require_fits
from nnslim.compiler.stages.artifacts import ArtifactJob, hook
from nnslim.compiler.stages.candidates import CandidateResult, choose, measure, ranking
from nnslim.compiler.stages.engine_dir import check_replaceable, staging_dir
from nnslim.compiler.stages.engine_manifest import engine_manifest, source_name, write_report
from nnslim.compiler.stages.export import ExportError, ExportSettings, export_onnx
from nnslim.compiler.stages.graphs import GraphJob, produce
from nnslim.compiler.stages.model_stats import CONVOLUTIONS, conv_macs, conv_weight_sparsity
from nnslim.compiler.stages.parity import (
    ParityError,
    ParityReport,
    TileLayout,
    compare_predictors,
    disagreement_view,
    parity_crops,
    run_batched,
    torch_agreement,
)
from nnslim.compiler.stages.passes import ParityProbe, PassManager, default_passes
from nnslim.compiler.stages.plan import BuildConfig, BuildError, BuildPlan, plan_build
from nnslim.compiler.stages.prune import file_sizes, prune_for_deploy
from nnslim.compiler.stages.reparam_stage import reparameterize_for_deploy
from nnslim.compiler.stages.report import write_disagreement_figure
from nnslim.compiler.stages.source import Source, load_source
from nnslim.errors import EngineError
from nnslim.files import sha256_file, write_json_atomic
from nnslim.parameters import count_parameters

logger = logging.getLogger(__name__)


@dataclass
class BuildResult:
    out_dir: Path
    manifest: EngineManifest
    parity: ParityReport


def build_engine(config: BuildConfig) -> BuildResult:
    """Build an engine directory from a checkpoint (see module docstring)."""
    stages: list[dict[str, Any]] = []
    plan = plan_build(config)                                                    # settings first: fail fast
    check_replaceable(config.out_dir, config.overwrite, config.inputs)           # --out holds no input
    with _timed(stages, "load", checkpoint=source_name(config)) as record:        # checkpoint, nnU-Net folder or module
        source = config.module or load_source(config.checkpoint, config.folds, config.nnunet_checkpoint)
        record.update(kind=source.kind, **source.details)
    _check_labels(source)
    with _timed(stages, "reparameterize") as record:                             # fuse blocks, fold BN
        deployed, fused = reparameterize_for_deploy(source.model)
        record.update(fused.to_dict())
    patch = _check_patch(config.patch_size or tuple(source.metadata["patch_size"]), source.total_stride)
    deployed, pruning = _prune(config, stages, source, deployed, patch)         # optional; after fusing
    reference = deployed if pruning is not None else source.model                # what parity compares with
    _check_fits(config, source, deployed, patch)                                 # before any tile is allocated

    with staging_dir(config.out_dir, overwrite=config.overwrite, protect=config.inputs) as staging:
        settings = ExportSettings(patch_size=patch, in_channels=source.in_channels, opset=config.opset)
        with _timed(stages, "export", opset=settings.opset, patch_size=list(patch)):  # PyTorch -> ONNX
            if source.graph is not None:  # an ONNX source is its own export
                (staging / "model.onnx").write_bytes(source.graph)
            else:
                export_onnx(deployed, staging / "model.onnx", settings)
        tiles, tile_source, layout = parity_crops(patch, source.in_channels, config.parity_tiles,
                                                  config.parity_volume, source.preprocessing)
        passes = default_passes(strict_tensorrt=plan.compiled is not None)
        with _timed(stages, "passes", passes=[type(p).__name__ for p in passes]) as record:  # the fp32 graph
            exported = onnx.shape_inference.infer_shapes(onnx.load(str(staging / "model.onnx")), strict_mode=True)
            probe = ParityProbe(exported, tiles.numpy()) if config.pass_parity else None
            optimized, pass_records = PassManager(passes).run(exported, probe)
            onnx.checker.check_model(optimized, full_check=True)
            onnx.save(optimized, str(staging / "model.opt.onnx"))
            record["results"] = [r.to_dict() for r in pass_records]
        expected = run_batched(TorchPredictor(reference), tiles, config.batch_size)  # PyTorch fp32 logits
        models = {"fp32": staging / "model.opt.onnx"}
        job = GraphJob(models["fp32"], staging, tiles, expected, config.batch_size, source.in_channels, patch,
                       source.preprocessing, config.calibration_volumes, config.calibration_tiles,
                       tuple(c.backend for c in plan.candidates), plan.compiled and plan.compiled.name,
                       config.pass_parity)
        for graph in plan.graphs:                                                    # fp16, int8: their producers
            with _timed(stages, graph) as record:
                models[graph], produced = produce(graph, job)
                record.update(produced)
        with _timed(stages, "select", tiles=tile_source, candidates=[c.label for c in plan.candidates],
                    skipped=list(plan.skipped)) as record:                            # parity + time, fastest passing wins
            results, reference_seconds = measure(
                list(plan.candidates), models, expected, tiles, config.batch_size, config.tolerance_for,
                tile_source, TorchPredictor(reference), repeats=3 if len(plan.candidates) > 1 else 0,
                threads=config.threads)
            chosen = choose(results)
            record["chosen"] = chosen.candidate.label
            if pruning is not None:
                record["pruned_vs_trained_argmax_agreement"] = torch_agreement(source.model, deployed, tiles)
        parity, tolerance = chosen.parity, chosen.tolerance
        runtime = {"backend": chosen.candidate.backend, "precision": chosen.candidate.precision,
                   "runtime_model": chosen.model}
        artifact_fields: dict[str, Any] = {}
        if plan.compiled is not None:                                                # a compiled artifact, checked again
            with _timed(stages, plan.compiled.name) as record:
                artifact = hook(plan.compiled).build(ArtifactJob(config, staging, models, runtime["precision"],
                                                                 source.in_channels, patch))
                onnx_parity, parity = parity, _artifact_parity(plan, reference, staging / artifact.file, runtime,
                                                               tiles, tile_source, config.batch_size)
                record.update(artifact.record, onnxruntime_parity=onnx_parity.to_dict())
            _check_within(parity, tolerance, plan.compiled.name)
            runtime = {**runtime, "backend": plan.compiled.name, "runtime_model": artifact.file}
            artifact_fields = artifact.manifest
        model_stats = {
            "parameters": count_parameters(deployed),
            "macs_per_patch": conv_macs(deployed, (source.in_channels, *patch)),
            "conv_weight_sparsity": conv_weight_sparsity(deployed),
            "reparameterization": fused.to_dict(),
            "pruning": pruning,
            "runtime_model_size": file_sizes(staging / runtime["runtime_model"]),
        }
        figure = _parity_figure(staging, layout, tiles, parity, runtime)                    # beside report.md
        manifest = replace(engine_manifest(config, runtime, source, patch, stages, parity.record(tolerance, figure),
                                           model_stats),
                           selection=_selection_record(config, plan, runtime, results, reference_seconds, models),
                           **artifact_fields)
        write_report(staging / "report.md", manifest)
        # every file of the engine, not the staging folder's own hidden marker (removed before the rename)
        manifest = manifest.with_files({p.name: FileRecord(sha256_file(p), p.stat().st_size,
                                                           tuple(onnx_external_data(p)) if p.suffix == ".onnx" else None)
                                        for p in sorted(staging.iterdir()) if p.is_file() and not p.name.startswith(".")})
        write_json_atomic(staging / MANIFEST, manifest.to_dict())                   # last: marks it complete
        _read_back(staging, config.out_dir, manifest)                               # as the runtime will read it
    logger.info("engine written to %s (%s %s)", config.out_dir, runtime["backend"], runtime["precision"])
    return BuildResult(config.out_dir, manifest, parity)


def _prune(config: BuildConfig, stages: list[dict[str, Any]], source: Source, deployed: nn.Module,
           patch: tuple[int, int, int]) -> tuple[nn.Module, dict[str, Any] | None]:
    """The optional prune stage: (the model to export, the pruning record or None)."""
    if not config.prune.active:
        return deployed, None
    if source.kind == "onnx":
        raise BuildError("pruning works on PyTorch models; an ONNX graph is built as it is (drop the --prune options)")
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


def _artifact_parity(plan: BuildPlan, reference: nn.Module, artifact: Path, runtime: dict[str, str],
                     tiles: torch.Tensor, source: str, batch_size: int) -> ParityReport:
    """The compiled artifact vs PyTorch on the artifact's device (both see the same tiles)."""
    backend = plan.compiled
    predictor = open_predictor(backend.name, OpenRequest(artifact, precision=runtime["precision"]))
    torch_reference = TorchPredictor(copy.deepcopy(reference), device=backend.device)  # the caller's model stays put
    return compare_predictors(torch_reference, predictor, tiles, source, batch_size)


def _selection_record(config: BuildConfig, plan: BuildPlan, runtime: dict[str, str], results: list[CandidateResult],
                      reference_seconds: float | None, models: dict[str, Path]) -> SelectionRecord:
    """What `infer` needs to pick (and fall back among) the engine's runtime choices."""
    return SelectionRecord(
        requested={"backend": config.backend, "precision": config.precision},
        backend=runtime["backend"], precision=runtime["precision"], batch=config.batch_size,
        reference_seconds_per_batch=reference_seconds,
        candidates=tuple(r.record(reference_seconds) for r in ranking(results)),
        skipped=plan.skipped, models={graph: path.name for graph, path in models.items()}, machine=cpu_record(),
    )


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


def _check_within(parity: ParityReport, tolerance: Any, runtime: str) -> None:
    if not parity.within(tolerance):
        raise ParityError(
            f"{runtime} disagrees with PyTorch: max |logit error| {parity.max_abs_logit_error:.3g} = "
            f"{parity.max_rel_logit_error:.2e} of the largest logit (allowed {tolerance.max_rel_logit_error:.2e}), "
            f"argmax agreement "
            f"{parity.argmax_agreement:.5f} (needed {tolerance.min_argmax_agreement}); engine not written"
        )


def _check_patch(patch: tuple[int, ...], stride: tuple[int, int, int]) -> tuple[int, int, int]:
    if len(patch) != 3 or any(isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= MAX_PATCH for p in patch):
        raise BuildError(f"patch must be three sizes in [1, {MAX_PATCH}] (the runtime's limit), got {tuple(patch)}")
    bad = [p for p, s in zip(patch, stride) if p % s]
    if bad:
        raise BuildError(
            f"patch {tuple(patch)} is not a multiple of the network's total stride {stride}; "
            f"try {tuple(max(s, round(p / s) * s) for p, s in zip(patch, stride))}"
        )
    return (int(patch[0]), int(patch[1]), int(patch[2]))


def _check_labels(source: Source) -> None:
    """The label names the engine will carry: one non-empty name per class, as the runtime requires."""
    names = source.metadata.get("label_names")
    if not label_names_ok(names, source.num_classes):  # the runtime's own rule
        raise BuildError(f"the checkpoint's label_names is {names!r:.80}, but its network has {source.num_classes} "
                         f"classes: give it a list of {source.num_classes} non-empty names without control characters "
                         "(newlines, tabs), one per class (fix the checkpoint's metadata or dataset.json, then build "
                         "again)")


def _check_fits(config: BuildConfig, source: Source, model: nn.Module, patch: tuple[int, int, int]) -> None:
    """Refuse, before anything is allocated, a patch or tile count the machine's memory cannot hold.

    About: the tiles and their logits (PyTorch's, each candidate's, the float64 comparison), plus a
    batch's activations at full resolution (a few tensors as wide as the first convolution)."""
    voxels = patch[0] * patch[1] * patch[2]
    width = next((m.out_channels for m in model.modules() if isinstance(m, CONVOLUTIONS)), source.num_classes)
    tiles = config.parity_tiles + config.calibration_tiles * len(config.calibration_volumes)
    need = 4 * voxels * (tiles * (source.in_channels + 8 * source.num_classes)
                         + config.batch_size * (source.in_channels + 6 * width + source.num_classes))
    calibration = f", {tiles - config.parity_tiles} calibration tile(s)" if config.calibration_volumes else ""
    require_fits(need, f"building with patch {patch}, {config.parity_tiles} parity tile(s){calibration} and batch "
                 f"{config.batch_size}", "use a smaller --patch, --parity-tiles, --calibration-tiles or --batch")


def _read_back(staging: Path, out_dir: Path, manifest: EngineManifest) -> None:
    """Load the written engine with the runtime's own loader (schema and file hashes); one it would
    refuse fails the build here, naming the setting, instead of being put in place."""
    try:
        load_manifest(staging, verify=True)
    except EngineError as exc:
        reason = str(exc).replace(str(staging), str(out_dir)).replace(f"; {manifest.rebuild_hint()}", "")
        raise BuildError(f"the engine was not written: nnslim's runtime would refuse it ({reason}); "
                         "fix that setting of the checkpoint or build options and build again") from exc


@contextmanager
def _timed(stages: list[dict[str, Any]], name: str, **settings: Any) -> Iterator[dict[str, Any]]:
    """Time a stage and append it to `stages`; the yielded dict collects what the stage reports."""
    started = time.perf_counter()
    logger.info("stage %s ...", name)
    results: dict[str, Any] = {}
    yield results
    stages.append({"name": name, "settings": settings, **results, "seconds": round(time.perf_counter() - started, 3)})


__all__ = ["BuildConfig", "BuildError", "BuildResult", "ExportError", "build_engine"]
