"""The layout rules of DESIGN.md and docs/architecture.md, checked on the source.

- Import direction: `nnslim.training` may use `nnslim.compiler.runtime` and nnslim's shared helpers
  and nothing else of the compiler; the runtime imports neither training nor the build stages, the
  CLI, workflows or deploy, and no torch or onnx when imported (torch only in its PyTorch adapter,
  and inside the GPU path's functions); nnslim's helpers (errors, files, cache, parameters, extras)
  import no part of the compiler or training; nothing imports the repository folders by their bare
  names.
- One module imports `tensorrt`; only graph-rewriting modules import `onnx_graphsurgeon`.
- No import cycles between nnslim's modules: module-level imports, those under `if TYPE_CHECKING:`
  included (a cycle that only type checkers see is still a cycle for a reader).
- No module over 400 lines; no function over 60 lines except a short, justified allow-list; the
  runtime keeps at most 15 entries at its top, the rest in rooms (subpackages).
- No package folder is named `build` (tools treat that name as generated output).
- Static tools resolve the installed layout: mypy finds `nnslim.compiler.*` and `nnslim.training.*`
  after the README's set-up (a strict editable install, `scripts/setup.sh`).
- Every package folder is installed (the explicit list in pyproject.toml), and an installed nnslim
  leaves a user's own `training` package alone.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"compiler": "nnslim.compiler", "training": "nnslim.training", "nnslim": "nnslim"}

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_RUNTIME_TOP = 15  # modules and rooms directly under compiler/runtime (__init__ aside)
# Functions allowed to be longer, and why.
LONG_FUNCTIONS = {
    # The whole build reads top to bottom in one function, one line per stage (tinygrad's style).
    ("compiler/stages/pipeline.py", "build_engine"),
}
SHARED_HELPERS = ("nnslim/errors.py", "nnslim/files.py", "nnslim/cache.py", "nnslim/parameters.py", "nnslim/extras.py")
# the runtime imports torch only in its PyTorch adapter; the GPU path imports it inside functions
RUNTIME_TORCH_AT_IMPORT = {"compiler/runtime/backends/torch_module.py"}
RUNTIME_MAY_NOT = ("nnslim.training", "nnslim.compiler.stages", "nnslim.compiler.cli", "nnslim.compiler.workflows",
                   "nnslim.compiler.deploy")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    package = FOLDERS[rel.parts[0]]
    parts = list(rel.with_suffix("").parts[1:])
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def _sources() -> dict[Path, ast.Module]:
    return {p: ast.parse(p.read_text()) for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))}


SOURCES = _sources()


def _module_level(tree: ast.Module) -> list[ast.stmt]:
    """Statements that run at import, or that a type checker reads as such: the module body and the
    bodies of its top-level `if` (`if TYPE_CHECKING:`) and `try` blocks."""
    nodes: list[ast.stmt] = []
    pending = list(tree.body)
    while pending:
        node = pending.pop(0)
        nodes.append(node)
        if isinstance(node, ast.If):
            pending += node.body + node.orelse
        elif isinstance(node, ast.Try):
            pending += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
    return nodes


def _imports(tree: ast.Module, module: str, module_level_only: bool = False) -> set[str]:
    nodes = _module_level(tree) if module_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level] if not module.endswith("__init__") else module.split(".")
                names.add(".".join([*base, *([node.module] if node.module else [])]))
            elif node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_import_direction():
    for path, tree in SOURCES.items():
        names = _imports(tree, _module_name(path))
        bare = sorted(n for n in names if n.split(".")[0] in ("compiler", "training"))
        assert not bare, f"{_rel(path)} imports the repository folders by their bare names: {bare}"
        rel = _rel(path)
        if rel.startswith("training/"):
            bad = [n for n in names if n.startswith("nnslim.compiler") and not n.startswith("nnslim.compiler.runtime")]
            assert not bad, f"{rel} imports the build side: {bad}"
        if rel.startswith("compiler/runtime/"):
            bad = [n for n in names if n.startswith(RUNTIME_MAY_NOT)]
            assert not bad, f"{rel} (runtime) imports {bad}"
        if rel.startswith("compiler/runtime/") and rel not in RUNTIME_TORCH_AT_IMPORT:
            heavy = {n.split(".")[0] for n in _imports(tree, _module_name(path), module_level_only=True)}
            assert not heavy & {"torch", "onnx"}, f"{rel} (runtime) imports {sorted(heavy & {'torch', 'onnx'})} at import"
        if rel in SHARED_HELPERS:
            bad = [n for n in names if n.startswith(("nnslim.compiler", "nnslim.training"))]
            assert not bad, f"{rel} (a helper every part shares) imports {bad}"


def test_one_module_imports_tensorrt_and_only_graph_rewrites_import_graphsurgeon():
    importers = {name: sorted(_rel(p) for p, t in SOURCES.items() if name in {n.split(".")[0] for n in _imports(t, _module_name(p))})
                 for name in ("tensorrt", "onnx_graphsurgeon")}
    assert importers["tensorrt"] == ["compiler/runtime/backends/tensorrt_plan.py"]
    assert importers["onnx_graphsurgeon"]
    assert all(p.startswith("compiler/stages/passes/") for p in importers["onnx_graphsurgeon"]), importers["onnx_graphsurgeon"]


def _import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): t for p, t in SOURCES.items()}
    graph = {}
    for name, tree in modules.items():
        targets = set()
        for imported in _imports(tree, name, module_level_only=True):
            # `from a.b import c` names a.b.c, which is a module or an attribute of a.b
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles_type_checking_included():
    cycle = _find_cycle(_import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle_and_type_checking_imports():
    graph = {**_import_graph(), "nnslim.a": {"nnslim.b"}, "nnslim.b": {"nnslim.c"}, "nnslim.c": {"nnslim.a"}}
    assert _find_cycle(graph) == ["nnslim.a", "nnslim.b", "nnslim.c", "nnslim.a"]
    planted = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from nnslim.x import Y\n")
    assert "nnslim.x" in _imports(planted, "nnslim.z", module_level_only=True)


def test_the_runtime_is_a_few_entries_and_rooms():
    runtime = ROOT / "compiler" / "runtime"
    entries = sorted(p.name for p in runtime.iterdir() if p.name != "__init__.py" and p.name != "__pycache__"
                     and (p.suffix == ".py" or (p / "__init__.py").is_file()))
    assert len(entries) <= MAX_RUNTIME_TOP, f"compiler/runtime has {len(entries)} entries: {entries}"
    rooms = [p for p in runtime.iterdir() if (p / "__init__.py").is_file()]
    assert {p.name for p in rooms} >= {"backends", "window", "volumes", "cases", "manifest"}


def test_no_package_folder_is_named_build():
    named = [_rel(p) for folder in FOLDERS for p in (ROOT / folder).rglob("build") if p.is_dir()]
    assert not named, f"package folders named build (linters, formatters and .gitignore templates skip them): {named}"


STATIC_PROBE = """\
import nnslim.compiler.runtime.engine
import nnslim.compiler.runtime.window.walk
import nnslim.compiler.runtime.backends.choice
import nnslim.compiler.stages.pipeline
import nnslim.compiler.stages.passes.fp16
import nnslim.compiler.cli
import nnslim.training.unet
import nnslim.training.train
import nnslim.errors
"""


@pytest.mark.parametrize("where", ["outside", "repository"])
def test_static_tools_resolve_the_installed_layout(tmp_path, where):
    """mypy (no `--ignore-missing-imports`) finds every module a newcomer would go to, from a folder of
    their own and from the repository root; a module that is not there is reported (the check can fail)."""
    pytest.importorskip("mypy")
    probe = tmp_path / "probe.py"
    probe.write_text(STATIC_PROBE + "import nnslim.compiler.runtime.no_such_module\n")
    cwd = tmp_path if where == "outside" else ROOT
    done = subprocess.run([sys.executable, "-m", "mypy", "--follow-imports=skip", "--no-incremental",
                           "--cache-dir", os.devnull, str(probe)], cwd=cwd, capture_output=True, text=True)
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and "no_such_module" in errors[0] and "import-not-found" in errors[0], done.stdout


def test_module_and_function_sizes():
    too_long = []
    for path, tree in SOURCES.items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{_rel(path)}: {lines} lines (max {MAX_MODULE_LINES})")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and (_rel(path), node.name) not in LONG_FUNCTIONS:
                    too_long.append(f"{_rel(path)}:{node.lineno} {node.name}: {length} lines (max {MAX_FUNCTION_LINES})")
    assert not too_long, "split these:\n" + "\n".join(too_long)


def test_every_package_folder_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {_module_name(p) for p in SOURCES if p.name == "__init__.py"}
    assert set(config["packages"]) == on_disk
    assert config["package-dir"] == {v: k for k, v in FOLDERS.items()}


@pytest.mark.slow
def test_installed_wheel_leaves_a_users_training_package_alone(tmp_path, built_wheel):
    """Install the wheel alone into a fresh venv that borrows .venv's dependencies, and import it
    from a folder that has its own `training/` and `compiler/` packages."""
    wheel = built_wheel
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # dependencies from the development venv, through a plain path entry (its .pth files, and so
    # the editable install, are not processed)
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    Path(site, "deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", site, str(wheel)],
                   check=True, capture_output=True)
    user = tmp_path / "user_project"
    for name in ("training", "compiler"):
        (user / name).mkdir(parents=True)
        (user / name / "__init__.py").write_text(f"OWNER = 'user-{name}'\n")
    probe = ("import nnslim, nnslim.compiler.cli, nnslim.compiler.runtime.engine, nnslim.training.unet, training, compiler\n"
             "assert training.OWNER == 'user-training' and compiler.OWNER == 'user-compiler', (training, compiler)\n"
             "assert nnslim.compiler.cli.__file__.startswith(%r), nnslim.compiler.cli.__file__\n"
             "print(nnslim.__version__)\n") % site
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([python, "-c", probe], cwd=user, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == config_version()


def config_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
