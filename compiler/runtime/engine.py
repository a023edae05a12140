"""Load an engine directory and segment volumes with it: the runtime's front door.

This is the whole deployment side: an engine directory (manifest + model file) and this package
are enough; nothing here imports `training` or the build stages. `load_engine` verifies the
directory (`manifest`), picks how to run it here (`backends.choice`, `backends.devices`) and opens
the model; `Engine.segment` runs one in-memory volume (`segmentation`), `Engine.segment_files`
files and folders (`cases.run`).

Sharing and lifetime. One engine may serve many threads at once: every backend's predictor is
safe to call concurrently (ONNX Runtime sessions are; OpenVINO and TensorRT take one infer request
or execution context per concurrent call from a pool). `close()`, or leaving `with
load_engine(...) as engine:`, frees what the backend holds; a closed engine refuses to segment.
An engine pickles as its directory plus the options it was opened with and is opened again (and
verified again) where it is unpickled: what multiprocessing and Ray need.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nnslim.compiler.runtime.window.config import Predictor
from nnslim.compiler.runtime.backends import BACKENDS, OpenRequest, open_predictor
from nnslim.compiler.runtime.backends.choice import RuntimeChoice, resolve_runtime, runtime_choices
from nnslim.compiler.runtime.backends.devices import DEVICE_CHOICES, detect_device
from nnslim.compiler.runtime.manifest import (
    EngineManifest,
    ModelSpec,
    load_manifest,
    read_verified,
)
from nnslim.compiler.runtime.safety import check_sha256, check_threads
from nnslim.compiler.runtime.segmentation import InferenceOptions, prepare_volume, segment_prepared
from nnslim.compiler.runtime.volumes.volume import label_map, volume_from_array
from nnslim.errors import EngineError, InputError

__all__ = ["Engine", "InferenceOptions", "ModelSpec", "load_engine"]

logger = logging.getLogger(__name__)


@dataclass
class Engine:
    """A verified engine directory, opened on this machine.

    Attributes:
        directory: the engine directory.
        manifest: its manifest (`manifest.EngineManifest`).
        spec: what the runtime needs of the model (`manifest.spec`).
        predictor: the opened model, `tiles -> logits`.
        runtime: how it runs here (None: a predictor the caller supplied).
        device: where it runs: "cpu" or "cuda".
        opened_with: the `load_engine` options it was asked for (what a pickle carries, so the other
            side makes its own choices, e.g. of `device="auto"`; None: assembled by hand, and then
            it cannot be pickled).

    Safe to share between threads; `close()` (or a `with` block) frees the backend's memory.
    """

    directory: Path
    manifest: EngineManifest
    spec: ModelSpec
    predictor: Predictor
    runtime: RuntimeChoice | None = None
    device: str = "cpu"
    opened_with: dict[str, Any] | None = field(default=None, repr=False)

    def close(self) -> None:
        """Free what the backend holds (sessions, compiled models, GPU memory); later calls to
        `segment` raise EngineError. Closing twice is fine."""
        predictor, self.predictor = self.predictor, _Closed(self.directory)
        if hasattr(predictor, "close"):
            predictor.close()

    @property
    def closed(self) -> bool:
        return isinstance(self.predictor, _Closed)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled as "this directory, these options": unpickling opens (and verifies) it again."""
        if self.opened_with is None:
            raise EngineError("this Engine was assembled from a predictor, not opened with load_engine, so it cannot "
                              "be pickled; pass the engine directory and open it with load_engine where it is used")
        return _reopen, (str(self.directory), self.opened_with)

    def segment(self, image: Any, spacing: tuple[float, float, float] | str | None = None,
                options: InferenceOptions | None = None, return_probabilities: bool = False,
                axis_order: str = "nibabel", previous_stage: Any = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Labels for an in-memory image, with the same numerics as `nnslim infer` and no file I/O.

        Args:
            image: numpy or torch, in `axis_order`: "nibabel" (default) `[X, Y, Z]` or `[C, X, Y, Z]`,
                the array nibabel gives for a NIfTI file; "sitk" (also "nnunet") `[Z, Y, X]` or
                `[C, Z, Y, X]`, the array SimpleITK's `GetArrayFromImage` gives and nnU-Net's
                `predict_single_npy_array` takes.
            spacing: voxel size in mm along the image's axes, in the same order: nibabel's
                `header.get_zooms()[:3]`, or SimpleITK's `GetSpacing()[::-1]` (nnU-Net's
                `properties["spacing"]`). Required: "engine" asks for the engine's training
                spacing (no resampling) by name; None is an error, never silently a guess.
            options: window settings (default: no progress bar).
            return_probabilities: also return the class probabilities (`probabilities` module).
            previous_stage: a cascade engine's other input, the previous stage's label map in the
                image's axis order and shape (`[X, Y, Z]`, or `[Z, Y, X]` for "sitk"); required for
                a cascade (`spec.previous_stage`), refused otherwise.

        Returns:
            uint8 labels in the image's axis order (`[X, Y, Z]`, or `[Z, Y, X]` for "sitk"); with
            `return_probabilities`, `(labels, probabilities)`, float16 `[K, *labels.shape]`
            whose argmax over K is the labels (ties aside; before the post-processing steps an
            engine built with `--postprocessing` applies to the labels).

        Raises:
            InputError: what `nnslim infer` refuses too (wrong channels, NaN voxels, a voxel size
                outside (0, 1e4] mm or one that resamples an axis to nothing, a case that would not
                fit in memory: `segmentation.check_fits`), a missing spacing or an unknown axis order.
        """
        reverse = _reversed_axes(axis_order)
        spacing = self._spacing(spacing, reverse)
        if reverse:  # to nibabel's order, which the engine's preprocessing starts from
            image = _reverse_spatial(image)
        volume = volume_from_array(image, spacing, self.spec.image_channels)
        volume.previous_stage = self._previous_stage(previous_stage, tuple(volume.data.shape[1:]), reverse)
        result = segment_prepared(prepare_volume(volume, self.spec), volume.name, self.predictor, self.spec,
                                  options or InferenceOptions(progress=False), return_probabilities)
        labels, probabilities = result.labels, result.probabilities
        if reverse:
            labels = np.ascontiguousarray(labels.transpose(2, 1, 0))
            probabilities = None if probabilities is None else probabilities.transpose(0, 3, 2, 1)
        return (labels, probabilities) if return_probabilities else labels

    def predict_single_npy_array(self, input_image: np.ndarray, image_properties: dict,
                                 segmentation_previous_stage: Any = None, output_file_truncated: Any = None,
                                 save_or_return_probabilities: bool = False) -> Any:
        """nnU-Net's `nnUNetPredictor.predict_single_npy_array`: `input_image` `[C, Z, Y, X]` as
        SimpleITK reads it, `image_properties["spacing"]` `[sz, sy, sx]`; returns the labels `[Z, Y, X]`
        (and float16 probabilities `[K, Z, Y, X]` with `save_or_return_probabilities`). Writing files
        is nnU-Net's alone (`output_file_truncated` is refused). A cascade engine takes
        `segmentation_previous_stage`, `[Z, Y, X]` or `[1, Z, Y, X]` as nnU-Net's `read_seg` gives it."""
        if output_file_truncated is not None:
            raise InputError("predict_single_npy_array: writing files (output_file_truncated) is not supported; "
                             "segment, then write the result yourself")
        if not isinstance(image_properties, dict) or "spacing" not in image_properties:
            raise InputError("predict_single_npy_array needs image_properties['spacing'] ([sz, sy, sx] in mm), as "
                             "nnU-Net's SimpleITKIO.read_images returns it")
        previous = segmentation_previous_stage
        if previous is not None and np.ndim(previous) == 4:
            previous = np.asarray(previous)[0]
        return self.segment(input_image, tuple(image_properties["spacing"]), axis_order="sitk",
                            return_probabilities=save_or_return_probabilities, previous_stage=previous)

    def _previous_stage(self, labels: Any, shape: tuple[int, ...], reverse: bool) -> np.ndarray | None:
        """`segment`'s `previous_stage` as int16 `[X, Y, Z]`, checked against the engine and the image."""
        stage = self.spec.previous_stage
        if stage is None:
            if labels is not None:
                raise InputError("previous_stage is given, but this engine is not a cascade stage; leave it out")
            return None
        if labels is None:
            raise InputError(f"this engine is a cascade stage: pass previous_stage, the label map its previous stage "
                             f"({stage.get('configuration', 'another configuration')}) gave for this image")
        try:
            labels = np.asarray(labels.detach().cpu().numpy() if hasattr(labels, "detach") else labels)
        except (TypeError, ValueError) as exc:  # ragged nested lists, odd objects
            raise InputError(f"previous_stage is not an array ({exc}); pass the label map as a numpy array") from None
        if reverse and labels.ndim == 3:
            labels = labels.transpose(2, 1, 0)
        numeric = np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)
        if labels.shape != shape or not numeric:
            raise InputError(f"previous_stage has shape {labels.shape} and type {labels.dtype}; expected a label map of "
                             f"integers shaped like the image, {shape if not reverse else shape[::-1]}")
        return label_map(labels, "previous_stage")

    def _training_spacing(self) -> tuple[float, ...]:
        """The engine's training spacing along nibabel's axes: the manifest records it in the network's
        axis order (an nnU-Net model's: reversed and transposed), so it is mapped back."""
        from nnslim.compiler.runtime.preprocessing import model_axes

        recorded = tuple(float(v) for v in (self.spec.spacing or ()))
        if not recorded:
            return (1.0, 1.0, 1.0)
        if len(recorded) != 3:
            raise InputError(f"this engine's training spacing {recorded} names two axes (a 2D model); pass the "
                             "scan's voxel size as spacing")
        order = model_axes(self.spec.preprocessing or {})  # network axis i is nibabel axis order[i]
        spacing = [0.0, 0.0, 0.0]
        for network_axis, image_axis in enumerate(order):
            spacing[image_axis] = recorded[network_axis]
        return tuple(spacing)

    def _spacing(self, spacing: Any, reverse: bool) -> tuple[float, ...]:
        """The voxel size in nibabel's axis order (`segment`)."""
        if isinstance(spacing, str) and spacing == "engine":
            return self._training_spacing()
        if spacing is None or isinstance(spacing, str):
            raise InputError(f"spacing is {spacing!r}: pass the voxel size in mm along the image's axes (nibabel: "
                             "header.get_zooms()[:3]; axis_order='sitk': GetSpacing()[::-1]), or spacing='engine' for "
                             f"the engine's training spacing {tuple(self.spec.spacing) if self.spec.spacing else '(none: 1 mm)'}")
        spacing = tuple(float(v) for v in spacing)
        return spacing[::-1] if reverse else spacing

    def segment_files(self, inputs: list[Path], output: Path, **kwargs: Any) -> list:
        """`nnslim infer` from Python: see `nnslim.compiler.runtime.cases.run.segment_files`."""
        from nnslim.compiler.runtime.cases.run import segment_files

        return segment_files(self, inputs, output, **kwargs)


