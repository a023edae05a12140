"""What an `infer` run will read and write, checked before any work starts.

- Inputs are never overwritten: an output that is an input (same path, a symlink or a hard
  link to it), or an output folder that is the input folder, is refused.
- Existing outputs in folder mode are an explicit choice (`EXISTING`): "refuse" (the default)
  names how many exist and the two flags; "overwrite" replaces them and logs each one (a case
  that then fails loses its old output too: `stages.CaseStages.failed`); "continue" skips the
  cases already written (nnU-Net's `--continue_prediction`).
- Options that cannot do anything are refused (`OptionConflict`, a usage error in the CLI):
  "continue" or a part for a single case, a part id outside the parts, a part with no case.
- A folder entry that cannot be a case (a symlink loop or a dangling link, a name with control
  characters that would forge lines of output) fails as its own case (`CasePlan.problem`), shown
  with its name escaped; the other cases run.
- Each case's header is read (not its voxels) and checked with `segmentation.check_fits`: the
  memory the case needs (the estimate is documented there) and a voxel size that would resample
  an axis to nothing are refused before any voxel is read.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from nnslim.errors import InputError, SettingsError
from nnslim.compiler.runtime.manifest import ModelSpec
from nnslim.compiler.runtime.safety import printable, same_file, symlink_loop, unprintable
from nnslim.compiler.runtime.segmentation import check_fits
from nnslim.compiler.runtime.volumes.layout import find_cases
from nnslim.compiler.runtime.volumes.readers import VOLUME_SUFFIXES, check_output_name, output_suffix
from nnslim.compiler.runtime.volumes.sitk import is_dicom_series
from nnslim.compiler.runtime.volumes.volume import read_header

logger = logging.getLogger(__name__)

EXISTING = ("refuse", "overwrite", "continue")


class OptionConflict(SettingsError):
    """Options that contradict each other or cannot do anything for these inputs (the CLI: a usage
    error, exit 2, since the command line itself is what must change)."""


@dataclass(frozen=True)
class CasePlan:
    name: str  # as printed: control characters escaped (`layout.printable`)
    files: list[Path]
    target: Path
    problem: str | None = None  # why this folder entry cannot be a case (it fails when read)


def is_folder_input(inputs: list[Path]) -> bool:
    """A folder of cases, rather than one case (a file, channel files, or one DICOM series folder)."""
    return len(inputs) == 1 and Path(inputs[0]).is_dir() and not is_dicom_series(Path(inputs[0]))


def plan_and_skip(inputs: list[Path], output: Path, existing: str = "refuse",
                  part: tuple[int, int] = (0, 1)) -> tuple[list[CasePlan], list[CasePlan]]:
    """Map inputs to output files and refuse anything that would lose data (module docstring).

    Args:
        part: `(part_id, num_parts)`: in folder mode, keep every num_parts-th case of the sorted
            list starting at part_id (nnU-Net's `-part_id/-num_parts`): parts are disjoint, cover
            the folder, and do not depend on which outputs already exist.

    Returns:
        The cases to segment, and the cases skipped because their output exists ("continue").
    """
    if existing not in EXISTING:
        raise InputError(f"existing outputs: choose one of {EXISTING}, got {existing!r}")
    part_id, num_parts = part
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise OptionConflict(f"--part-id must be in 0..{num_parts - 1} for --num-parts {num_parts}, got {part_id}")
    if unprintable(str(output)):  # printed on every case's line: it would forge lines of output
        raise InputError(f"the output path {printable(str(output))!r} holds control characters (a newline, tab or "
                         "escape sequence); choose a name without them")
    folder_mode = is_folder_input(inputs)
    if folder_mode:
        if output.name.endswith(VOLUME_SUFFIXES) or output.is_file():
            raise InputError(f"input {inputs[0]} is a folder, so the output must be a folder, got {output}")
        if same_file(output, inputs[0]):
            raise InputError(f"the output folder {output} is the input folder; the labels would overwrite the "
                             "scans; choose another output folder")
        plans = [_case_plan(case, files, output / f"{case}{output_suffix(files[0])}")
                 for case, files in find_cases(inputs[0]).items()]
        if part_id >= len(plans):
            raise OptionConflict(f"--num-parts {num_parts} --part-id {part_id}: {inputs[0]} holds {len(plans)} "
                                 f"case(s), so part {part_id} of {num_parts} has none (parts {len(plans)}.."
                                 f"{num_parts - 1} are empty); use --num-parts {len(plans)} or fewer")
        plans = plans[part_id::num_parts]
    else:
        _refuse_folder_options(existing, part)
        if output.is_dir():
            raise InputError(f"-o {output} is a folder, but a single case writes one file; "
                             f"give a file name such as {output / 'seg.nii.gz'}")
        check_output_name(output)
        plans = [_case_plan("case", list(inputs), output)]
    _refuse_inputs_as_outputs(plans)
    return _apply_existing(plans, existing) if folder_mode else (_note_replaced(plans, "refuse"), [])


def _refuse_folder_options(existing: str, part: tuple[int, int]) -> None:
    """One case: --continue and --num-parts/--part-id choose among a folder's cases, so they would do nothing."""
    if existing == "continue":
        raise OptionConflict("--continue skips the cases of a folder whose output exists, but the input is one case "
                             "(its output is -o); drop --continue, or give the folder of cases")
    if part != (0, 1):
        raise OptionConflict(f"--num-parts {part[1]} --part-id {part[0]} split a folder of cases, but the input is one "
                             "case; drop them, or give the folder of cases")


def _case_plan(case: str, files: list[Path], target: Path) -> CasePlan:
    """A case, or a folder entry that cannot be one (`CasePlan.problem`), its name escaped for printing."""
    problem = next((p for p in map(_entry_problem, files) if p), None)
    return CasePlan(printable(case), files, target, problem)


def _entry_problem(path: Path) -> str | None:
    """Why a file of a case cannot be read, when its name or its link already says so."""
    if unprintable(path.name):
        return (f"the file name '{printable(path.name)}' holds control characters (newline, escape, ...), which "
                "would forge lines of output and logs and pass into the output's name; rename the file")
    if not path.is_symlink() or path.exists():
        return None
    if symlink_loop(path):
        return (f"{printable(str(path))} is a symbolic link that loops back on itself (too many levels of links); "
                "fix or remove the link")
    return (f"{printable(str(path))} is a symbolic link to {printable(os.readlink(path))}, which does not exist; fix "
            "or remove the link")


def _refuse_inputs_as_outputs(plans: list[CasePlan]) -> None:
    every_input = [f for plan in plans for f in plan.files]
    for plan in plans:
        clash = next((f for f in every_input if same_file(plan.target, f)), None)
        if clash is not None:
            raise InputError(f"output {printable(str(plan.target))} is the input {printable(str(clash))} (same file, "
                             "link or symlink); the labels would overwrite the scan; write the output somewhere else")


def _apply_existing(plans: list[CasePlan], existing: str) -> tuple[list[CasePlan], list[CasePlan]]:
    present = [p for p in plans if p.target.exists()]
    if not present:
        return plans, []
    if existing == "refuse":
        raise InputError(f"{len(present)} of {len(plans)} outputs already exist in {present[0].target.parent} "
                         f"(e.g. {printable(present[0].target.name)}); pass --overwrite to replace them or --continue to "
                         "segment only the cases without an output")
    if existing == "continue":
        logger.info("--continue: skipping %d case(s) whose output exists", len(present))
        return [p for p in plans if p not in present], present
    return _note_replaced(plans, existing), []


def _note_replaced(plans: list[CasePlan], existing: str) -> list[CasePlan]:
    """Warn of each output that will be replaced, saying what happens to it if its case fails (a single
    case's failure is the command's error, so its old output is kept)."""
    if_failed = ("removed if its case fails, so that no earlier result looks current" if existing == "overwrite"
                 else "kept if the case fails")
    for plan in plans:
        if plan.target.exists():
            logger.warning("replacing the existing output %s (%s)", printable(str(plan.target)), if_failed)
    return plans


def check_case_fits(plan: CasePlan, spec: ModelSpec) -> None:
    """Headers only, before any voxel is read: `segmentation.check_fits` (voxel size, resampling to
    nothing, memory) on what the headers say."""
    headers = [read_header(f) for f in plan.files]
    check_fits(headers[0].shape, sum(h.channels for h in headers), headers[0].spacing, spec, str(plan.files[0]))
