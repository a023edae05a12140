"""What says how a folder of outputs was made: a record per run (or per part), one per case, and
the fields every JSON line carries.

    OUT/run.json                    this run: nnslim version, engine (folder name, manifest sha256,
    OUT/run-part{K}.json            backend, precision, device), options, host, part, start and end,
                                    counts; `run-part{K}.json` when the folder is split in parts
    OUT/.nnslim/CASE_OUTPUT.json    one per case written: the engine that wrote it, the outputs it
                                    wrote (label map, probabilities, preview), when, how long

None of them holds a directory path (names only): they ship with the outputs.

`--continue` segments a case again when its record names another engine (by manifest sha256) or an
output this run asks for is missing, and a warning says why (`stale_reason`). An output without a
record (an older nnslim's, another tool's, a file put there by hand, or a run killed between the
label map and its record) is not shown to be nnslim's: it is kept, as before, and one warning
counts them (`--overwrite` replaces them).
"""

from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nnslim.files import write_text_atomic

logger = logging.getLogger(__name__)

RECORDS = ".nnslim"  # OUT/.nnslim/: one record per case


def now() -> str:
    """UTC, to the millisecond, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class RunInfo:
    """Who is writing this folder: the engine and where it runs (in every JSON line and record)."""

    engine: str  # the engine folder's name
    engine_sha256: str  # of its manifest.json, as `nnslim inspect` prints and --engine-sha256 pins
    nnslim_version: str
    backend: str | None
    precision: str | None
    device: str
    part: tuple[int, int] = (0, 1)
    host: str = ""

    @property
    def part_suffix(self) -> str:
        """"" for an unsplit folder, "-part{K}" for part K: the names of per-part files."""
        return "" if self.part[1] == 1 else f"-part{self.part[0]}"

    def line_fields(self) -> dict[str, Any]:
        """What each JSON line adds about the run."""
        return {"engine_sha256": self.engine_sha256, "nnslim_version": self.nnslim_version, "backend": self.backend,
                "device": self.device, "part": list(self.part)}


def run_info(engine: Any, part: tuple[int, int] = (0, 1)) -> RunInfo:
    """The RunInfo of an opened `Engine` (its manifest hashed now: what `--engine-sha256` would pin)."""
    from nnslim import __version__
    from nnslim.compiler.runtime.manifest.verify import manifest_digest

    runtime = getattr(engine, "runtime", None)
    return RunInfo(engine=Path(engine.directory).name, engine_sha256=manifest_digest(engine.directory),
                   nnslim_version=__version__, backend=runtime.backend if runtime else None,
                   precision=runtime.precision if runtime else None, device=getattr(engine, "device", "cpu"),
                   part=tuple(part), host=socket.gethostname())


def record_path(target: Path) -> Path:
    return target.parent / RECORDS / f"{target.name}.json"


def write_case_record(target: Path, info: RunInfo, outputs: dict[str, Path | None], started: float | None,
                      seconds: float, asked: list[str] = ()) -> Path:
    """The case's record, written atomically after its label map (so a record means a whole case).
    `asked`: the optional outputs this run asked for (one missing from `outputs` could not be made)."""
    record = {"case_output": target.name, **info.line_fields(), "engine": info.engine, "precision": info.precision,
              "outputs": {k: (v.name if v is not None else None) for k, v in outputs.items()}, "asked": list(asked),
              "started": iso(started) if started else None, "finished": now(), "seconds": round(seconds, 3)}
    path = record_path(target)
    path.parent.mkdir(exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=1) + "\n")
    return path


def read_case_record(target: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(record_path(target).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def stale_reason(record: dict[str, Any], info: RunInfo, wanted: dict[str, Path | None]) -> str | None:
    """Why an existing output, with its `record`, must be segmented again under --continue (None: it
    is complete and this engine's). `wanted`: the outputs this run asks for, by kind (None: not
    asked for). An output without a record is not shown to be nnslim's and is never replaced
    without --overwrite: the caller keeps it."""
    if record.get("engine_sha256") != info.engine_sha256:
        return (f"it was written by another engine ({record.get('engine')!r}, manifest sha256 "
                f"{str(record.get('engine_sha256'))[:12]}...)")
    if (record.get("backend") == "pytorch") != (info.backend == "pytorch"):
        return f"it was written by {'PyTorch (--torch-checkpoint)' if record.get('backend') == 'pytorch' else 'the engine'}"
    asked, written = record.get("asked") or [], record.get("outputs") or {}
    # asked for before and not written then (a preview that could not be drawn) is not asked again
    missing = [kind for kind, path in wanted.items() if path is not None and not path.is_file()
               and not (kind in asked and written.get(kind) is None)]
    if missing:
        return f"its {' and '.join(missing)} file{'' if len(missing) == 1 else 's'} {'is' if len(missing) == 1 else 'are'} missing"
    return None


def write_run_record(folder: Path, info: RunInfo, options: dict[str, Any], started: float,
                     counts: dict[str, int]) -> Path:
    """OUT/run.json (or run-part{K}.json): the run as a whole."""
    record = {"nnslim_version": info.nnslim_version, "engine": info.engine, "engine_sha256": info.engine_sha256,
              "backend": info.backend, "precision": info.precision, "device": info.device, "host": info.host,
              "part": list(info.part), "options": options, "started": iso(started), "finished": now(),
              "seconds": round(time.time() - started, 3), "cases": counts}
    path = folder / f"run{info.part_suffix}.json"
    write_text_atomic(path, json.dumps(record, indent=1) + "\n")
    return path