AXIS_ORDERS = {"nibabel": False, "sitk": True, "nnunet": True}  # name -> the spatial axes are reversed


def _reversed_axes(axis_order: str) -> bool:
    if axis_order not in AXIS_ORDERS:
        raise InputError(f"axis_order must be one of {tuple(AXIS_ORDERS)}, got {axis_order!r}")
    return AXIS_ORDERS[axis_order]


def _reverse_spatial(image: Any) -> Any:
    """`[Z, Y, X]` or `[C, Z, Y, X]` (numpy or torch) with its spatial axes reversed."""
    ndim = image.ndim
    if ndim not in (3, 4):
        raise InputError(f"image has shape {tuple(image.shape)}; expected [Z, Y, X] or [C, Z, Y, X]")
    order = (2, 1, 0) if ndim == 3 else (0, 3, 2, 1)
    return image.permute(*order) if hasattr(image, "permute") else np.transpose(image, order)


def load_engine(engine_dir: str | Path, threads: int = 0, device: str = "cpu", ort_tensorrt: bool = False,
                backend: str | None = None, precision: str | None = None, expected_sha256: str | None = None) -> Engine:
    """Verify an engine directory and open its runtime model.

    The engine records how its build chose to run it (`selection` in the manifest); `backend` /
    `precision` override that choice. When the recorded backend or CPU feature is missing here, the
    next choice that passed its parity gate at build time is used, and a warning says so.

    Args:
        threads: CPU threads (0: the backend's default, one per core).
        device: "cpu", "cuda" (ONNX graphs on ONNX Runtime's CUDA execution provider, I/O
            binding) or "auto" (the GPU when the engine's backend can use one here, else the CPU:
            `backends.devices.pick_device`; the choice is logged and kept in `Engine.device`).
            Engines whose artifact runs on a GPU only (a TensorRT plan) always use the GPU.
        ort_tensorrt: with device "cuda", put ONNX Runtime's TensorRT execution provider first.
        expected_sha256: the sha256 of `manifest.json` a deployment pinned (`nnslim inspect` prints
            it): the files are verified against the manifest, and the manifest against this.
    """
    engine_dir = Path(engine_dir)
    requested = {"threads": threads, "device": device, "ort_tensorrt": ort_tensorrt, "backend": backend,
                 "precision": precision, "expected_sha256": expected_sha256}  # what a pickle re-opens with
    if device not in DEVICE_CHOICES:
        raise InputError(f"device must be one of {DEVICE_CHOICES}, got {device!r}")
    threads = check_threads(threads)  # ONNX Runtime crashes on absurd counts: refuse them first
    if expected_sha256 is not None:
        expected_sha256 = check_sha256(expected_sha256)  # a mistyped pin is not a changed engine
    manifest = load_manifest(engine_dir, expected_sha256=expected_sha256)
    if device == "auto":
        offered = [c.backend for c in runtime_choices(manifest) if precision in (None, c.precision)]
        device, why = detect_device([backend] if backend else offered)
        logger.info("--device auto: %s (%s)", device, why)
    choice, note = resolve_runtime(manifest, backend, precision, device)
    if note:
        logger.warning("%s: %s", engine_dir, note)
    spec = manifest.spec
    request = OpenRequest(engine_dir / choice.model, spec.input_name, spec.output_name, choice.precision, threads,
                          ort_tensorrt, manifest, model_bytes=read_verified(engine_dir, manifest, choice.model))
    predictor = open_predictor(choice.backend, request)
    where = BACKENDS[choice.backend].device if choice.backend in BACKENDS else device
    return Engine(engine_dir, manifest, spec, predictor, choice, where, opened_with=requested)


def _reopen(directory: str, options: dict[str, Any]) -> Engine:
    """Unpickling an Engine: open its directory again with the same options."""
    return load_engine(directory, **options)


class _Closed:
    """The predictor of a closed engine: any call is a clear error."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __call__(self, tiles: Any) -> Any:
        raise EngineError(f"the engine {self.directory} was closed; open it again with load_engine")
