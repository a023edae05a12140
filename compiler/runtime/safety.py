"""Checks made before work starts: memory a request would need, sane voxel sizes, live processes,
same-file tests.

The memory check compares an estimate with what the machine has (physical memory from
`os.sysconf`, or the address-space limit when one is set, whichever is smaller), so an absurd
request (a forged header, a voxel size that resamples a scan to billions of voxels) is refused
with the estimate before anything is allocated, instead of swapping the machine to a halt.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import unicodedata
from pathlib import Path

from nnslim.errors import InputError, SettingsError

GB = 2**30
MAX_SPACING_MM = 1e4  # a voxel 10 m wide is a broken header, not a scan (headers and manifests alike)


MEMORY_BUDGET_ENV = "NNSLIM_MEMORY_BUDGET_MB"  # a process's share (`nnslim serve` sets it per model instance)


def machine_memory_bytes() -> int | None:
    """Physical memory, capped by RLIMIT_AS and by $NNSLIM_MEMORY_BUDGET_MB when set; None when the
    platform does not say."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        total = None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft not in (resource.RLIM_INFINITY, -1) and soft > 0:
        total = soft if total is None else min(total, soft)
    try:
        budget = int(float(os.environ.get(MEMORY_BUDGET_ENV, "0")) * 2**20)
    except (ValueError, OverflowError):  # not a number of MB, or inf: no budget beyond the machine's
        budget = 0
    if budget > 0:
        total = budget if total is None else min(total, budget)
    return total


def require_fits(estimate_bytes: float, what: str, advice: str) -> None:
    """Refuse a request whose estimated memory exceeds the machine's, naming both figures."""
    available = machine_memory_bytes()
    if available is not None and estimate_bytes > available:
        raise InputError(f"{what} would need about {estimate_bytes / GB:.1f} GB of memory but this machine has "
                         f"{available / GB:.1f} GB; {advice}")


def same_file(a: Path, b: Path) -> bool:
    """True when `a` and `b` are one file: the same path, a symlink to it, or a hard link."""
    a, b = Path(a), Path(b)
    try:
        if a.resolve() == b.resolve():
            return True
    except RuntimeError:  # a symlink loop (Python < 3.13): it cannot be the other file; samefile decides
        pass
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet, or is a symlink loop
        return False


def refuse_input_as_output(output: Path, inputs: dict[str, Path | None], option: str) -> None:
    """Raise InputError when the output file `output` (given as `option`) is one of the command's
    `inputs` (named by what they are), or the voxel data file a detached header among them names,
    so that writing it cannot replace what it reads."""
    for what, path in inputs.items():
        for file in ([path, *detached_data_files(path)] if path is not None else []):
            if same_file(output, file):
                part = what if file == path else f"voxel data ({file.name}) of the {what}"
                raise InputError(f"{option} {output} is the {part} of this command; writing it would replace "
                                 f"that input. Give {option} a path of its own")


_DATA_FILE = {".mhd": re.compile(r"^\s*ElementDataFile\s*=\s*(.+?)\s*$", re.M),
              ".nhdr": re.compile(r"^\s*data ?file\s*:\s*(.+?)\s*$", re.M | re.I)}


def detached_data_files(path: str | os.PathLike) -> list[Path]:
    """The files a detached header (.mhd, .nhdr) keeps its voxels in, resolved beside it: inputs of a
    command as much as the header itself (a build or an output must not replace them)."""
    path = Path(path)
    pattern = _DATA_FILE.get(path.suffix.lower())
    if pattern is None or not path.is_file():
        return []
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 16).decode("latin-1")
    except OSError:
        return []
    names = [v.split()[0] for v in pattern.findall(text) if v and v.split()[0].upper() not in ("LOCAL", "LIST")]
    return [path.parent / name for name in names]


def max_threads() -> int:
    """The most CPU threads a run may ask for: 4 per core. More only adds contention, and an absurd
    count (100,000) makes ONNX Runtime crash while it creates its thread pool."""
    return 4 * (os.cpu_count() or 1)


def check_threads(threads: int) -> int:
    """`threads` when it is 0 (the backend's default) or 1 .. `max_threads()`; SettingsError otherwise."""
    if not 0 <= threads <= max_threads():
        raise SettingsError(f"threads must be 0 (one per core) or 1..{max_threads()} (4 per core on this machine's "
                            f"{os.cpu_count() or 1} cores), got {threads}; pass a count in that range")
    return threads


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_sha256(text: str) -> str:
    """A pinned sha256 (`infer --engine-sha256`, `load_engine(expected_sha256=)`) as 64 lowercase hex digits.

    A malformed pin is a typing or copying mistake, not a changed engine: say so before any hashing,
    so the message cannot send the user to rebuild an engine that is fine."""
    digest = str(text).strip().lower()
    if not _SHA256.match(digest):
        shown = digest if len(digest) <= 80 else f"{digest[:77]}..."
        raise SettingsError(f"a sha256 is 64 hexadecimal characters (as `nnslim inspect` prints it), got {shown!r} "
                            f"({len(digest)} characters); copy the whole digest")
    return digest


def symlink_loop(path: Path) -> bool:
    """Whether `path` is a symbolic link that never reaches a file (it leads back to itself): every
    open fails with ELOOP, which `Path.exists()` reports as a plain False."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


_BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")  # reorder what is shown


def unprintable(name: str) -> bool:
    """Whether a name holds characters that change what a terminal or a log shows: control characters
    (newline, carriage return, escape sequences), line or paragraph separators, bidirectional overrides,
    and the surrogates Python decodes undecodable bytes to. Printed as part of a line they forge other
    lines (`case: FAILED ...` after a newline) or cannot be printed at all."""
    return any(unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") or c in _BIDI_CONTROLS for c in name)


def printable(name: str) -> str:
    """`name` with each character `unprintable` refuses written as a Python escape (`\\n`, `\\x1b`,
    `\\u202e`), so a message can show it without being forged by it."""
    return "".join(c.encode("unicode_escape").decode("ascii") if unprintable(c) else c for c in name)
