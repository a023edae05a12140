"""One case of `run.segment_files`, file to file, as the three stages `batch.run_cases` overlaps.

- `read`: the header checks (`plan.check_case_fits`), the voxels and the preprocessing;
  only what the later stages need is kept (the prepared image, the reference geometry and, for a
  preview, the first channel), so the scan itself is freed before the network runs.
- `compute`: the sliding window (`segmentation.segment_prepared`), with probabilities if asked.
- `write`: probabilities (`CASE.npz`) and the preview first, the label map last, each atomically:
  an existing label map means the whole case was written, which is what `--continue` relies on.
  A write that fails removes what it had written of its case.

A case that fails has no output. Under `--overwrite` that includes the output an earlier run left:
the user consented to replacing it, and kept beside this run's results it would pass for one of
them (and `--continue` would skip the case); the failure's message says it was removed.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nnslim.compiler.runtime.window.config import Predictor
from nnslim.compiler.runtime.cases.batch import BatchOptions
from nnslim.compiler.runtime.cases.plan import CasePlan, check_case_fits
from nnslim.compiler.runtime.cases.provenance import RunInfo, iso, read_case_record, write_case_record
from nnslim.errors import InputError, NnslimError
from nnslim.compiler.runtime.manifest import ModelSpec
from nnslim.compiler.runtime.preprocessing import Prepared
from nnslim.compiler.runtime.probabilities import (
    PROBABILITIES_SUFFIX,
    check_probabilities_supported,
    save_probabilities,
)
from nnslim.compiler.runtime.segmentation import (
    InferenceOptions,
    Segmentation,
    prepare_volume,
    segment_prepared,
    window_config,
)
from nnslim.compiler.runtime.nnunet import files as nnunet_files
from nnslim.compiler.runtime.nnunet.files import crop_record
from nnslim.compiler.runtime.volumes.header import Geometry
from nnslim.compiler.runtime.safety import printable
from nnslim.compiler.runtime.volumes.layout import beside
from nnslim.compiler.runtime.volumes.volume import Volume, load_volume, previous_stage_labels, save_segmentation

logger = logging.getLogger(__name__)


@dataclass
class CaseResult:
    name: str
    output: Path
    shape: tuple[int, ...]
    seconds: float  # read + compute + write (with overlapped I/O: the durations of its own stages)
    tiles: int  # network calls: windows evaluated x mirror passes
    windows: dict[str, int] = field(default_factory=dict)  # WindowReport
    label_voxels: dict[str, int] = field(default_factory=dict)
    error: str | None = None  # why this case failed (its output was not written); None: it succeeded
    status: str = "ok"  # "ok", "failed" (see error) or "skipped" (--continue: its output existed)
    probabilities: Path | None = None  # CASE.npz, with --save-probabilities
    preview: Path | None = None  # the PNG, with --preview
    started: float | None = None  # when its read began (time.time()); None: not run

    def record(self) -> dict[str, Any]:
        """The case's line of `--log-jsonl` (`log.LOG_FIELDS`; the run's fields are added by the log)."""
        return {"case": self.name, "status": self.status, "seconds": round(self.seconds, 3),
                "windows": self.windows or None, "tiles": self.tiles, "output": str(self.output),
                "probabilities": self.probabilities and str(self.probabilities),
                "preview": self.preview and str(self.preview), "error": self.error,
                "started": iso(self.started) if self.started else None}


@dataclass
class _Read:
    started: float
    name: str
    geometry: Geometry  # what the outputs copy
    spacing: tuple[float, ...]
    image: np.ndarray | None  # the first channel, for the preview
    prepared: Prepared


@dataclass
class _Computed:
    started: float
    name: str
    geometry: Geometry
    spacing: tuple[float, ...]
    image: np.ndarray | None
    segmentation: Segmentation
    crop: dict[str, Any] = field(default_factory=dict)  # nnU-Net's crop keys (`nnunet_files.crop_record`)


def read_previous_stage(folder: Path | None, plan: CasePlan, volume: Volume) -> np.ndarray:
    """A cascade's previous-stage segmentation of this case: the file of the case's output name in
    `folder` (nnU-Net's rule: CASE + the dataset's file ending, as the previous stage wrote it)."""
    if folder is None:
        raise InputError("this engine is a cascade stage: pass the folder of its previous stage's segmentations "
                         "(nnslim infer --previous-stage FOLDER; nnslim-predict-nnunet -prev_stage_predictions FOLDER)")
    return previous_stage_labels(Path(folder) / plan.target.name, tuple(volume.data.shape[1:]))


def previews_folder(output: Path, folder: bool, batch: BatchOptions) -> Path | None:
    """Where previews go: `OUTPUT/previews/` for a folder, beside the output file for one case."""
    if not batch.preview:
        return None
    return output / "previews" if folder else output.parent


class CaseStages:
    """The stages of one engine's cases, and the preview index entries of those reported."""

    def __init__(self, spec: ModelSpec, predictor: Predictor, options: InferenceOptions, batch: BatchOptions,
                 previews: Path | None, replace: bool = False, provenance: RunInfo | None = None) -> None:
        """`replace`: existing outputs are being replaced (folder mode, --overwrite): a failed case's are
        removed. `provenance`: write each case's record (`provenance`) after its label map."""
        self.spec, self.replace, self.provenance = spec, replace, provenance
        self.predictor, self.options, self.batch, self.previews = predictor, options, batch, previews
        self.passes = 2 ** len(window_config(spec, options).mirror_axes)  # also fails early on a bad batch
        self.index: list[dict[str, Any]] = []
        self._drawing = threading.Lock()  # pyplot keeps global state: one figure at a time across writers
        if batch.save_probabilities:
            check_probabilities_supported(spec.postprocessing)  # before the first case, not in each
        if batch.previous_stage is not None and spec.previous_stage is None:
            raise InputError("a previous stage's segmentations were given, but this engine is not a cascade stage; "
                             "leave out --previous-stage")
        if previews is not None:
            from nnslim.compiler.runtime.volumes.preview import import_pyplot

            import_pyplot()  # a missing plotting extra is one clear error before the first case

    def for_predictor(self, predictor: Predictor) -> CaseStages:
        """The same stages with another predictor (a Ray actor's own engine): what a pickle carries
        is everything but the predictor and the drawing lock."""
        clone = CaseStages.__new__(CaseStages)
        clone.__dict__.update({**self.__dict__, "predictor": predictor, "index": [], "_drawing": threading.Lock()})
        return clone

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("predictor", "_drawing")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, predictor=None, _drawing=threading.Lock())

    def preview_path(self, plan: CasePlan) -> Path | None:
        if self.previews is None:
            return None
        return self.previews / beside(plan.target, ".png").name

    def wanted(self, plan: CasePlan) -> dict[str, Path | None]:
        """The outputs besides the label map that this run asks for, by kind (None: not asked for)."""
        npz = beside(plan.target, PROBABILITIES_SUFFIX) if self.batch.save_probabilities else None
        return {"probabilities": npz, "preview": self.preview_path(plan)}

    def outputs(self, plans: list[CasePlan]) -> list[Path]:
        """Every file the run may write for `plans` (the label maps, probabilities and previews)."""
        paths = [p.target for p in plans]
        if self.batch.save_probabilities:
            paths += [beside(p.target, PROBABILITIES_SUFFIX) for p in plans]
        return paths + [self.preview_path(p) for p in plans if self.previews is not None]

    def refuse_existing(self, plans: list[CasePlan]) -> None:
        """Folder mode without --overwrite/--continue: probabilities or previews already there (and no
        label map, which `plan` checked) are someone's files: refused, like existing label maps."""
        present = [p for p in self.outputs(plans) if p.exists() and p not in {plan.target for plan in plans}]
        if present:
            raise InputError(f"{len(present)} probability or preview file(s) already exist (e.g. {present[0]}); pass "
                             "--overwrite to replace them or write to another output folder")

    def read(self, plan: CasePlan) -> _Read:
        started = time.time()
        if plan.problem:
            raise InputError(plan.problem)
        check_case_fits(plan, self.spec)  # headers only, before allocating
        volume = load_volume(plan.files, self.spec.image_channels)
        if self.spec.previous_stage is not None:
            volume.previous_stage = read_previous_stage(self.batch.previous_stage, plan, volume)
        image = np.array(volume.data[0]) if self.previews is not None else None
        return _Read(started, volume.name, volume.geometry, volume.spacing, image, prepare_volume(volume, self.spec))

    def compute(self, plan: CasePlan, read: _Read) -> _Computed:
        segmentation = segment_prepared(read.prepared, read.name, self.predictor, self.spec, self.options,
                                        self.batch.save_probabilities, self.batch.label_steps)
        prepared = read.prepared
        return _Computed(read.started, read.name, read.geometry, read.spacing, read.image, segmentation,
                         crop_record(prepared.full_shape, prepared.box, prepared.cropped_shape))

    def write(self, plan: CasePlan, computed: _Computed) -> CaseResult:
        labels, report = computed.segmentation.labels, computed.segmentation.report
        result = CaseResult(name=computed.name, output=plan.target, shape=labels.shape, seconds=0.0,
                            tiles=report.evaluated * self.passes, windows=report.to_dict(),
                            label_voxels=self._label_voxels(labels), started=computed.started)
        try:
            if computed.segmentation.probabilities is not None:
                result.probabilities = self._save_probabilities(plan, computed)
            result.preview = self._preview(plan, computed)
            result.output = save_segmentation(labels, computed.geometry, plan.target)
        except BaseException:  # a failed case has no output: not half of one either
            for path in (result.probabilities, result.preview):
                if path is not None:
                    path.unlink(missing_ok=True)
            raise
        logger.info("%s -> %s", computed.name, result.output)
        if self.provenance is not None:
            self._record(plan, result, computed.started)
        return result

    def _save_probabilities(self, plan: CasePlan, computed: _Computed) -> Path:
        """`CASE.npz` in the asked format (`BatchOptions.probabilities_format`); nnU-Net's brings `CASE.pkl`."""
        npz = beside(plan.target, PROBABILITIES_SUFFIX)
        if self.batch.probabilities_format != "nnunet":
            return save_probabilities(computed.segmentation.probabilities, npz)
        reader = str((self.spec.preprocessing or {}).get("image_reader_writer") or "SimpleITKIO")
        try:
            return nnunet_files.save(computed.segmentation.probabilities,
                                     nnunet_files.properties(computed.geometry, computed.crop, reader), npz)[0]
        except BaseException:
            npz.with_suffix(".pkl").unlink(missing_ok=True)
            raise

    def _record(self, plan: CasePlan, result: CaseResult, started: float) -> None:
        """The case's record; the label map is whole without it (a missing record only means that
        --continue segments the case again), so failing to write it is a warning."""
        outputs = {"labels": result.output, "probabilities": result.probabilities, "preview": result.preview}
        try:
            asked = [kind for kind, path in self.wanted(plan).items() if path is not None]
            write_case_record(plan.target, self.provenance, outputs, started, time.time() - started, asked)
        except OSError as exc:
            logger.warning("no record for %s (%s): --continue will segment it again", printable(result.name), exc)

    def failed(self, plan: CasePlan, exc: BaseException) -> CaseResult:
        """The failed case's result; under `replace`, its earlier outputs are removed (module docstring)."""
        error = f"{type(exc).__name__}: {exc}"
        removed = self._remove_earlier_outputs(plan) if self.replace else ""
        return CaseResult(name=plan.name, output=plan.target, shape=(), seconds=0.0, tiles=0,
                          error=error + removed, status="failed")

    def _remove_earlier_outputs(self, plan: CasePlan) -> str:
        """Remove what an earlier run wrote for a case that failed now; what to add to its error."""
        removed, kept = [], []
        from nnslim.compiler.runtime.cases.provenance import record_path

        record_path(plan.target).unlink(missing_ok=True)  # nnslim's own record of the output removed below
        for path in self.outputs([plan]):
            if not (path.is_file() or path.is_symlink()):
                continue
            try:
                path.unlink()
                removed.append(path.name)
            except OSError as exc:
                kept.append(f"{path.name} ({exc.strerror or exc})")
        note = ""
        if removed:
            names = ", ".join(map(printable, removed))
            note += (f"; its earlier output ({names}) was removed, as --overwrite allowed, so that no earlier "
                     "result stands in for it")
        if kept:
            note += (f"; its earlier output could not be removed: {', '.join(map(printable, kept))}: delete it "
                     "before using this folder")
        return note

    def skipped(self, plan: CasePlan) -> CaseResult:
        return CaseResult(name=plan.name, output=plan.target, shape=(), seconds=0.0, tiles=0, status="skipped")

    def reported(self, result: CaseResult) -> None:
        """Note a reported case for the preview index (a skipped case shows its earlier preview)."""
        if self.previews is None:
            return
        png = result.preview or self.previews / beside(result.output, ".png").name
        status, seconds = result.status, result.seconds
        earlier = read_case_record(result.output) if status == "skipped" else None
        if earlier is not None:  # written by an earlier run of this engine: say so, with its time
            status, seconds = f"ok (earlier run, {earlier.get('finished')})", earlier.get("seconds")
        self.index.append({"case": result.name, "status": status, "seconds": seconds,
                           "png": png.name if png.is_file() else None})

    def write_index(self, suffix: str = "") -> Path | None:
        """`previews/index{suffix}.html` and its entries as `.json` (what `nnslim report` merges)."""
        if self.previews is None or not self.index:
            return None
        import json

        from nnslim.compiler.runtime.volumes.preview import write_preview_index
        from nnslim.files import write_text_atomic

        write_text_atomic(self.previews / f"index{suffix}.json", json.dumps(self.index, indent=1) + "\n")
        return write_preview_index(self.previews, self.index, f"index{suffix}.html")

    def _preview(self, plan: CasePlan, computed: _Computed) -> Path | None:
        """The case's PNG; a preview that cannot be drawn is a warning, not a failed case."""
        path = self.preview_path(plan)
        if path is None:
            return None
        from nnslim.compiler.runtime.volumes.preview import write_case_preview

        try:
            with self._drawing:
                return write_case_preview(computed.image, computed.segmentation.labels, computed.spacing, path,
                                          computed.name, list(self.spec.label_names))
        except (NnslimError, OSError, ValueError) as exc:
            logger.warning("no preview for %s: %s", computed.name, exc)
            return None

    def _label_voxels(self, labels: np.ndarray) -> dict[str, int]:
        """Voxels per label, by name when labels are the output heads (argmax), else by value."""
        counts = np.bincount(labels.ravel(), minlength=self.spec.num_classes)
        if self.spec.postprocessing.get("kind", "argmax") == "argmax":
            return {name: int(c) for name, c in zip(self.spec.label_names, counts)}
        return {f"label {value}": int(c) for value, c in enumerate(counts) if c}
