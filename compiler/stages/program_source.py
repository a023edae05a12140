"""A saved `torch.export` program (`.pt2`) as the build's input: `build-engine model.pt2 --metadata FILE.json`.

The program is read with `torch.export.load` under two guards, because that loader falls back to
full unpickling for payloads it cannot read weights-only:
- an archive holding pickled Python objects (`custom_obj_*`, `opaque_obj_*` constants) is refused
  before anything is read;
- `TORCH_FORCE_WEIGHTS_ONLY_LOAD=1` is set while it loads, so every `torch.load` inside it is
  weights-only, fallbacks included: a payload that is not plain tensors fails to load.

The program's module then is a PyTorch source like any `nn.Module` (`source.module_source`: its
parity reference is the program itself). A program exported with a static batch of 1 is run on
batches without its input-shape guard; a graph that truly depends on that batch fails the build's
export with the reason. `patch_size` and `in_channels` default to the program's example input.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator

from nnslim.compiler.stages.source import Source, SourceError, module_source


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


_PAYLOAD = re.compile(r"(weight|tensor_constant)_\d+")
_EXPR_TOKEN = re.compile(r"[A-Za-z_]\w*")
_EXPR_CHARS = re.compile(r"[\w\s+\-*/(),'=]*")
_EXPR_NAMES = {"Symbol", "Integer", "positive", "integer", "True", "False", "FloorDiv", "Mod", "PythonMod", "Max",
               "Min", "CeilToInt", "FloorToInt", "CleanDiv", "IntTrueDiv", "TruncToInt", "Abs"}


def _expressions(node: Any) -> Iterator[str]:
    """Every `expr_str` in a program's JSON."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "expr_str":
                    yield value if isinstance(value, str) else repr(value)
                else:
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def _safe_expression(expression: str) -> bool:
    return bool(_EXPR_CHARS.fullmatch(expression)) and "__" not in expression and all(
        name in _EXPR_NAMES or re.fullmatch(r"[su]\d+", name) for name in _EXPR_TOKEN.findall(expression))


def _check_archive(path: Path) -> None:
    """Refuse an archive that would make `torch.export.load` run what it holds (module docstring)."""
    from torch.export.pt2_archive.constants import CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            documents = {n: json.loads(archive.read(n)) for n in names if n.endswith(".json")}
    except (OSError, zipfile.BadZipFile, ValueError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path.name} is not a torch.export archive (.pt2, a zip file with JSON): {exc}") from None
    pickled = [n for n in names if any(part.startswith((CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX))
                                       for part in Path(n).parts)]
    for name, document in documents.items():
        config = document.get("config") if isinstance(document, dict) and name.endswith("_config.json") else None
        for key, entry in (config or {}).items() if isinstance(config, dict) else ():
            if not (isinstance(entry, dict) and isinstance(entry.get("path_name"), str)
                    and _PAYLOAD.fullmatch(entry["path_name"]) and entry.get("use_pickle") is False):
                pickled.append(f"{name}: {key}")
    if pickled:
        raise SourceError(f"{path.name} holds pickled Python objects or payloads loaded by pickle ({pickled[0]}, ...), "
                          "which loading would run; nnslim reads programs whose weights and constants are plain tensors "
                          "(export the segmentation network alone)")
    unsafe = [e for d in documents.values() for e in _expressions(d) if not _safe_expression(e)]
    if unsafe:
        raise SourceError(f"{path.name} has a shape expression torch would evaluate that is not plain arithmetic "
                          f"({unsafe[0][:80]!r}); nnslim refuses it")


def _example_shape(program: Any) -> tuple[int, ...] | None:
    """The static shape of the program's one tensor input, when it has one."""
    inputs = [s for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    if len(inputs) != 1:
        raise SourceError(f"the program takes {len(inputs)} inputs; nnslim builds networks of one image input "
                          "[N, C, X, Y, Z]")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == inputs[0].arg.name)
    value = node.meta.get("val")
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    return tuple(int(d) if str(d).isdigit() else -1 for d in shape)


def program_source(path: str | Path, metadata: dict[str, Any]) -> Source:
    """Read a `.pt2` program (module docstring) with its metadata (`source.module_metadata`)."""
    import torch

    path = Path(path)
    _check_archive(path)
    try:
        with _weights_only_loads():
            program = torch.export.load(str(path))
    except Exception as exc:  # torch's loader: a refused payload, another schema version, a damaged file
        raise SourceError(f"{path.name} cannot be read as a torch.export program weights-only: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from None
    shape = _example_shape(program)
    metadata = dict(metadata)
    if shape is not None and len(shape) == 5:
        if min(shape[2:]) > 0:
            metadata.setdefault("patch_size", shape[2:])
        if shape[1] > 0:
            metadata.setdefault("in_channels", shape[1])
    module = program.module(check_guards=False)
    for key, hook in list(module._forward_pre_hooks.items()):  # the input-shape guard pins the example's batch
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del module._forward_pre_hooks[key]
    source = module_source(module, metadata)
    source.kind, source.files = "torch-export", [path]
    source.architecture = {"name": "torch-export", "file": path.name}
    source.details = {**source.details, "class": f"torch.export program {path.name}", "example_shape": shape}
    return source
