"""`--log-jsonl`: one JSON line per case, appended and flushed to disk as each case is reported, so a
run of 10,000 cases can be followed (`tail -f`) and an interrupted one audited.

A run killed in the middle of a write leaves a partial last line. The next run appending to the
log starts a new line first, so every line it writes is whole JSON; the fragment is kept (it is
the record of the interruption) and a warning names it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from nnslim.compiler.runtime.safety import same_file, symlink_loop
from nnslim.errors import InputError

logger = logging.getLogger(__name__)

# what each line holds, in this order (README and `infer --help` say the same)
LOG_FIELDS = ("case", "status", "seconds", "windows", "tiles", "output", "probabilities", "preview", "error",
              "started", "finished", "engine_sha256", "nnslim_version", "backend", "device", "part")


class CaseLog:
    """Appends one JSON object per case (`LOG_FIELDS`) to a file, flushed to disk line by line, so a
    run of 10,000 cases can be followed (`tail -f`) and an interrupted one audited."""

    def __init__(self, path: Path, inputs: Sequence[Path], outputs: Sequence[Path]) -> None:
        self.path = Path(path)
        check_log_path(self.path, inputs, outputs)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if _ends_mid_line(self.path):
            logger.warning("--log-jsonl %s ends in a partial line (a run interrupted while writing it); the new "
                           "records start on a line of their own", self.path)
            self._file.write("\n")

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps({key: record.get(key) for key in LOG_FIELDS}, default=str)
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def check_log_path(path: Path, inputs: Sequence[Path], outputs: Sequence[Path]) -> None:
    """Refuse a log file that is an input or an output of the run, a folder, or a file that is not a case log."""
    clash = next((p for p in [*inputs, *outputs] if same_file(path, p)), None)
    if clash is not None:
        raise InputError(f"--log-jsonl {path} is {clash}, an input or output of this run; choose another file "
                         "(e.g. segs.jsonl beside the output folder)")
    if path.is_dir():
        raise InputError(f"--log-jsonl {path} is a folder; give a file name such as {path / 'cases.jsonl'}")
    if symlink_loop(path):
        raise InputError(f"--log-jsonl {path} is a symbolic link that loops back on itself; fix or remove the link, "
                         "or choose another file")
    if path.is_symlink() and not path.exists():
        raise InputError(f"--log-jsonl {path} is a symbolic link to {os.readlink(path)}, which does not exist; give "
                         "the log file itself (a link could make the log land among the run's inputs)")
    if path.exists() and not path.is_file():
        raise InputError(f"--log-jsonl {path} is not a regular file (a pipe or a device); the log is appended and "
                         "flushed to disk line by line, so give a file name")
    if path.is_file() and path.stat().st_size:
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.readline()
        try:
            record = json.loads(first)
        except ValueError:
            record = None
        interrupted = not first.endswith("\n") and first.startswith('{"case": ')  # the first write cut short
        if not interrupted and (not isinstance(record, dict) or "case" not in record or "status" not in record):
            raise InputError(f"--log-jsonl {path} exists and is not an nnslim case log (its first line is not a "
                             "case record); lines are appended to a log, so choose a new file or an earlier log")


def _ends_mid_line(path: Path) -> bool:
    """Whether a non-empty file's last byte is not a newline (its last line was cut short)."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"
