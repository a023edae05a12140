"""`nnslim report OUT`: one view of a folder written in parts (an array job, several machines).

Each part writes its own files (`run-part{K}.json`, `previews/index-part{K}.json` and `.html`), so
parts never overwrite each other. This merges them: `OUT/previews/index.html` lists every case once
(each part's own index, the run of a case winning over its skip), and `OUT/nnslim-summary.json`
holds the runs of the newest split (parts of an earlier `--num-parts` are left out), the cases
written (records whose output is there) and the engines that wrote the folder. Nothing is deleted;
both files are written atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnslim.compiler.runtime.cases.provenance import RECORDS
from nnslim.errors import InputError
from nnslim.files import write_text_atomic

SUMMARY = "nnslim-summary.json"  # not nnU-Net's summary.json (nnUNetv2_evaluate_folder writes that one)


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
    split = max(runs, key=lambda r: str(r.get("finished"))).get("part") or [0, 1]
    runs = [r for r in runs if (r.get("part") or [0, 1])[1] == split[1]]  # not those of an earlier split
    cases = {r.get("case_output"): r for r in _json_files(list((output / RECORDS).glob("*.json")))
             if (output / str(r.get("case_output"))).is_file()}  # a record whose output is gone counts for nothing
    index = None
    previews = output / "previews"
    entries: dict[str, dict[str, Any]] = {}
    # each part's own index (never the merged index.json this writes, unless the folder was not split)
    names = ["index.json"] if split[1] == 1 else [f"index-part{k}.json" for k in range(split[1])]
    for part in _json_files([previews / n for n in names if (previews / n).is_file()]):
        for entry in part if isinstance(part, list) else []:
            name = entry.get("case")
            if name is not None and (name not in entries or entry.get("status") != "skipped"):
                entries[name] = entry  # a case run in one part and skipped in another: the run wins
    if entries:
        from nnslim.compiler.runtime.volumes.preview import write_preview_index

        ordered = [entries[k] for k in sorted(entries)]
        write_text_atomic(previews / "index.json", json.dumps(ordered, indent=1) + "\n")
        index = write_preview_index(previews, ordered)
    latest = {tuple(run.get("part") or (0, 1)): run for run in runs}  # one record per part: its last run
    failed = sum(int((run.get("cases") or {}).get("failed", 0)) for run in latest.values())
    engines = sorted({str(r.get("engine_sha256")) for r in [*runs, *cases.values()]})
    summary = {"cases": {"written": len(cases), "failed in each part's last run": failed},
               "parts": [list(part) for part in sorted(latest)], "engines_sha256": engines, "runs": runs}
    path = output / SUMMARY
    write_text_atomic(path, json.dumps(summary, indent=1, default=list) + "\n")
    return Report(path, index, len(cases), len(runs))
