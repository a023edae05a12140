"""Checks made before work starts: memory a request would need, sane voxel sizes, live processes,
same-file tests.

The memory check compares an estimate with what the machine has (physical memory from
`os.sysconf`, or the address-space limit when one is set, whichever is smaller), so an absurd
request (a forged header, a voxel size that resamples a scan to billions of voxels) is refused
with the estimate before anything is allocated, instead of swapping the machine to a halt.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

from nnslim.errors import InputError

GB = 2**30
MAX_SPACING_MM = 1e4  # a voxel 10 m wide is a broken header, not a scan (headers and manifests alike)


def machine_memory_bytes() -> int | None:
    """Physical memory, capped by RLIMIT_AS when set; None when the platform does not say."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        total = None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft not in (resource.RLIM_INFINITY, -1) and soft > 0:
        total = soft if total is None else min(total, soft)
    return total


def require_fits(estimate_bytes: float, what: str, advice: str) -> None:
    """Refuse a request whose estimated memory exceeds the machine's, naming both figures."""
    available = machine_memory_bytes()
    if available is not None and estimate_bytes > available:
        raise InputError(f"{what} would need about {estimate_bytes / GB:.1f} GB of memory but this machine has "
                         f"{available / GB:.1f} GB; {advice}")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (a reused id counts as alive: the safe side)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def same_file(a: Path, b: Path) -> bool:
    """True when `a` and `b` are one file: the same path, a symlink to it, or a hard link."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def refuse_input_as_output(output: Path, inputs: dict[str, Path | None], option: str) -> None:
    """Raise InputError when the output file `output` (given as `option`) is one of the command's
    `inputs` (named by what they are), so that writing it cannot replace what it reads."""
    for what, path in inputs.items():
        if path is not None and same_file(output, path):
            raise InputError(f"{option} {output} is the {what} of this command; writing it would replace "
                             f"that input. Give {option} a path of its own")
