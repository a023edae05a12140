"""Load an engine directory and segment volumes with it.

This is the whole deployment side: an engine directory (manifest + model file) and this package
are enough; nothing here imports `training` or the build stages.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from nnslim.compiler.runtime.errors import EngineError, InputError
from nnslim.compiler.runtime.manifest import read_manifest, rebuild_hint
from nnslim.compiler.runtime.predictors import OnnxRuntimePredictor
from nnslim.compiler.runtime.preprocessing import StreamingLabeler, prepare, restore_geometry
from nnslim.compiler.runtime.sliding_window import (
    SlidingWindowConfig,
    WindowReport,
    WindowSelection,
    body_mask,
    count_tiles,
    stream_logits,
    walk_order,
)
from nnslim.compiler.runtime.volume_io import Volume, find_cases, load_volume, save_segmentation

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


DEVICES = ("cpu", "cuda")


def load_engine(engine_dir: str | Path, threads: int = 0, device: str = "cpu", ort_tensorrt: bool = False) -> Engine:
    """Verify an engine directory and open its runtime model.

    Args:
        threads: ONNX Runtime CPU threads (0: one per core).
        device: ONNX Runtime engines: "cpu", or "cuda" (CUDA execution provider, I/O binding).
            TensorRT engines always run on the GPU.
        ort_tensorrt: with device "cuda", put ONNX Runtime's TensorRT execution provider first.
    """
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    spec = ModelSpec.from_manifest(manifest)
    backend = manifest.get("backend")
    model_path = engine_dir / manifest["runtime_model"]
    if device not in DEVICES:
        raise InputError(f"device must be one of {DEVICES}, got {device!r}")
    if backend == "tensorrt":
        from nnslim.compiler.runtime.tensorrt_runtime import TensorRTPredictor, check_compatibility, gpu_record, import_tensorrt

        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise EngineError(f"{engine_dir} holds a TensorRT plan, which needs a CUDA GPU; "
                              f"{rebuild_hint(manifest)} --backend onnxruntime")
        check_compatibility(manifest, trt.__version__, tuple(gpu_record()["compute_capability"]), rebuild_hint(manifest))
        predictor = TensorRTPredictor(model_path, spec.input_name, spec.output_name)
    elif backend == "onnxruntime" and device == "cuda":
        from nnslim.compiler.runtime.predictors import OnnxRuntimeGpuPredictor

        predictor = OnnxRuntimeGpuPredictor(model_path, spec.input_name, spec.output_name, tensorrt=ort_tensorrt,
                                            fp16=manifest.get("precision") == "fp16")
    elif backend == "onnxruntime":
        predictor = OnnxRuntimePredictor(model_path, spec.input_name, spec.output_name, threads=threads)
    else:
        raise EngineError(f"{engine_dir} was built for backend {backend!r}, which this runtime cannot run; "
                          f"{rebuild_hint(manifest)} --backend onnxruntime")
    return Engine(engine_dir, manifest, spec, predictor)


SKIP_MODES = ("none", "mask", "roi", "roi+mask")


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


def window_config(spec: ModelSpec, options: InferenceOptions, image_shape: tuple[int, ...] | None = None) -> SlidingWindowConfig:
    batch = options.batch_size or spec.max_batch
    if batch > spec.max_batch:
        raise InputError(f"batch {batch} exceeds the engine's maximum {spec.max_batch}; rebuild with --batch {batch}")
    if options.skip not in SKIP_MODES:
        raise InputError(f"--skip must be one of {SKIP_MODES}, got {options.skip!r}")
    config = SlidingWindowConfig(
        patch_size=spec.patch_size,
        step_fraction=options.step_fraction,
        batch_size=batch,
        mirror_axes=spec.mirror_axes if (spec.tta_default if options.mirror is None else options.mirror) else (),
    )
    if options.memory_cap_mb is None or image_shape is None:
        return config
    walk, *rest = walk_order(image_shape, config)  # the accumulators hold one slab along the walk axis
    slab = spec.patch_size[walk] * int(np.prod([max(image_shape[a], spec.patch_size[a]) for a in rest]))
    need = {d: (spec.num_classes + 1) * slab * d.itemsize / 2**20 for d in (torch.float32, torch.float16)}
    if need[torch.float32] <= options.memory_cap_mb:
        return config
    if need[torch.float16] > options.memory_cap_mb:
        raise InputError(
            f"the slab accumulators need {need[torch.float16]:.0f} MB even in fp16, over the cap of "
            f"{options.memory_cap_mb:.0f} MB; raise --memory-cap-mb or build the engine with a smaller patch"
        )
    return dataclasses.replace(config, accumulate_dtype=torch.float16)


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
    config = window_config(spec, options, tuple(image.shape[1:]))
    mode = "full" if options.skip == "none" else options.skip
    selection = WindowSelection(mode, options.roi_threshold, body_mask(image) if mode != "full" else None)
    order = walk_order(image.shape[1:], config)  # the labeler works in the walk's axis order
    labeler = StreamingLabeler(tuple(image.shape[1:][a] for a in order),
                               tuple(prepared.cropped_shape[a] for a in order), spec.postprocessing)
    total = count_tiles(image.shape[1:], config)
    with tqdm(total=total, desc=volume.name, unit="window", disable=None if options.progress else True, leave=False) as bar:
        report = stream_logits(image, predictor, spec.num_classes, config, labeler, progress=bar.update,
                               selection=selection, slab_axis=order[0])
    labels = labeler.result().transpose(np.argsort(order))
    return restore_geometry(np.ascontiguousarray(labels), prepared), report


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


def segment_files(
    engine: Engine,
    inputs: list[Path],
    output: Path,
    options: InferenceOptions = InferenceOptions(),
    predictor: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[CaseResult]:
    """Segment one file, or every case of a folder, and write label volumes.

    Args:
        engine: the loaded engine (its spec drives preprocessing and the window).
        inputs: a single file / the channel files of one case, or one folder.
        output: a file (single case) or a folder (folder input).
        options: window and TTA settings.
        predictor: run this instead of the engine's own (e.g. PyTorch, for parity).
    """
    predictor = predictor or engine.predictor
    if len(inputs) == 1 and inputs[0].is_dir():
        cases = find_cases(inputs[0])
        if output.suffix in (".gz", ".nii"):
            raise InputError(f"input {inputs[0]} is a folder, so the output must be a folder, got {output}")
        targets = {case: output / f"{case}.nii.gz" for case in cases}
    else:
        cases = {"case": inputs}
        targets = {"case": output}
    passes = 2 ** len(window_config(engine.spec, options).mirror_axes)  # also fails early on a bad batch
    results = []
    for case, files in cases.items():
        started = time.perf_counter()
        volume = load_volume(files, engine.spec.in_channels)
        segmentation, report = segment_volume(volume, predictor, engine.spec, options)
        path = save_segmentation(segmentation, volume.reference, targets[case])
        counts = np.bincount(segmentation.ravel(), minlength=engine.spec.num_classes)
        results.append(CaseResult(
            name=volume.name,
            output=path,
            shape=segmentation.shape,
            seconds=time.perf_counter() - started,
            tiles=report.evaluated * passes,
            windows=report.to_dict(),
            label_voxels=_label_voxels(counts, engine.spec),
        ))
        logger.info("%s -> %s in %.1f s", volume.name, path, results[-1].seconds)
    return results
