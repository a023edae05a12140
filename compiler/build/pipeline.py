"""build-engine: checkpoint -> engine directory, top to bottom in one function.

Stages (each recorded in the manifest with its settings and time):
    load (an nnslim checkpoint, or an nnU-Net v2 model folder) -> reparameterize -> prune (optional) -> export ONNX -> graph passes
    -> parity vs PyTorch -> write manifest/report
Parity is measured against the trained model, or, when pruning changed the function on purpose,
against the pruned PyTorch model (its agreement with the unpruned one is recorded as well).
The directory is assembled under a temporary name beside the destination and renamed into
place only when every stage has passed, so an interrupted or failed build leaves nothing that
looks like an engine.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import onnx
import torch
from torch import nn

from nnslim.compiler.build.export import ExportError, ExportSettings, export_onnx
from nnslim.compiler.build.model_stats import conv_macs, conv_weight_sparsity
from nnslim.compiler.build.nnunet_import import is_model_folder, read_model_folder
from nnslim.compiler.build.parity import (
    ParityError,
    ParityReport,
    ParityTolerance,
    check_onnx_parity,
    check_tensorrt_parity,
    parity_tiles,
    torch_agreement,
)
from nnslim.compiler.build.passes import ParityProbe, PassManager, default_passes
from nnslim.compiler.build.prune import PruneSettings, file_sizes, prune_for_deploy
from nnslim.compiler.build.report import PerfRow, perf_table
from nnslim.compiler.build.reparam_stage import reparameterize_for_deploy
from nnslim.compiler.runtime.errors import NnslimError
from nnslim.compiler.runtime.files import write_json_atomic
from nnslim.compiler.runtime.manifest import FORMAT, FORMAT_VERSION, MANIFEST, sha256_file
from nnslim.compiler.build.tensorrt_builder import TrtBuildSettings, build_plan
from nnslim.compiler.runtime.tensorrt_runtime import BackendUnavailable, import_tensorrt, tensorrt_available
from nnslim.training.checkpoint import build_model, read_checkpoint
from nnslim.training.unet import count_parameters

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt")


class BuildError(NnslimError):
    """A build setting or input that cannot produce an engine."""


@dataclass(frozen=True)
class BuildConfig:
    checkpoint: Path  # an nnslim checkpoint file, or an nnU-Net v2 model folder
    out_dir: Path
    patch_size: tuple[int, int, int] | None = None  # None: the checkpoint's training patch
    batch_size: int = 2
    backend: str = "auto"
    parity_volume: Path | None = None
    parity_tiles: int = 4
    precision: str = "fp32"
    tolerance: ParityTolerance | None = None  # None: the precision's default
    pass_parity: bool = True  # check ONNX Runtime parity after every graph pass
    prune: PruneSettings = PruneSettings()
    opset: int = 18
    folds: tuple[str, ...] = ("0",)  # nnU-Net model folders: folds to ensemble
    nnunet_checkpoint: str = "checkpoint_final.pth"
    # TensorRT (backend "tensorrt", or "auto" on a machine with TensorRT and a GPU)
    trt_workspace_mb: int = 4096
    trt_optimization_level: int = 3
    trt_fp16_mode: str = "typed"  # "flag": TensorRT 10's BuilderFlag.FP16 on the fp32 graph
    engine_cache: Path | None = None  # None: $NNSLIM_CACHE/tensorrt or ~/.cache/nnslim/tensorrt
    timing_cache: Path | None = None


@dataclass
class Source:
    """The trained model and what the engine must know about it, whatever it was read from."""

    model: nn.Module  # trained form, eval mode
    architecture: dict[str, Any]  # recorded in the manifest
    metadata: dict[str, Any]  # patch_size, normalization, label_names, spacing, mirror_axes, dataset, training
    in_channels: int
    num_classes: int
    total_stride: tuple[int, int, int]
    files: list[Path]  # hashed into the manifest
    preprocessing: dict[str, Any]
    postprocessing: dict[str, Any]
    kind: str
    details: dict[str, Any]


def load_source(config: BuildConfig) -> Source:
    """Read an nnslim checkpoint, or import an nnU-Net v2 model folder (`compiler.nnunet_import`)."""
    path = Path(config.checkpoint)
    if path.is_dir():
        if not is_model_folder(path):
            raise BuildError(f"{path} is a folder but not an nnU-Net v2 model folder (no plans.json / dataset.json)")
        imported = read_model_folder(path, config.folds, config.nnunet_checkpoint)
        arch = imported.architecture
        return Source(
            model=imported.network(), architecture={"name": "nnunet-v2", "config": arch.to_dict(),
                                                   "folds": list(imported.folds)},
            metadata=imported.metadata(), in_channels=arch.in_channels, num_classes=arch.num_classes,
            total_stride=imported.total_stride, files=list(imported.checkpoint_files.values()),
            preprocessing=imported.preprocessing(), postprocessing=imported.labels.to_manifest(), kind="nnunet-v2",
            details={"configuration": imported.configuration_name, "trainer": imported.trainer,
                     "folds": list(imported.folds), "checkpoint_name": config.nnunet_checkpoint,
                     "plans_name": imported.plans.get("plans_name"),
                     "spatial_dims": arch.spatial_dims},
        )
    payload = read_checkpoint(path)
    model = build_model(payload).eval()
    metadata = payload["metadata"]
    return Source(
        model=model, architecture=payload["architecture"], metadata=metadata,
        in_channels=model.config.in_channels, num_classes=model.config.num_classes,
        total_stride=model.config.total_stride, files=[path],
        preprocessing={
            "normalization": metadata["normalization"],
            "spacing": metadata.get("spacing"),
            "mirror_axes": metadata.get("mirror_axes", []),
            "axis_order": "array axes of the NIfTI data as nibabel reads them",
            "resample": bool(metadata.get("spacing")),  # scans of another spacing are resampled to it
        },
        postprocessing={"kind": "argmax"}, kind="nnslim-checkpoint", details={},
    )


@dataclass
class BuildResult:
    out_dir: Path
    manifest: dict[str, Any]
    parity: ParityReport


def build_engine(config: BuildConfig) -> BuildResult:
    """Build an engine directory from a checkpoint (see module docstring)."""
    stages: list[dict[str, Any]] = []
    backend = _resolve_backend(config.backend)                                   # backend first: fail fast
    tolerance = config.tolerance or ParityTolerance.for_precision(config.precision)
    passes = default_passes(config.precision, strict_tensorrt=backend == "tensorrt")
    with _timed(stages, "load", checkpoint=str(config.checkpoint)) as record:   # checkpoint or nnU-Net folder
        source = load_source(config)
        model, metadata = source.model, source.metadata
        record.update(kind=source.kind, **source.details)
    with _timed(stages, "reparameterize") as record:                             # fuse blocks, fold BN
        deployed, fused = reparameterize_for_deploy(model)
        record.update(fused.to_dict())
    patch = _check_patch(config.patch_size or tuple(metadata["patch_size"]), source.total_stride)
    if config.batch_size < 1:
        raise BuildError(f"--batch must be >= 1, got {config.batch_size}")
    if config.prune.structured_ratio is not None and source.kind != "nnslim-checkpoint":
        raise BuildError("structured pruning is implemented for nnslim's own U-Nets; "
                         "use magnitude pruning (--prune-sparsity) for an imported nnU-Net model")
    reference, pruning = model, None
    if config.prune.active:
        prune = config.prune
        if prune.finetune_steps and not prune.finetune_dataset:  # default: the dataset it was trained on
            prune = replace(prune, finetune_dataset=(metadata.get("dataset") or {}).get("name"))
        with _timed(stages, "prune", **asdict(prune)) as record:                     # after fusing
            try:
                deployed, pruning = prune_for_deploy(deployed, prune, patch)
            except ValueError as exc:
                raise BuildError(f"cannot prune: {exc}") from exc
            record.update({k: v for k, v in pruning.items() if k != "settings"})
        reference = deployed

    with _staging_dir(config.out_dir) as staging:
        settings = ExportSettings(patch_size=patch, in_channels=source.in_channels, opset=config.opset)
        with _timed(stages, "export", opset=settings.opset, patch_size=list(patch)):  # PyTorch -> ONNX
            export_onnx(deployed, staging / "model.onnx", settings)
        tiles, tile_source = parity_tiles(patch, source.in_channels, config.parity_tiles, config.parity_volume,
                                          source.preprocessing)
        with _timed(stages, "passes", precision=config.precision,                     # graph passes
                    passes=[type(p).__name__ for p in passes]) as record:
            exported = onnx.shape_inference.infer_shapes(onnx.load(str(staging / "model.onnx")), strict_mode=True)
            probe = ParityProbe(exported, tiles.numpy()) if config.pass_parity else None
            optimized, pass_records = PassManager(passes).run(exported, probe)
            onnx.checker.check_model(optimized, full_check=True)
            onnx.save(optimized, str(staging / "model.opt.onnx"))
            record["results"] = [r.to_dict() for r in pass_records]
        with _timed(stages, "parity", tiles=tile_source, tolerance=vars(tolerance)) as record:  # vs PyTorch
            parity = check_onnx_parity(reference, staging / "model.opt.onnx", tiles, tile_source, config.batch_size)
            if pruning is not None:
                record["pruned_vs_trained_argmax_agreement"] = torch_agreement(model, deployed, tiles)
        _check_within(parity, tolerance, "ONNX Runtime")
        tensorrt_record = None
        if backend == "tensorrt":
            with _timed(stages, "tensorrt", workspace_mb=config.trt_workspace_mb,
                        optimization_level=config.trt_optimization_level, fp16_mode=config.trt_fp16_mode) as record:
                tensorrt_record, onnx_parity = _build_tensorrt(config, staging, source.in_channels, patch), parity
                parity = check_tensorrt_parity(reference, staging / "engine.plan", tiles, tile_source, config.batch_size)
                record.update(cache_hit=tensorrt_record["cache_hit"], onnxruntime_parity=onnx_parity.to_dict())
            _check_within(parity, tolerance, "TensorRT")
        model_stats = {
            "parameters": count_parameters(deployed),
            "macs_per_patch": conv_macs(deployed, (source.in_channels, *patch)),
            "conv_weight_sparsity": conv_weight_sparsity(deployed),
            "reparameterization": fused.to_dict(),
            "pruning": pruning,
            "runtime_model_size": file_sizes(staging / "model.opt.onnx"),
        }
        manifest = _manifest(config, backend, source, patch, stages, parity, tolerance, model_stats)
        manifest["tensorrt"] = tensorrt_record
        _write_report(staging / "report.md", manifest)
        manifest["files"] = {
            p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(staging.iterdir())
            if p.is_file()
        }
        write_json_atomic(staging / MANIFEST, manifest)                                    # last: marks it complete
    logger.info("engine written to %s", config.out_dir)
    return BuildResult(config.out_dir, manifest, parity)


def _resolve_backend(backend: str) -> str:
    """"auto": TensorRT when it and a CUDA GPU are here, else ONNX Runtime."""
    if backend not in BACKENDS:
        raise BuildError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "tensorrt":
        import_tensorrt()  # raises with the install hint when missing
        if not torch.cuda.is_available():
            raise BackendUnavailable("backend 'tensorrt' needs a CUDA GPU and none is visible; use --backend onnxruntime")
        return "tensorrt"
    if backend == "auto" and tensorrt_available():
        return "tensorrt"
    return "onnxruntime"


def _check_within(parity: ParityReport, tolerance: ParityTolerance, runtime: str) -> None:
    if not parity.within(tolerance):
        raise ParityError(
            f"{runtime} disagrees with PyTorch: max |logit error| {parity.max_abs_logit_error:.3g} = "
            f"{parity.max_rel_logit_error:.2e} of the largest logit (allowed {tolerance.max_rel_logit_error:.2e}), "
            f"argmax agreement "
            f"{parity.argmax_agreement:.5f} (needed {tolerance.min_argmax_agreement}); engine not written"
        )


def _build_tensorrt(config: BuildConfig, staging: Path, in_channels: int, patch: tuple[int, int, int]) -> dict[str, Any]:
    settings = TrtBuildSettings(
        max_batch=config.batch_size, precision=config.precision, fp16_mode=config.trt_fp16_mode,
        workspace_bytes=config.trt_workspace_mb << 20, optimization_level=config.trt_optimization_level,
        sparse_weights=config.prune.two_four,
    )
    onnx_file = staging / ("model.onnx" if config.trt_fp16_mode == "flag" else "model.opt.onnx")
    return build_plan(onnx_file, staging / "engine.plan", settings, "image", (in_channels, *patch),
                      sha256_file(onnx_file), config.engine_cache, config.timing_cache)


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


@contextmanager
def _staging_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a fresh sibling directory; on success replace `out_dir` with it, else delete it."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / MANIFEST).is_file() and any(out_dir.iterdir()):
        raise BuildError(f"{out_dir} exists, is not empty and is not an engine directory; refusing to overwrite it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        out_dir.rename(old)
    staging.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _tensorrt_version() -> str | None:
    try:
        return import_tensorrt().__version__
    except BackendUnavailable:
        return None


def _tool_versions() -> dict[str, Any]:
    import onnxruntime

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "tensorrt": _tensorrt_version(),
        "platform": platform.platform(),
    }


def _manifest(
    config: BuildConfig,
    backend: str,
    source: Source,
    patch: tuple[int, int, int],
    stages: list[dict[str, Any]],
    parity: ParityReport,
    tolerance: ParityTolerance,
    model_stats: dict[str, Any],
) -> dict[str, Any]:
    metadata = source.metadata
    in_channels, num_classes = source.in_channels, source.num_classes
    command = (
        f"nnslim build-engine {config.checkpoint} --out {config.out_dir} --patch {' '.join(map(str, patch))} "
        f"--batch {config.batch_size} --backend {config.backend} --precision {config.precision}"
    )
    if source.kind == "nnunet-v2":
        command += f" --folds {' '.join(config.folds)} --checkpoint-name {config.nnunet_checkpoint}"
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backend": backend,
        "runtime_model": "engine.plan" if backend == "tensorrt" else "model.opt.onnx",
        "io": {
            "input": {"name": "image", "dtype": "float32", "shape": ["batch", in_channels, *patch]},
            "output": {"name": "logits", "dtype": "float32", "shape": ["batch", num_classes, *patch]},
            "batch": {"min": 1, "opt": config.batch_size, "max": config.batch_size},
        },
        "preprocessing": source.preprocessing,
        "labels": list(metadata["label_names"]),
        "postprocessing": source.postprocessing,
        "model": {"architecture": source.architecture, **model_stats},
        "source": {
            "kind": source.kind,
            "checkpoint": str(config.checkpoint),
            "checkpoint_sha256": {str(f): sha256_file(f) for f in source.files} if source.kind == "nnunet-v2"
            else sha256_file(source.files[0]),
            **source.details,
            "dataset": metadata.get("dataset"),
            "training": metadata.get("training"),
        },
        "stages": stages,
        "parity": {**parity.to_dict(), "tolerance": vars(tolerance)},
        "precision": config.precision,
        "tools": _tool_versions(),
        "build": {"command": command, "argv": sys.argv},
    }


def _write_report(path: Path, manifest: dict[str, Any]) -> None:
    parity, model = manifest["parity"], manifest["model"]
    fused = model["reparameterization"]
    lines = [
        f"# nnslim engine ({manifest['backend']})",
        "",
        f"Built {manifest['created']} from `{manifest['source']['checkpoint']}`.",
        "",
        "| | |",
        "|---|---|",
        f"| input | `{manifest['io']['input']['name']}` {manifest['io']['input']['shape']} |",
        f"| output | `{manifest['io']['output']['name']}` {manifest['io']['output']['shape']} |",
        f"| labels | {', '.join(manifest['labels'])} |",
        f"| parameters | {model['parameters']:,} (trained form: {fused['parameters_before']:,}) |",
        f"| reparameterization | {fused['faster_fusion_blocks_fused']} FasterFusion blocks fused, "
        f"{fused['batchnorms_folded']} BatchNorms folded |",
        f"| conv MACs per patch | {model['macs_per_patch'] / 1e9:.2f} G |",
        f"| conv weight sparsity | {model['conv_weight_sparsity']:.1%} |",
        f"| model.opt.onnx size | {model['runtime_model_size']['bytes']:,} B raw, "
        f"{model['runtime_model_size']['compressed_bytes']:,} B zlib-compressed |",
        "",
        "## Model (the headline benchmark's table, one row: MACs per tile, agreement on the parity tiles)",
        "",
        *perf_table([PerfRow(
            name=f"{manifest['backend']} engine", parameters=model["parameters"], macs=model["macs_per_patch"],
            model_bytes=model["runtime_model_size"]["bytes"],
            model_bytes_compressed=model["runtime_model_size"]["compressed_bytes"],
            agreement=parity["argmax_agreement"],
        )]),
        "",
        "## Parity (ONNX Runtime vs PyTorch)",
        "",
        f"- tiles: {parity['source']}",
        f"- max |logit error|: {parity['max_abs_logit_error']:.3g}, {parity['max_rel_logit_error']:.2e} of the largest "
        f"logit (tolerance {parity['tolerance']['max_rel_logit_error']:.2e})",
        f"- mean |logit error|: {parity['mean_abs_logit_error']:.3g}",
        f"- argmax agreement: {parity['argmax_agreement']:.6f} (needed {parity['tolerance']['min_argmax_agreement']})",
        "",
        "## Stages",
        "",
        "| stage | seconds | settings |",
        "|---|---|---|",
        *(f"| {s['name']} | {s['seconds']} | `{json.dumps(s['settings'])}` |" for s in manifest["stages"]),
        "",
    ]
    path.write_text("\n".join(lines))


__all__ = ["BuildConfig", "BuildError", "BuildResult", "ExportError", "build_engine"]
