"""Load an engine directory and segment volumes with it.

This is the whole deployment side: an engine directory (manifest + model file) and this package
are enough; nothing here imports `training` or the build stages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from nnslim.compiler.runtime.backends import (
    BACKENDS,
    OpenRequest,
    RuntimeChoice,
    open_predictor,
    resolve_runtime,
    runtime_choices,
)
from nnslim.compiler.runtime.batch import BatchOptions, CaseLog, Stages, run_cases
from nnslim.compiler.runtime.case_plan import plan_and_skip
from nnslim.compiler.runtime.case_stages import CaseResult, CaseStages, previews_folder
from nnslim.compiler.runtime.devices import DEVICE_CHOICES, detect_device
from nnslim.compiler.runtime.errors import EngineError, InputError, NnslimError
from nnslim.compiler.runtime.manifest import (
    TamperedEngineError,
    manifest_digest,
    read_manifest,
    rebuild_hint,
)
from nnslim.compiler.runtime.model_spec import ModelSpec
from nnslim.compiler.runtime.segmentation import (
    InferenceOptions,
    Segmentation,
    prepare_volume,
    segment_prepared,
    segment_volume,
    window_config,
)

__all__ = ["BatchOptions", "CaseResult", "Engine", "InferenceOptions", "ModelSpec", "Segmentation", "load_engine",
           "prepare_volume", "segment_files", "segment_prepared", "segment_volume", "window_config"]
from nnslim.compiler.runtime.volume_io import volume_from_array

logger = logging.getLogger(__name__)


@dataclass
class Engine:
    directory: Path
    manifest: dict[str, Any]
    spec: ModelSpec
    predictor: Callable[[torch.Tensor], torch.Tensor]
    runtime: RuntimeChoice | None = None  # how it runs here (None: a predictor the caller supplied)
    device: str = "cpu"  # where it runs: "cpu" or "cuda" (--device auto resolved, a TensorRT plan on the GPU)

    def segment(self, image: np.ndarray | torch.Tensor, spacing: tuple[float, float, float] | None = None,
                options: InferenceOptions | None = None,
                return_probabilities: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Labels for an in-memory image, with the same numerics as `nnslim infer` and no file I/O.

        Args:
            image: `[X, Y, Z]` (one channel) or `[C, X, Y, Z]`, numpy or torch, in the array axes
                nibabel gives for the scan.
            spacing: voxel size in mm along those axes (None: the engine's training spacing, or 1 mm).
            options: window settings (default: no progress bar).
            return_probabilities: also return the class probabilities (`probabilities` module).

        Returns:
            uint8 labels `[X, Y, Z]`; with `return_probabilities`, `(labels, probabilities)` with
            float16 probabilities `[K, X, Y, Z]` whose argmax over K is the labels (ties aside).
        """
        volume = volume_from_array(image, spacing or self.spec.spacing or (1.0, 1.0, 1.0), self.spec.in_channels)
        result = segment_prepared(prepare_volume(volume, self.spec), volume.name, self.predictor, self.spec,
                                  options or InferenceOptions(progress=False), return_probabilities)
        return (result.labels, result.probabilities) if return_probabilities else result.labels


DEVICES = DEVICE_CHOICES


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
            `devices.pick_device`; the choice is logged and kept in `Engine.device`). TensorRT
            engines always run on the GPU.
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
    if device == "auto":
        offered = [c.backend for c in runtime_choices(manifest) if precision in (None, c.precision)]
        device, why = detect_device([backend] if backend else offered)
        logger.info("--device auto: %s (%s)", device, why)
    choice, note = resolve_runtime(manifest, backend, precision, device)
    if note:
        logger.warning("%s: %s", engine_dir, note)
    model_path = engine_dir / choice.model
    if choice.backend == "tensorrt":
        from nnslim.compiler.runtime.tensorrt_runtime import (
            check_compatibility,
            gpu_record,
            import_tensorrt,
        )

        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise EngineError(f"{engine_dir} holds a TensorRT plan, which needs a CUDA GPU; "
                              f"{rebuild_hint(manifest)} --backend onnxruntime")
        check_compatibility(manifest, trt.__version__, tuple(gpu_record()["compute_capability"]), rebuild_hint(manifest))
    request = OpenRequest(model_path, spec.input_name, spec.output_name, choice.precision, threads, ort_tensorrt)
    predictor = open_predictor(choice.backend, request)
    where = BACKENDS[choice.backend].device if choice.backend in BACKENDS else device  # a TensorRT plan: the GPU
    return Engine(engine_dir, manifest, spec, predictor, choice, where)


def segment_files(
    engine: Engine,
    inputs: list[Path],
    output: Path,
    options: InferenceOptions = InferenceOptions(),
    predictor: Callable[[torch.Tensor], torch.Tensor] | None = None,
    existing: str = "refuse",
    on_case: Callable[[CaseResult], None] | None = None,
    part: tuple[int, int] = (0, 1),
    batch: BatchOptions = BatchOptions(),
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
        on_case: called with each case's result as soon as it is written (or has failed), in case
            order, one at a time (from a writer thread with overlapped I/O; not for cases --continue
            skips).
        part: `(part_id, num_parts)`: this process's share of a folder (`case_plan.plan_cases`).
        batch: overlapped I/O, probabilities, previews and the JSONL log (`batch.BatchOptions`).

    Returns the results of the cases run. In folder mode a case that cannot be read, segmented or
    written is reported (its `error`) and the others go on; a single case's error is raised.
    """
    inputs, output = [Path(p) for p in inputs], Path(output)
    plans, skipped = plan_and_skip(inputs, output, existing, part)
    folder = any(p.target != output for p in [*plans, *skipped])  # outputs inside OUTPUT (a DICOM folder is one case)
    cases = CaseStages(engine, predictor or engine.predictor, options, batch, previews_folder(output, folder, batch))
    if folder and existing == "refuse":
        cases.refuse_existing(plans)
    every = [*plans, *skipped]
    log = CaseLog(batch.log_jsonl, [f for c in every for f in c.files], cases.outputs(every)) if batch.log_jsonl else None
    try:
        with tqdm(total=len(every), unit="case", desc="cases", disable=None if folder and options.progress else True) as bar:
            report = _reporter(cases, log, on_case, bar)
            for plan in skipped:
                report(cases.skipped(plan), 0.0)
            try:
                results = run_cases(plans, Stages(cases.read, cases.compute, cases.write, cases.failed),
                                    batch.io_workers if folder else 0, report, (NnslimError, OSError) if folder else ())
            except (NnslimError, OSError) as exc:  # one case: its error is the command's; the log says so too
                if log is not None:
                    log.write(cases.failed(plans[0], exc).record())
                raise
    finally:
        if log is not None:
            log.close()
    if folder:
        cases.write_index()
    return results


def _reporter(cases: CaseStages, log: CaseLog | None, on_case: Callable[[CaseResult], None] | None,
              bar: tqdm) -> Callable[[CaseResult, float], None]:
    """What happens when a case is done (in case order, one case at a time): its log line, the bar,
    and the caller's `on_case`, printed above the progress bars rather than through them."""

    def report(result: CaseResult, seconds: float) -> None:
        result.seconds = seconds
        if result.error:  # one bad case must not stop a folder: reported, nothing written for it
            logger.error("%s failed: %s", result.name, result.error)
        cases.reported(result)
        bar.update(1)
        if log is not None:
            log.write(result.record())
        if on_case is not None and result.status != "skipped":
            with tqdm.external_write_mode():
                on_case(result)

    return report
