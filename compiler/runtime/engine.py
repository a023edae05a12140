"""Load an engine directory and segment volumes with it.

This is the whole deployment side: an engine directory (manifest + model file) and this package
are enough; nothing here imports `training` or the build stages.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from nnslim.compiler.runtime.case_plan import check_case_fits, plan_cases
from nnslim.compiler.runtime.errors import EngineError, InputError, NnslimError
from nnslim.compiler.runtime.manifest import TamperedEngineError, manifest_digest, read_manifest, rebuild_hint
from nnslim.compiler.runtime.backends import OpenRequest, RuntimeChoice, open_predictor, resolve_runtime
from nnslim.compiler.runtime.preprocessing import StreamingLabeler, prepare, restore_geometry
from nnslim.compiler.runtime.sliding_window import SlidingWindowConfig, count_tiles, stream_logits
from nnslim.compiler.runtime.window_selection import SKIP_MODES, WindowReport, WindowSelection, body_mask
from nnslim.compiler.runtime.volume_io import Volume, load_volume, save_segmentation, volume_from_array

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """What the runtime needs to know about a model; read from the manifest."""

    in_channels: int
    num_classes: int
    patch_size: tuple[int, int, int]
    max_batch: int
    normalization: dict
    label_names: tuple[str, ...]
    spacing: tuple[float, ...] | None
    mirror_axes: tuple[int, ...]
    input_name: str
    output_name: str
    preprocessing: dict = field(default_factory=dict)  # the manifest entry, for `prepare`
    postprocessing: dict = field(default_factory=lambda: {"kind": "argmax"})
    tta_default: bool = False  # mirror TTA unless the user says otherwise (nnU-Net models: on)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> ModelSpec:
        try:
            io, pre = manifest["io"], manifest["preprocessing"]
            return cls(
                in_channels=int(io["input"]["shape"][1]),
                num_classes=int(io["output"]["shape"][1]),
                patch_size=tuple(int(v) for v in io["input"]["shape"][2:]),
                max_batch=int(io["batch"]["max"]),
                normalization=dict(pre["normalization"]),
                label_names=tuple(manifest["labels"]),
                spacing=tuple(pre["spacing"]) if pre.get("spacing") else None,
                mirror_axes=tuple(pre.get("mirror_axes", ())),
                input_name=io["input"]["name"],
                output_name=io["output"]["name"],
                preprocessing=dict(pre),
                postprocessing=dict(manifest.get("postprocessing") or {"kind": "argmax"}),
                tta_default=bool(pre.get("tta_default", False)),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise EngineError(f"manifest lacks or garbles {exc}; {rebuild_hint(manifest)}") from exc


@dataclass
class Engine:
    directory: Path
    manifest: dict[str, Any]
    spec: ModelSpec
    predictor: Callable[[torch.Tensor], torch.Tensor]
    runtime: RuntimeChoice | None = None  # how it runs here (None: a predictor the caller supplied)

    def segment(self, image: np.ndarray | torch.Tensor, spacing: tuple[float, float, float] | None = None,
                options: InferenceOptions | None = None) -> np.ndarray:
        """Labels for an in-memory image, with the same numerics as `nnslim infer` and no file I/O.

        Args:
            image: `[X, Y, Z]` (one channel) or `[C, X, Y, Z]`, numpy or torch, in the array axes
                nibabel gives for the scan.
            spacing: voxel size in mm along those axes (None: the engine's training spacing, or 1 mm).
            options: window settings (default: no progress bar).

        Returns:
            uint8 labels `[X, Y, Z]`.
        """
        volume = volume_from_array(image, spacing or self.spec.spacing or (1.0, 1.0, 1.0), self.spec.in_channels)
        labels, _ = segment_volume(volume, self.predictor, self.spec, options or InferenceOptions(progress=False))
        return labels


DEVICES = ("cpu", "cuda")


def load_engine(engine_dir: str | Path, threads: int = 0, device: str = "cpu", ort_tensorrt: bool = False,
                backend: str | None = None, precision: str | None = None, expected_sha256: str | None = None) -> Engine:
    """Verify an engine directory and open its runtime model.

    The engine records how its build chose to run it (`selection` in the manifest); `backend` /
    `precision` override that choice. When the recorded backend or CPU feature is missing here, the
    next choice that passed its parity gate at build time is used, and a warning says so.

    Args:
        threads: CPU threads (0: the backend's default, one per core).
        device: "cpu", or "cuda" (ONNX graphs on ONNX Runtime's CUDA execution provider, I/O
            binding). TensorRT engines always run on the GPU.
        ort_tensorrt: with device "cuda", put ONNX Runtime's TensorRT execution provider first.
        expected_sha256: the sha256 of `manifest.json` a deployment pinned (`nnslim inspect` prints
            it): the files are verified against the manifest, and the manifest against this.
    """
    engine_dir = Path(engine_dir)
    if device not in DEVICES:
        raise InputError(f"device must be one of {DEVICES}, got {device!r}")
    if expected_sha256 is not None and manifest_digest(engine_dir) != expected_sha256.strip().lower():
        raise TamperedEngineError(f"{engine_dir}/manifest.json has sha256 {manifest_digest(engine_dir)}, not the pinned "
                                  f"{expected_sha256}; the engine was changed since it was pinned: rebuild or re-pin it")
    manifest = read_manifest(engine_dir)
    spec = ModelSpec.from_manifest(manifest)
    choice, note = resolve_runtime(manifest, backend, precision, device)
    if note:
        logger.warning("%s: %s", engine_dir, note)
    model_path = engine_dir / choice.model
    if choice.backend == "tensorrt":
        from nnslim.compiler.runtime.tensorrt_runtime import check_compatibility, gpu_record, import_tensorrt

        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise EngineError(f"{engine_dir} holds a TensorRT plan, which needs a CUDA GPU; "
                              f"{rebuild_hint(manifest)} --backend onnxruntime")
        check_compatibility(manifest, trt.__version__, tuple(gpu_record()["compute_capability"]), rebuild_hint(manifest))
    request = OpenRequest(model_path, spec.input_name, spec.output_name, choice.precision, threads, ort_tensorrt)
    predictor = open_predictor(choice.backend, request)
    return Engine(engine_dir, manifest, spec, predictor, choice)


@dataclass(frozen=True)
class InferenceOptions:
    """How `infer` walks a volume.

    Attributes:
        skip: "none" (the full nnU-Net grid), or an opt-in approximation (`WindowSelection`):
            "mask" skips windows outside a cheap body mask, "roi" is seed 003's centre-window test.
        roi_threshold: foreground voxels the centre window must predict to keep its slab.
        memory_cap_mb: bound for the slab accumulators; over it they switch to fp16, and a slab
            that does not fit even then is an error (use a smaller patch).
    """

    step_fraction: float = 0.5
    batch_size: int | None = None  # None: the engine's maximum batch
    mirror: bool | None = None  # None: the engine's default (on for imported nnU-Net models)
    progress: bool = True
    skip: str = "none"
    roi_threshold: int = 1000
    memory_cap_mb: float | None = None


def window_config(spec: ModelSpec, options: InferenceOptions) -> SlidingWindowConfig:
    """The window for this engine and these options; a bad batch or skip mode fails here, before any case runs."""
    batch = options.batch_size or spec.max_batch
    if batch > spec.max_batch:
        raise InputError(f"batch {batch} exceeds the engine's maximum {spec.max_batch}; rebuild with --batch {batch}")
    if options.skip not in SKIP_MODES:
        raise InputError(f"--skip must be one of {SKIP_MODES}, got {options.skip!r}")
    return SlidingWindowConfig(
        patch_size=spec.patch_size,
        step_fraction=options.step_fraction,
        batch_size=batch,
        mirror_axes=spec.mirror_axes if (spec.tta_default if options.mirror is None else options.mirror) else (),
        memory_cap_mb=options.memory_cap_mb,
    )


def segment_volume(
    volume: Volume,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    spec: ModelSpec,
    options: InferenceOptions = InferenceOptions(),
) -> tuple[np.ndarray, WindowReport]:
    """Preprocess, walk the windows slab by slab, postprocess.

    Returns the labels in the input's array axes and what the walk did (windows per mirror pass).
    Logits are never held for the whole volume: each finished slab is resampled back and turned
    into labels (`StreamingLabeler`), so memory grows with the slab, not the volume.
    """
    pre = spec.preprocessing or {"normalization": spec.normalization}
    if not pre.get("resample") and spec.spacing and not np.allclose(volume.spacing, spec.spacing, rtol=0.05):
        logger.warning(
            "%s has spacing %s but the model was trained at %s; results may degrade (resampling is not applied)",
            volume.name, volume.spacing, spec.spacing,
        )
    prepared = prepare(volume.data, volume.spacing, pre)
    image = prepared.image
    if prepared.target_spacing is not None and tuple(image.shape[1:]) != prepared.cropped_shape:
        logger.info("%s resampled from spacing %s to %s", volume.name, prepared.spacing, prepared.target_spacing)
    config = window_config(spec, options)
    selection = WindowSelection(options.skip, options.roi_threshold, body_mask(image) if options.skip != "none" else None)
    labeler = StreamingLabeler(tuple(image.shape[1:]), prepared.cropped_shape, spec.postprocessing)
    total = count_tiles(image.shape[1:], config)
    with tqdm(total=total, desc=volume.name, unit="window", disable=None if options.progress else True, leave=False) as bar:
        report = stream_logits(image, predictor, spec.num_classes, config, labeler, progress=bar.update,
                               selection=selection)
    return restore_geometry(labeler.result(), prepared), report


def _label_voxels(counts: np.ndarray, spec: ModelSpec) -> dict[str, int]:
    """Voxels per label, by name when labels are the output heads (argmax), else by value."""
    if spec.postprocessing.get("kind", "argmax") == "argmax":
        return {name: int(c) for name, c in zip(spec.label_names, counts)}
    return {f"label {value}": int(c) for value, c in enumerate(counts) if c}


@dataclass
class CaseResult:
    name: str
    output: Path
    shape: tuple[int, ...]
    seconds: float
    tiles: int  # network calls: windows evaluated x mirror passes
    windows: dict[str, int] = field(default_factory=dict)  # WindowReport
    label_voxels: dict[str, int] = field(default_factory=dict)
    error: str | None = None  # why this case failed (its output was not written); None: it succeeded


def segment_files(
    engine: Engine,
    inputs: list[Path],
    output: Path,
    options: InferenceOptions = InferenceOptions(),
    predictor: Callable[[torch.Tensor], torch.Tensor] | None = None,
    existing: str = "refuse",
    on_case: Callable[[CaseResult], None] | None = None,
    part: tuple[int, int] = (0, 1),
) -> list[CaseResult]:
    """Segment one file, or every case of a folder, and write label volumes.

    What would lose data is refused before the first case runs (`case_plan`): no output may be
    an input, and existing outputs need an explicit choice. Each case's header is checked (sane
    voxel sizes, a memory need the machine can meet) before its voxels are read.

    Args:
        engine: the loaded engine (its spec drives preprocessing and the window).
        inputs: a single file / the channel files of one case, or one folder.
        output: a file (single case) or a folder (folder input).
        options: window and TTA settings.
        predictor: run this instead of the engine's own (e.g. PyTorch, for parity).
        existing: folder mode, outputs that already exist: "refuse" (default), "overwrite"
            (replaced, each logged) or "continue" (those cases are skipped).
        on_case: called with each case's result as soon as it is written (or has failed).
        part: `(part_id, num_parts)`: this process's share of a folder (`case_plan.plan_cases`).

    In folder mode a case that cannot be read or segmented is reported (its `error`) and skipped;
    the others go on. With a single case, its error is raised.
    """
    predictor = predictor or engine.predictor
    plans = plan_cases([Path(p) for p in inputs], Path(output), existing, part)
    passes = 2 ** len(window_config(engine.spec, options).mirror_axes)  # also fails early on a bad batch
    folder = len(inputs) == 1 and Path(inputs[0]).is_dir()
    results = []
    for plan in plans:
        started = time.perf_counter()
        try:
            results.append(_segment_case(engine, plan, predictor, options, passes, started))
        except (NnslimError, OSError) as exc:
            if not folder:  # one case: its error is the command's error
                raise
            # one bad case must not stop a folder: report it, write nothing for it, go on
            logger.error("%s failed: %s", plan.target.name, exc)
            results.append(CaseResult(name=plan.target.name, output=plan.target, shape=(), tiles=0,
                                      seconds=time.perf_counter() - started, error=f"{type(exc).__name__}: {exc}"))
        if on_case is not None:
            on_case(results[-1])
    return results


def _segment_case(engine: Engine, plan: Any, predictor: Callable[[torch.Tensor], torch.Tensor],
                  options: InferenceOptions, passes: int, started: float) -> CaseResult:
    check_case_fits(plan, engine.spec, engine.spec.patch_size)  # headers only, before allocating
    volume = load_volume(plan.files, engine.spec.in_channels)
    segmentation, report = segment_volume(volume, predictor, engine.spec, options)
    path = save_segmentation(segmentation, volume.reference, plan.target)
    counts = np.bincount(segmentation.ravel(), minlength=engine.spec.num_classes)
    result = CaseResult(name=volume.name, output=path, shape=segmentation.shape, seconds=time.perf_counter() - started,
                        tiles=report.evaluated * passes, windows=report.to_dict(),
                        label_voxels=_label_voxels(counts, engine.spec))
    logger.info("%s -> %s in %.1f s", volume.name, path, result.seconds)
    return result
