"""`segment_files`: a file, a case's channel files, or a folder of cases, to label maps.

What would lose data is refused before the first case runs (`plan`); each case then runs as the
three stages of `stages.CaseStages`, overlapped by `batch.run_cases`; each result is reported (a
line, the JSONL log, the progress bar) in case order as soon as it is written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Protocol

from tqdm import tqdm

from nnslim.compiler.runtime.window.config import Predictor
from nnslim.compiler.runtime.cases.batch import BatchOptions, Stages, run_cases
from nnslim.compiler.runtime.cases.log import CaseLog
from nnslim.compiler.runtime.cases.plan import plan_and_skip
from nnslim.compiler.runtime.cases.stages import CaseResult, CaseStages, previews_folder
from nnslim.compiler.runtime.manifest import ModelSpec
from nnslim.compiler.runtime.segmentation import InferenceOptions
from nnslim.errors import NnslimError

logger = logging.getLogger(__name__)


class SegmentsCases(Protocol):
    """What `segment_files` needs of an engine (`nnslim.compiler.runtime.engine.Engine` has it)."""

    spec: ModelSpec
    predictor: Predictor


def segment_files(
    engine: SegmentsCases,
    inputs: list[Path],
    output: Path,
    options: InferenceOptions = InferenceOptions(),
    predictor: Predictor | None = None,
    existing: str = "refuse",
    on_case: Callable[[CaseResult], None] | None = None,
    part: tuple[int, int] = (0, 1),
    batch: BatchOptions = BatchOptions(),
) -> list[CaseResult]:
    """Segment one file, or every case of a folder, and write label volumes.

    What would lose data is refused before the first case runs (`plan`): no output may be an input,
    and existing outputs need an explicit choice. Each case's header is checked before its voxels.

    Args:
        engine: the loaded engine (its spec drives preprocessing and the window).
        inputs: a single file / the channel files of one case, or one folder.
        output: a file (single case) or a folder (folder input).
        options: window and TTA settings.
        predictor: run this instead of the engine's own (e.g. PyTorch, for parity).
        existing: folder mode, outputs that already exist: "refuse" (default), "overwrite"
            (replaced, each logged; a case that fails loses its earlier output too) or "continue"
            (those cases are skipped; refused for a single case, like a `part`: `plan.OptionConflict`).
        on_case: called with each case's result once written (or failed), in case order, one at a
            time (from a writer thread with overlapped I/O; not for cases --continue skips).
        part: `(part_id, num_parts)`: this process's share of a folder (`plan.plan_and_skip`).
        batch: overlapped I/O, probabilities, previews and the JSONL log (`batch.BatchOptions`).

    Returns the results of the cases run. In folder mode a case that cannot be read, segmented or
    written is reported (its `error`) and the others go on; a single case's error is raised.
    """
    inputs, output = [Path(p) for p in inputs], Path(output)
    plans, skipped = plan_and_skip(inputs, output, existing, part)
    folder = any(p.target != output for p in [*plans, *skipped])  # outputs inside OUTPUT (a DICOM folder is one case)
    cases = CaseStages(engine.spec, predictor or engine.predictor, options, batch, previews_folder(output, folder, batch),
                       replace=folder and existing == "overwrite")
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
