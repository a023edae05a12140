"""`nnslim report OUT`: one view of a folder written in parts (an array job, several machines).

Each part writes its own files (`run-part{K}.json`, `previews/index-part{K}.json` and `.html`), so
parts never overwrite each other. This merges them: `OUT/previews/index.html` lists every case once
(the latest record of each), and `OUT/summary.json` holds the runs, the case counts and the
engines that wrote the folder. Nothing is deleted; both files are written atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnslim.compiler.runtime.cases.provenance import RECORDS
from nnslim.errors import InputError
from nnslim.files import write_text_atomic


@dataclass(frozen=True)
class Report:
    summary: Path
    index: Path | None
    cases: int
    runs: int


def _json_files(paths: list[Path]) -> list[dict[str, Any]]:
    out = []
    for path in sorted(paths):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{path} is not readable JSON ({exc}); it was written by nnslim infer: restore or "
                             "remove it, then run nnslim report again") from None
        out.append(data)
    return out


def merge(output: Path) -> Report:
    """Merge the parts' records of `output` (module docstring)."""
    output = Path(output)
    runs = _json_files(list(output.glob("run.json")) + list(output.glob("run-part*.json")))
    if not runs:
        raise InputError(f"{output} holds no run record (run.json or run-part*.json): it was not written by nnslim "
                         "infer on a folder, or by an nnslim before 0.1 records")
    cases = {r.get("case_output"): r for r in _json_files(list((output / RECORDS).glob("*.json")))}
    index = None
    previews = output / "previews"
    entries: dict[str, dict[str, Any]] = {}
    for part in _json_files(list(previews.glob("index.json")) + list(previews.glob("index-part*.json"))):
        for entry in part if isinstance(part, list) else []:
            name = entry.get("case")
            if name is not None and (name not in entries or entry.get("status") != "skipped"):
                entries[name] = entry  # a case run in one part and skipped in another: the run wins
    if entries:
        from nnslim.compiler.runtime.volumes.preview import write_preview_index

        ordered = [entries[k] for k in sorted(entries)]
        write_text_atomic(previews / "index.json", json.dumps(ordered, indent=1) + "\n")
        index = write_preview_index(previews, ordered)
    latest: dict[tuple, dict[str, Any]] = {}  # per part, its last run (a --continue after a first one)
    for run in sorted(runs, key=lambda r: str(r.get("finished"))):
        latest[tuple(run.get("part") or (0, 1))] = run
    failed = sum(int((run.get("cases") or {}).get("failed", 0)) for run in latest.values())
    engines = sorted({str(r.get("engine_sha256")) for r in [*runs, *cases.values()]})
    summary = {"cases": {"written": len(cases), "failed in each part's last run": failed},
               "parts": [list(part) for part in sorted(latest)], "engines_sha256": engines, "runs": runs}
    path = output / "summary.json"
    write_text_atomic(path, json.dumps(summary, indent=1, default=list) + "\n")
    return Report(path, index, len(cases), len(runs))
