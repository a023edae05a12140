"""Segment one in-memory volume: preprocess, walk the windows, restore labels (and probabilities).

The image passes each room once, in order: `prepare_volume` (preprocessing), the window
(`window.plan.plan_window` decides the walk once, `window.walk.stream_logits` walks it) and postprocessing
(a streaming labeler takes each finished slab). `segment_volume` is the whole path for a
`Volume`; `prepare_volume` and `segment_prepared` are its two halves, so a batch can prepare the
next case while the network runs this one (`cases`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from nnslim.compiler.runtime.window.config import Predictor
from nnslim.compiler.runtime.manifest import ModelSpec
from nnslim.compiler.runtime.postprocessing import StreamingLabeler, restore_geometry
from nnslim.compiler.runtime.preprocessing import Prepared, prepare
from nnslim.compiler.runtime.safety import MAX_SPACING_MM, require_fits
from nnslim.compiler.runtime.probabilities import (
    ProbabilityLabeler,
    check_probabilities_fit,
    check_probabilities_supported,
    probability_canvas,
    restore_probabilities,
)
from nnslim.compiler.runtime.volumes.volume import Volume
from nnslim.compiler.runtime.window.rules import WINDOW_RULES, WindowRules, from_record, resolve
from nnslim.compiler.runtime.window.config import SlidingWindowConfig
from nnslim.compiler.runtime.window.mask import body_mask
from nnslim.compiler.runtime.window.selection import SKIP_MODES, WindowReport, WindowSelection
from nnslim.compiler.runtime.window.plan import plan_window
from nnslim.compiler.runtime.window.walk import stream_logits
from nnslim.errors import InputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceOptions:
    """How `infer` walks a volume.

    Attributes:
        window: window rules, a key of `window.rules.WINDOW_RULES` ("nnunet", "monai"; None: the
            rules the engine records, nnU-Net's when it records none).
        step_fraction: window step as a fraction of the patch (None: the rules'; nnU-Net 0.5,
            MONAI 1 - overlap).
        batch_size: tiles per network call (None: the engine's maximum batch).
        mirror: mirror TTA (None: the engine's default, on for imported nnU-Net models).
        progress: progress bars.
        skip: a key of `window.SKIP_MODES`: "none" (the full nnU-Net grid), or an opt-in
            approximation: "mask" skips windows outside a cheap body mask, "roi" is seed 003's
            centre-window test.
        roi_threshold: foreground voxels the centre window must predict to keep its slab.
        memory_cap_mb: bound for the slab accumulators; over it they switch to fp16, and a slab
            that does not fit even then is an error (use a smaller patch).
        blending: the tile weight's mode, "gaussian" or "constant" (None: the rules').
    """

    window: str | None = None
    step_fraction: float | None = None
    batch_size: int | None = None
    mirror: bool | None = None
    progress: bool = True
    skip: str = "none"
    roi_threshold: int = 1000
    memory_cap_mb: float | None = None
    blending: str | None = None


def window_config(spec: ModelSpec, options: InferenceOptions) -> SlidingWindowConfig:
    """The window for this engine and these options; a bad batch or skip mode fails here, before any case runs."""
    batch = options.batch_size or spec.max_batch
    if batch > spec.max_batch:
        raise InputError(f"batch {batch} exceeds the engine's maximum {spec.max_batch}; rebuild with --batch {batch}")
    if options.skip not in SKIP_MODES:
        raise InputError(f"--skip must be one of {tuple(SKIP_MODES)}, got {options.skip!r}")
    if options.window not in (None, *WINDOW_RULES):
        raise InputError(f"--window must be one of {tuple(WINDOW_RULES)}, got {options.window!r}")
    rules = engine_window(spec, options)
    return SlidingWindowConfig(
        patch_size=spec.patch_size,
        step_fraction=rules.step_fraction,
        batch_size=batch,
        blending=rules.blending,
        grid=rules.name,
        pad_value=rules.pad_value,
        mirror_axes=spec.mirror_axes if (spec.tta_default if options.mirror is None else options.mirror) else (),
        memory_cap_mb=options.memory_cap_mb,
    )


def engine_window(spec: ModelSpec, options: InferenceOptions) -> WindowRules:
    """The window rules of a walk: the engine's record (`window.rules`) with the options on top."""
    recorded = from_record((spec.preprocessing or {}).get("window"))
    return resolve(recorded, options.window, options.step_fraction, options.blending)


def segment_volume(
    volume: Volume,
    predictor: Predictor,
    spec: ModelSpec,
    options: InferenceOptions = InferenceOptions(),
) -> tuple[np.ndarray, WindowReport]:
    """Preprocess, walk the windows slab by slab, postprocess (`prepare_volume`, `segment_prepared`).

    Returns the labels in the input's array axes and what the walk did (windows per mirror pass).
    """
    result = segment_prepared(prepare_volume(volume, spec), volume.name, predictor, spec, options)
    return result.labels, result.report


def check_fits(shape: tuple[int, ...], channels: int, spacing: tuple[float, ...], spec: ModelSpec, name: str) -> None:
    """Refuse, before any work, a case whose voxel size is absurd or whose segmentation would not fit
    in memory: the estimate `nnslim infer` makes from headers (`cases.plan`), applied to every
    volume that is segmented, so the Python API (`Engine.segment`) refuses what the CLI refuses.

    Memory: input and normalized copy `2 * 4 * C * N` bytes, the resampled image `4 * C * M`, the
    slab accumulators `4 * (K + 1) * slab` and the uint8 labels `N + M`, for N input voxels, M
    voxels at the model's spacing and K output heads; a cascade adds its previous stage's labels
    (`4 * N`), their L one-hot channels and the joined input (`4 * (2L + C) * M`) and the label
    vote's buffers (`44 * M`)."""
    spacing = tuple(float(z) for z in spacing)
    shown = f"({', '.join(f'{z:g}' for z in spacing)}) mm"
    if not all(math.isfinite(z) and 0 < z <= MAX_SPACING_MM for z in spacing):
        raise InputError(f"{name} has voxel size {shown}; each must be a finite number in (0, {MAX_SPACING_MM:g}] mm; "
                         "fix the voxel size (the header's pixdim, or the spacing passed with the array)")
    voxels = math.prod(shape)
    pre = spec.preprocessing or {}
    target = [float(t) for t in pre["spacing"]] if pre.get("resample") and pre.get("spacing") else None
    resampled = float(voxels)
    if target:
        extents = [n * z for n, z in zip(shape, spacing)]
        if min(extents) < 0.5 * min(target):
            raise InputError(f"{name}: shape {tuple(shape)} at voxel size {shown} spans only {min(extents):.3g} mm on "
                             f"one axis, which resamples to 0 voxels at the model's spacing {tuple(target)} mm; "
                             "check the voxel size")
        kept = min(spacing) if len(target) == 2 else 1.0  # a 2D model keeps one axis' spacing
        resampled = voxels * math.prod(spacing) / (kept * math.prod(target))
    slab = resampled * max(spec.patch_size) / max(1.0, resampled ** (1 / 3))
    need = 8 * channels * voxels + 4 * channels * resampled + 4 * (spec.num_classes + 1) * slab + voxels + resampled
    if spec.previous_stage is not None:  # the label map, its one-hot channels, nnU-Net's label vote (float64 buffers)
        need += 4 * voxels + 4 * (2 * len(spec.previous_stage.get("labels") or []) + channels) * resampled \
            + 44 * resampled
    require_fits(need, f"segmenting {name} (shape {tuple(shape)}, voxel size {shown}, about {resampled:.3g} voxels "
                 "at the model's spacing)", "check the dimensions and voxel size, or crop the scan")


def prepare_volume(volume: Volume, spec: ModelSpec) -> Prepared:
    """The normalized model-space image of a case (and what undoes its geometry); a case that
    cannot fit is refused first (`check_fits`)."""
    check_fits(tuple(volume.data.shape[1:]), volume.data.shape[0], volume.spacing, spec, volume.name)
    pre = spec.preprocessing or {"normalization": spec.normalization}
    if not pre.get("resample") and spec.spacing and not np.allclose(volume.spacing, spec.spacing, rtol=0.05):
        logger.warning(
            "%s has spacing %s but the model was trained at %s; results may degrade (resampling is not applied)",
            volume.name, volume.spacing, spec.spacing,
        )
    # an in-memory array (no files) has no affine: it is taken as already oriented
    oriented = pre.get("orientation") and volume.files
    prepared = prepare(volume.data, volume.spacing, pre, volume.geometry.ras_axes() if oriented else None,
                       volume.previous_stage)
    if prepared.target_spacing is not None and tuple(prepared.image.shape[1:]) != prepared.cropped_shape:
        logger.info("%s resampled from spacing %s to %s", volume.name, prepared.spacing, prepared.target_spacing)
    return prepared


@dataclass
class Segmentation:
    """One case's result in the input's array axes: labels, the walk's report, and the float16
    class probabilities `[K, *labels.shape]` when asked for (`probabilities` module)."""

    labels: np.ndarray
    report: WindowReport
    probabilities: np.ndarray | None = None


def segment_prepared(prepared: Prepared, name: str, predictor: Predictor,
                     spec: ModelSpec, options: InferenceOptions = InferenceOptions(),
                     probabilities: bool = False, steps: tuple[dict, ...] = ()) -> Segmentation:
    """Walk the windows over a prepared image and restore labels (and probabilities) to its geometry.

    Logits are never held for the whole volume: each finished slab is resampled back and turned
    into labels (`StreamingLabeler`), so memory grows with the slab, not the volume. Probabilities
    are the softmax of those same logits, written into one `[K, *input shape]` float16 array. The
    post-processing steps the engine records (`postprocessing.steps`), then `steps` (a run's own:
    `nnslim-predict-nnunet -pp_pkl_file`), apply to the labels.
    """
    image = prepared.image
    config = window_config(spec, options)
    plan = plan_window(tuple(image.shape[1:]), spec.num_classes, config)
    # every skipping mode looks at the body mask ("roi" counts its foreground only inside it)
    selection = WindowSelection(options.skip, options.roi_threshold,
                                body_mask(image) if options.skip != "none" else None)
    canvas = None
    if probabilities:
        check_probabilities_supported(spec.postprocessing)
        check_probabilities_fit(spec.num_classes, prepared.full_shape, name)
        canvas, crop = probability_canvas(spec.num_classes, prepared)
        labeler = ProbabilityLabeler(tuple(image.shape[1:]), prepared.cropped_shape, spec.postprocessing, crop,
                                     prepared.back_orders)
    else:
        labeler = StreamingLabeler(tuple(image.shape[1:]), prepared.cropped_shape, spec.postprocessing,
                                   prepared.back_orders)
    with tqdm(total=plan.tiles, desc=name, unit="window", disable=None if options.progress else True, leave=False) as bar:
        report = stream_logits(image, predictor, spec.num_classes, config, labeler, progress=bar.update,
                               selection=selection, plan=plan)
    labels = restore_geometry(labeler.result(), prepared)
    steps = [*(spec.postprocessing or {}).get("steps", []), *steps]  # nnU-Net's post-processing; labels only
    if steps:
        from nnslim.compiler.runtime.nnunet.postprocessing import apply_steps

        labels = apply_steps(labels, steps)
    return Segmentation(labels, report, None if canvas is None else restore_probabilities(canvas, prepared))
