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

from compiler.runtime.errors import EngineError, InputError
from compiler.runtime.manifest import read_manifest, rebuild_hint
from compiler.runtime.predictors import OnnxRuntimePredictor
from compiler.runtime.preprocessing import prepare, to_labels
from compiler.runtime.sliding_window import SlidingWindowConfig, count_tiles, sliding_window_inference
from compiler.runtime.volume_io import Volume, find_cases, load_volume, save_segmentation

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


def load_engine(engine_dir: str | Path, threads: int = 0) -> Engine:
    """Verify an engine directory and open its runtime model."""
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    spec = ModelSpec.from_manifest(manifest)
    backend = manifest.get("backend")
    if backend != "onnxruntime":
        raise EngineError(f"{engine_dir} was built for backend {backend!r}, which this runtime cannot run; {rebuild_hint(manifest)} --backend onnxruntime")
    predictor = OnnxRuntimePredictor(
        engine_dir / manifest["runtime_model"], spec.input_name, spec.output_name, threads=threads
    )
    return Engine(engine_dir, manifest, spec, predictor)


@dataclass(frozen=True)
class InferenceOptions:
    step_fraction: float = 0.5
    batch_size: int | None = None  # None: the engine's maximum batch
    mirror: bool | None = None  # None: the engine's default (on for imported nnU-Net models)
    progress: bool = True


def window_config(spec: ModelSpec, options: InferenceOptions) -> SlidingWindowConfig:
    batch = options.batch_size or spec.max_batch
    if batch > spec.max_batch:
        raise InputError(f"batch {batch} exceeds the engine's maximum {spec.max_batch}; rebuild with --batch {batch}")
    return SlidingWindowConfig(
        patch_size=spec.patch_size,
        step_fraction=options.step_fraction,
        batch_size=batch,
        mirror_axes=spec.mirror_axes if (spec.tta_default if options.mirror is None else options.mirror) else (),
    )


def segment_volume(
    volume: Volume,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    spec: ModelSpec,
    options: InferenceOptions = InferenceOptions(),
) -> tuple[np.ndarray, int]:
    """Preprocess, run the sliding window, postprocess; returns (labels in the input's array
    axes, tiles evaluated)."""
    pre = spec.preprocessing or {"normalization": spec.normalization}
    if not pre.get("resample") and spec.spacing and not np.allclose(volume.spacing, spec.spacing, rtol=0.05):
        logger.warning(
            "%s has spacing %s but the model was trained at %s; results may degrade (resampling is not applied)",
            volume.name, volume.spacing, spec.spacing,
        )
    config = window_config(spec, options)
    prepared = prepare(volume.data, volume.spacing, pre)
    if prepared.target_spacing is not None and prepared.image.shape[1:] != prepared.cropped_shape:
        logger.info("%s resampled from spacing %s to %s", volume.name, prepared.spacing, prepared.target_spacing)
    tiles = count_tiles(prepared.image.shape[1:], config)
    with tqdm(total=tiles, desc=volume.name, unit="tile", disable=None if options.progress else True, leave=False) as bar:
        logits = sliding_window_inference(prepared.image, predictor, spec.num_classes, config, progress=bar.update)
    return to_labels(logits, prepared, spec.postprocessing), tiles * 2 ** len(config.mirror_axes)


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
    tiles: int
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
    window_config(engine.spec, options)  # fail on a bad batch before reading anything
    results = []
    for case, files in cases.items():
        started = time.perf_counter()
        volume = load_volume(files, engine.spec.in_channels)
        segmentation, tiles = segment_volume(volume, predictor, engine.spec, options)
        path = save_segmentation(segmentation, volume.reference, targets[case])
        counts = np.bincount(segmentation.ravel(), minlength=engine.spec.num_classes)
        results.append(CaseResult(
            name=volume.name,
            output=path,
            shape=segmentation.shape,
            seconds=time.perf_counter() - started,
            tiles=tiles,
            label_voxels=_label_voxels(counts, engine.spec),
        ))
        logger.info("%s -> %s in %.1f s", volume.name, path, results[-1].seconds)
    return results
