"""`segment_files`: a file, a case's channel files, or a folder of cases, to label maps.

What would lose data is refused before the first case runs (`plan`); each case then runs as the
three stages of `stages.CaseStages`, overlapped by `batch.run_cases`; each result is reported (a
line, the JSONL log, the progress bar) in case order as soon as it is written.

Provenance (`provenance`): JSON lines name the engine, version, backend, device and part; in folder
mode each written case gets a record, the run a `run.json` (`run-part{K}.json`), and --continue
segments again a case not shown to be this engine's whole result.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable, Protocol

from tqdm import tqdm

from nnslim.compiler.runtime.window.config import Predictor
from nnslim.compiler.runtime.cases.batch import BatchOptions, Stages, run_cases
from nnslim.compiler.runtime.cases.log import CaseLog
from nnslim.compiler.runtime.cases.plan import CasePlan, OptionConflict, plan_and_skip
from nnslim.compiler.runtime.cases.provenance import (
    RunInfo,
    now,
    read_case_record,
    run_info,
    stale_reason,
    write_run_record,
)
from nnslim.compiler.runtime.cases.stages import CaseResult, CaseStages, previews_folder
from nnslim.compiler.runtime.manifest import ModelSpec
from nnslim.compiler.runtime.segmentation import InferenceOptions
from nnslim.errors import NnslimError

logger = logging.getLogger(__name__)
ISOLATED = (NnslimError, OSError)  # in a folder, errors that fail their case only


class SegmentsCases(Protocol):
    """What `segment_files` needs of an engine (`nnslim.compiler.runtime.engine.Engine` has it)."""

    spec: ModelSpec
    predictor: Predictor


def segment_files(engine: SegmentsCases, inputs: list[Path], output: Path, options: InferenceOptions = InferenceOptions(),
                  predictor: Predictor | None = None, existing: str = "refuse",
                  on_case: Callable[[CaseResult], None] | None = None, part: tuple[int, int] = (0, 1),
                  batch: BatchOptions = BatchOptions(), runner: Runner | None = None) -> list[CaseResult]:
    """Segment one file, or every case of a folder, and write label volumes.

    What would lose data is refused before the first case runs (`plan`): no output may be an input,
    and existing outputs need an explicit choice. Each case's header is checked before its voxels.

    Args:
        engine: the loaded engine (its spec drives preprocessing and the window).
        inputs, output: one file or the channel files of one case, and a file; or a folder and a folder.
        options: window and TTA settings.
        predictor: run this instead of the engine's own (e.g. PyTorch, for parity).
        existing: folder mode, outputs that already exist: "refuse" (default), "overwrite"
            (replaced, each logged; a case that fails loses its earlier output too) or "continue"
            (those cases are skipped; refused for a single case, like a `part`: `plan.OptionConflict`).
        on_case: called with each case's result once written or failed, in case order, one at a time
            (from a writer thread with overlapped I/O; not for skipped cases).
        part: `(part_id, num_parts)`: this process's share of a folder (`plan.plan_and_skip`).
        batch: overlapped I/O, probabilities, previews and the JSONL log (`batch.BatchOptions`).
        runner: runs the cases of a folder (`local_runner`, the default; `ray_runner.RayRunner`).

    Returns the results of the cases run. In folder mode a case that cannot be read, segmented or
    written is reported (its `error`) and the others go on; a single case's error is raised.
    """
    started = time.time()
    inputs, output, info = [Path(p) for p in inputs], Path(output), _run_info(engine, part, predictor)
    plans, skipped = plan_and_skip(inputs, output, existing, part)
    folder = any(p.target != output for p in [*plans, *skipped])  # outputs inside OUTPUT (a DICOM folder is one case)
    if runner is not None and not folder:
        raise OptionConflict("--ray runs the cases of a folder on a cluster, but the input is one case; drop --ray, "
                             "or give the folder of cases")
    cases = CaseStages(engine.spec, predictor or engine.predictor, options, batch, previews_folder(output, folder, batch),
                       replace=folder and existing == "overwrite", provenance=info if folder else None)
    if folder and existing == "refuse":
        cases.refuse_existing(plans)
    plans, skipped = _recheck_skipped(cases, info, plans, skipped) if folder and info else (plans, skipped)
    every = [*plans, *skipped]
    records = [output / f"run{info.part_suffix}.json"] if folder and info else []  # nor the run's record
    log = CaseLog(batch.log_jsonl, [f for c in every for f in c.files], [*cases.outputs(every), *records]) \
        if batch.log_jsonl else None
    try:
        with tqdm(total=len(every), unit="case", desc="cases", disable=None if folder and options.progress else True) as bar:
            report = _reporter(cases, log, on_case, bar, info)
            for plan in skipped:
                report(cases.skipped(plan), 0.0)
            try:
                results = (runner if folder and runner else local_runner)(plans, cases, report, folder)
            except ISOLATED as exc:  # one case: its error is the command's; the log says so too
                if not folder and log is not None:  # in a folder it is no case's (a lost cluster, a full log disk)
                    log.write(_line(cases.failed(plans[0], exc), info))
                raise
    finally:
        if log is not None:
            log.close()
    if folder:
        cases.write_index(info.part_suffix if info else "")
        _write_run_record(output, info, results, len(skipped), _options_record(options, existing, batch), started)
    return results


class Runner(Protocol):
    """Runs `plans` through `cases`' stages, calls `report(result, seconds)` for each, returns the results."""

    def __call__(self, plans: list[CasePlan], cases: CaseStages, report: Callable[[CaseResult, float], None],
                 folder: bool) -> list[CaseResult]: ...


