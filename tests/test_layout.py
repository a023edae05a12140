"""The import rules of DESIGN.md, checked on the source: training never imports compiler; the
runtime imports neither training nor the build stages; one module imports tensorrt; only the
pass modules import onnx_graphsurgeon."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(folder: str) -> dict[Path, set[str]]:
    return {p: _imports(p) for p in (ROOT / folder).rglob("*.py")}


def test_import_direction():
    for path, names in _modules("training").items():
        assert not any(n.split(".")[0] == "compiler" for n in names), f"{path} imports compiler"
    for path, names in _modules("compiler/runtime").items():
        bad = [n for n in names if n.split(".")[0] == "training"
               or (n.startswith("compiler.") and not n.startswith("compiler.runtime"))]
        assert not bad, f"{path} imports {bad}"


def test_one_module_imports_tensorrt_and_only_passes_import_graphsurgeon():
    everything = {**_modules("compiler"), **_modules("training")}
    tensorrt = [p.relative_to(ROOT).as_posix() for p, n in everything.items() if "tensorrt" in n]
    assert tensorrt == ["compiler/runtime/trt_backend.py"]
    surgeon = [p.relative_to(ROOT).as_posix() for p, n in everything.items() if "onnx_graphsurgeon" in n]
    assert surgeon and all(p.startswith("compiler/passes/") for p in surgeon)
