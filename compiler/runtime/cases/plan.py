"""What an `infer` run will read and write, checked before any work starts.

- Inputs are never overwritten: an output that is an input (same path, a symlink or a hard
  link to it), or an output folder that is the input folder, is refused.
- Existing outputs in folder mode are an explicit choice (`EXISTING`): "refuse" (the default)
  names how many exist and the two flags; "overwrite" replaces them and logs each one;
  "continue" skips the cases already written (nnU-Net's `--continue_prediction`).
- Each case's header is read (not its voxels) and the memory the case needs is estimated:
  input and normalized copy `2 * 4 * C * N` bytes, the resampled image `4 * C * M`, the slab
  accumulators `4 * (K + 1) * slab` and the uint8 labels `N + M`, for N input voxels, M voxels
  at the model's spacing and K output heads. A request over the machine's memory is refused
  with the estimate; a voxel size that would resample an axis to nothing is refused too.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from nnslim.errors import InputError
from nnslim.compiler.runtime.manifest import ModelSpec
from nnslim.compiler.runtime.safety import require_fits, same_file
from nnslim.compiler.runtime.volumes.layout import find_cases
from nnslim.compiler.runtime.volumes.readers import VOLUME_SUFFIXES, check_output_name, output_suffix
from nnslim.compiler.runtime.volumes.sitk import is_dicom_series
from nnslim.compiler.runtime.volumes.volume import read_header

logger = logging.getLogger(__name__)

EXISTING = ("refuse", "overwrite", "continue")


@dataclass(frozen=True)
class CasePlan:
    name: str
    files: list[Path]
    target: Path


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
        raise InputError(f"--part-id must be in 0..{num_parts - 1} for --num-parts {num_parts}, got {part_id}")
    # a folder is a folder of cases, unless it is itself one DICOM series (one case)
    folder_mode = len(inputs) == 1 and inputs[0].is_dir() and not is_dicom_series(inputs[0])
    if folder_mode:
        if output.name.endswith(VOLUME_SUFFIXES) or output.is_file():
            raise InputError(f"input {inputs[0]} is a folder, so the output must be a folder, got {output}")
        if same_file(output, inputs[0]):
            raise InputError(f"the output folder {output} is the input folder; the labels would overwrite the "
                             "scans; choose another output folder")
        plans = [CasePlan(case, files, output / f"{case}{output_suffix(files[0])}")
                 for case, files in find_cases(inputs[0]).items()]
        plans = plans[part_id::num_parts]
    else:
        if output.is_dir():
            raise InputError(f"-o {output} is a folder, but a single case writes one file; "
                             f"give a file name such as {output / 'seg.nii.gz'}")
        check_output_name(output)
        plans = [CasePlan("case", list(inputs), output)]
    _refuse_inputs_as_outputs(plans)
    return _apply_existing(plans, existing) if folder_mode else (_note_replaced(plans), [])


def _refuse_inputs_as_outputs(plans: list[CasePlan]) -> None:
    every_input = [f for plan in plans for f in plan.files]
    for plan in plans:
        clash = next((f for f in every_input if same_file(plan.target, f)), None)
        if clash is not None:
            raise InputError(f"output {plan.target} is the input {clash} (same file, link or symlink); the labels "
                             "would overwrite the scan; write the output somewhere else")


def _apply_existing(plans: list[CasePlan], existing: str) -> tuple[list[CasePlan], list[CasePlan]]:
    present = [p for p in plans if p.target.exists()]
    if not present:
        return plans, []
    if existing == "refuse":
        raise InputError(f"{len(present)} of {len(plans)} outputs already exist in {present[0].target.parent} "
                         f"(e.g. {present[0].target.name}); pass --overwrite to replace them or --continue to "
                         "segment only the cases without an output")
    if existing == "continue":
        logger.info("--continue: skipping %d case(s) whose output exists", len(present))
        return [p for p in plans if p not in present], present
    return _note_replaced(plans), []


def _note_replaced(plans: list[CasePlan]) -> list[CasePlan]:
    for plan in plans:
        if plan.target.exists():
            logger.warning("replacing the existing output %s", plan.target)
    return plans


def check_case_fits(plan: CasePlan, spec: ModelSpec, patch: tuple[int, ...]) -> None:
    """Headers only: refuse a case whose resampling or memory need is absurd (module docstring)."""
    headers = [read_header(f) for f in plan.files]
    shape, channels = headers[0].shape, sum(h.channels for h in headers)
    spacing = list(headers[0].spacing)
    shown = f"({', '.join(f'{z:g}' for z in spacing)}) mm"
    voxels = math.prod(shape)
    target = (spec.preprocessing or {}).get("spacing") if (spec.preprocessing or {}).get("resample") else None
    resampled = float(voxels)
    if target:
        target = [float(t) for t in target]
        extents = [s * a for s, a in zip(shape, spacing)]
        if min(extents) < 0.5 * min(target):
            raise InputError(f"{plan.files[0]}: shape {shape} at voxel size {shown} spans only "
                             f"{min(extents):.3g} mm on one axis, which resamples to 0 voxels at the model's spacing "
                             f"{tuple(target)} mm; check the header's voxel size (pixdim)")
        kept = min(spacing) if len(target) == 2 else 1.0  # a 2D model keeps one axis' spacing
        resampled = voxels * math.prod(spacing) / (kept * math.prod(target))
    slab = resampled * max(patch) / max(1.0, resampled ** (1 / 3))
    need = 8 * channels * voxels + 4 * channels * resampled + 4 * (spec.num_classes + 1) * slab + voxels + resampled
    require_fits(need, f"segmenting {plan.files[0]} (shape {shape}, voxel size {shown}, about "
                 f"{resampled:.3g} voxels at the model's spacing)",
                 "check the header's dimensions and voxel size, or crop the scan")