def local_runner(plans: list[CasePlan], cases: CaseStages, report: Callable[[CaseResult, float], None],
                 folder: bool) -> list[CaseResult]:
    """This process, I/O overlapped (`batch.run_cases`); in a folder, a case's error is its own."""
    return run_cases(plans, Stages(cases.read, cases.compute, cases.write, cases.failed),
                     cases.batch.io_workers if folder else 0, report, ISOLATED if folder else ())


def _write_run_record(output: Path, info: RunInfo | None, results: list[CaseResult], skipped: int, options: dict,
                      started: float) -> None:
    """OUTPUT/run.json (run-part{K}.json) when the folder holds this run's outputs (a run whose every
    case failed leaves the folder as it was: its JSON lines and messages say what happened)."""
    counts = {"ok": sum(not r.error for r in results), "failed": sum(bool(r.error) for r in results), "skipped": skipped}
    if info is not None and counts["ok"] + skipped:
        write_run_record(output, info, options, started, counts)


def _run_info(engine: SegmentsCases, part: tuple[int, int], predictor: Predictor | None) -> RunInfo | None:
    """Who writes the outputs (None: an engine assembled by hand, with no directory to name)."""
    if getattr(engine, "directory", None) is None:
        return None
    info = run_info(engine, part)
    return dataclasses.replace(info, backend="pytorch", precision="fp32") if predictor is not None else info


def _recheck_skipped(cases: CaseStages, info: RunInfo, plans: list[CasePlan],
                     skipped: list[CasePlan]) -> tuple[list[CasePlan], list[CasePlan]]:
    """--continue: cases whose output exists but is not this engine's whole result run again (a warning each)."""
    if not skipped:
        return plans, skipped
    again, unrecorded = [], []
    for plan in skipped:
        record = read_case_record(plan.target)
        if record is None:
            unrecorded.append(plan)
            continue
        reason = stale_reason(record, info, cases.wanted(plan))
        if reason is not None:
            logger.warning("%s: segmenting it again (--continue): %s", plan.name, reason)
            again.append(plan)
    if unrecorded:
        logger.warning("--continue: %d existing output(s) have no nnslim record of the engine that wrote them (e.g. "
                       "%s: an older nnslim's, another tool's, or put there by hand); kept, as --continue keeps "
                       "outputs; --overwrite would segment them again", len(unrecorded), unrecorded[0].target.name)
    if not again:
        return plans, skipped
    order = [*plans, *again]
    order.sort(key=lambda p: p.name)
    return order, [p for p in skipped if p not in again]


def _options_record(options: InferenceOptions, existing: str, batch: BatchOptions) -> dict:
    """The run's settings, names and numbers only (no paths: the record ships with the outputs)."""
    window = {k: v for k, v in dataclasses.asdict(options).items() if isinstance(v, (str, int, float, bool, type(None)))}
    return {**window, "existing": existing, "save_probabilities": batch.save_probabilities, "preview": batch.preview,
            "io_workers": batch.io_workers}


def _line(result: CaseResult, info: RunInfo | None) -> dict:
    """A case's JSON line: its record, when it was reported, and who wrote it."""
    return {**result.record(), "finished": now(), **(info.line_fields() if info else {})}


def _reporter(cases: CaseStages, log: CaseLog | None, on_case: Callable[[CaseResult], None] | None,
              bar: tqdm, info: RunInfo | None) -> Callable[[CaseResult, float], None]:
    """What happens when a case is done (in case order, one case at a time): its log line, the bar,
    and the caller's `on_case`, printed above the progress bars rather than through them."""

    def report(result: CaseResult, seconds: float) -> None:
        result.seconds = seconds
        if result.error:  # one bad case must not stop a folder: reported, nothing written for it
            logger.error("%s failed: %s", result.name, result.error)
        cases.reported(result)
        bar.update(1)
        if log is not None:
            log.write(_line(result, info))
        if on_case is not None and result.status != "skipped":
            with tqdm.external_write_mode():
                on_case(result)

    return report
