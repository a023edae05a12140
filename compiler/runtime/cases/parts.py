"""`--part-id auto` / `--num-parts auto`: this process's share of a folder, from the scheduler that
started it (one process per part: an array job).

| scheduler | part | number of parts |
|---|---|---|
| SLURM job array (`sbatch --array=0-3`) | `SLURM_ARRAY_TASK_ID` (minus `SLURM_ARRAY_TASK_MIN`, over `SLURM_ARRAY_TASK_STEP`) | `SLURM_ARRAY_TASK_COUNT` |
| Kubernetes Indexed Job | `JOB_COMPLETION_INDEX` | not given by Kubernetes: pass `--num-parts` (the Job's `completions`) |
| torchrun, `torch.distributed` launchers | `RANK` | `WORLD_SIZE` |

The first scheduler whose variables are set is used, in this order; the part files a run writes are
named by the part (`run-part{K}.json`, `previews/index-part{K}.json`), so parts never collide.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from nnslim.errors import SettingsError

logger = logging.getLogger(__name__)

AUTO = "auto"
SCHEDULER_VARIABLES = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "JOB_COMPLETION_INDEX", "RANK", "WORLD_SIZE")


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise SettingsError(f"${name} is {value!r}, not a whole number; the scheduler's variable is needed as "
                            "set, or give --part-id and --num-parts as numbers") from None


def from_scheduler(env: Mapping[str, str]) -> tuple[str, int | None, int | None] | None:
    """(scheduler, part, number of parts or None) from the first scheduler whose variables are set."""
    task = _int(env, "SLURM_ARRAY_TASK_ID")
    if task is not None:
        first, step = _int(env, "SLURM_ARRAY_TASK_MIN") or 0, _int(env, "SLURM_ARRAY_TASK_STEP") or 1
        if step < 1 or (task - first) % step:
            raise SettingsError(f"$SLURM_ARRAY_TASK_ID {task} is not on the array's grid (min {first}, step {step})")
        return "SLURM array", (task - first) // step, _int(env, "SLURM_ARRAY_TASK_COUNT")
    index = _int(env, "JOB_COMPLETION_INDEX")
    if index is not None:
        return "Kubernetes Indexed Job", index, None
    rank = _int(env, "RANK")
    if rank is not None:
        return "torchrun", rank, _int(env, "WORLD_SIZE")
    return None


def resolve_part(part_id: int | str, num_parts: int | str, env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """`(part_id, num_parts)` with "auto" taken from the scheduler's variables (module docstring)."""
    if part_id != AUTO and num_parts != AUTO:
        return int(part_id), int(num_parts)
    env = os.environ if env is None else env
    found = from_scheduler(env)
    if found is None:
        raise SettingsError(f"--part-id/--num-parts auto: none of the schedulers' variables is set "
                            f"({', '.join('$' + v for v in SCHEDULER_VARIABLES)}); run it as a SLURM array task, a "
                            "Kubernetes Indexed Job or under torchrun, or give both as numbers")
    scheduler, part, count = found
    if part_id == AUTO:
        part_id = part
    if num_parts == AUTO:
        if count is None:
            raise SettingsError(f"--num-parts auto: the {scheduler} does not say how many parts there are; give "
                                "--num-parts N (a Kubernetes Indexed Job's `completions`)")
        num_parts = count
    part_id, num_parts = int(part_id), int(num_parts)
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise SettingsError(f"the {scheduler} gives part {part_id} of {num_parts}; a part must be in 0..{num_parts - 1}")
    logger.info("part %d of %d, from the %s's variables", part_id, num_parts, scheduler)
    return part_id, num_parts
