"""The hostile-input table: every row of tests/test_bad_input*.py run, and counted by outcome.

Usage:
    .venv/bin/python scripts/hostile_table.py            # all rows (slow ones too)
    .venv/bin/python scripts/hostile_table.py -m "not slow"

Runs the hostile-input test files with pytest (real CLI, real engine) and prints, per file, the
CLI table's rows by the outcome each asserts (0: accepted, 1: refused cleanly with one line
`error: ...` and nothing changed, 2: a usage error, 4: one case of a folder failed cleanly and the
others were written) and the other checks (API counterparts, real
processes, cache attacks), each passed or not. Writes artifacts/hostile-table.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUTCOMES = {0: "ok", 1: "refused", 2: "usage error", 4: "case failed"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", dest="marks", default=None, help="pytest -m expression (e.g. 'not slow')")
    args = parser.parse_args()
    files = sorted((REPO / "tests").glob("test_bad_input*.py"))
    report = REPO / "artifacts" / "hostile-table.xml"
    report.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
               *(["-m", args.marks] if args.marks else []), *map(str, files)]
    subprocess.run(command, cwd=REPO, check=False)
    results = _results(report)
    sys.path.insert(0, str(REPO))
    rows, totals = [], Counter()
    for path in files:
        cases = {case.id: case.exit_code for case in getattr(importlib.import_module(f"tests.{path.stem}"), "CASES", [])}
        counts: Counter = Counter()
        for (module, name, param), passed in results.items():
            if module != path.stem:
                continue
            if param in cases and name.startswith("test_hostile"):
                counts[OUTCOMES.get(cases[param], str(cases[param]))] += 1
            else:
                counts["other checks"] += 1
            counts["passed" if passed else "FAILED"] += 1
        rows.append({"file": path.name, **counts})
        totals.update(counts)
    columns = ["ok", "refused", "usage error", "case failed", "other checks", "passed", "FAILED"]
    print(f"\n{'file':30}" + "".join(f"{c:>13}" for c in columns))
    for row in [*rows, {"file": "all", **totals}]:
        print(f"{row['file']:30}" + "".join(f"{row.get(c, 0):>13}" for c in columns))
    (REPO / "artifacts" / "hostile-table.json").write_text(json.dumps({"rows": rows, "total": dict(totals)}, indent=2))
    return 1 if totals["FAILED"] else 0


def _results(report: Path) -> dict[tuple[str, str, str], bool]:
    """(module, test function, parameter id) -> passed, from pytest's JUnit XML (skips left out)."""
    results = {}
    for case in ElementTree.parse(report).iter("testcase"):
        if case.find("skipped") is not None:
            continue
        name, _, param = case.get("name", "").partition("[")
        module = case.get("classname", "").rsplit(".", 1)[-1]
        results[(module, name, param[:-1])] = case.find("failure") is None and case.find("error") is None
    return results


if __name__ == "__main__":
    raise SystemExit(main())
