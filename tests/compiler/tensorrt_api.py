"""Which TensorRT names nnslim's code uses, found by walking its AST, and checked on a real module.

No list of names is kept anywhere: the walker follows the `tensorrt` module object through the
code and records every attribute read, call and property assignment made on it and on the
objects it returns. Types flow the way a reader would follow them:

- roots: `import tensorrt` and any call of a function named `import_tensorrt`;
- `trt.X` is the real attribute of the real module (a class, an enum member, a function);
- calling a class gives an instance of it; calling a method gives the class its pybind11
  signature returns (`create_network(...) -> tensorrt.INetworkDefinition`); reading a property
  gives the type its getter's signature returns;
- values flow through local variables, `self.x` attributes of a class, the parameters and return
  values of the walked modules' own functions (iterated to a fixpoint), and through
  "forwarders" such as `create(factory, *args)`, recognised by their body calling their first
  parameter with their `*args`.

Each use is checked against the real module: the attribute must exist (`getattr(x, "n", default)`
is an optional use and may be absent), a call must bind to one of the pybind11 overloads
(positional count and keyword names), and an assigned attribute must be a property with a setter.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_SIGNATURE = re.compile(r"^(?:\d+\.\s*)?(\w*)\((.*)\)\s*->\s*(.+?)\s*$")


@dataclass(frozen=True)
class Finding:
    """One use of the TensorRT API that the real module does not have."""

    file: str
    line: int
    owner: str
    name: str
    problem: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.owner}.{self.name}: {self.problem}"


@dataclass(frozen=True)
class Use:
    """One checked use (for reporting what was covered)."""

    file: str
    line: int
    owner: str
    name: str


# ----------------------------------------------------------------- abstract values

@dataclass(frozen=True)
class Module:
    """The tensorrt module itself."""


@dataclass(frozen=True)
class Class:
    cls: type


@dataclass(frozen=True)
class Instance:
    cls: type


@dataclass(frozen=True)
class Callable_:
    owner: str
    name: str
    obj: Any = field(compare=False)
    bound: bool  # drop the `self` parameter of its signatures


@dataclass(frozen=True)
class ImportTensorrt:
    """`import_tensorrt`, under whatever name it was imported."""


@dataclass(frozen=True)
class LocalFunction:
    name: str


@dataclass(frozen=True)
class Forwarder:
    name: str


# ----------------------------------------------------------------- pybind11 signatures

def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "[(<{":
            depth += 1
        elif char in "])>}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    tail = text[start:].strip()
    return parts + ([tail] if tail else [])


@dataclass(frozen=True)
class Signature:
    params: tuple[tuple[str, bool], ...]  # (name, has_default)
    star_args: bool
    returns: str

    def accepts(self, positional: int, keywords: tuple[str, ...]) -> bool:
        names = [name for name, _ in self.params]
        if positional > len(names) and not self.star_args:
            return False
        filled = set(names[:positional])
        for keyword in keywords:
            if keyword not in names or keyword in filled:
                return self.star_args
            filled.add(keyword)
        return all(has_default or name in filled for name, has_default in self.params)


def signatures(obj: Any, bound: bool) -> list[Signature]:
    """The pybind11 signatures in `obj.__doc__` (one per overload); [] when it has none."""
    doc = getattr(obj, "__doc__", None) or ""
    lines = doc.splitlines()
    overloaded = any(line.strip() == "Overloaded function." for line in lines[:3])
    candidates = [line.strip() for line in lines if re.match(r"^\s*\d+\.\s*\w*\(", line)] if overloaded else lines[:1]
    found = []
    for line in candidates:
        match = _SIGNATURE.match(line.strip())
        if not match:
            continue
        params, star = [], False
        for part in _split_top_level(match.group(2)):
            if part in ("/", "*"):
                continue
            if part.startswith("*"):
                star = True
                continue
            name = part.split(":")[0].split("=")[0].strip()
            params.append((name, "=" in part))
        if bound and params and params[0][0] == "self":
            params = params[1:]
        found.append(Signature(tuple(params), star, match.group(3)))
    return found


def resolve_type(trt: Any, annotation: str) -> type | None:
    """The real class an annotation names (`tensorrt.X`, `Optional[tensorrt.X]`, `ns::IX`), else None."""
    text = annotation.strip()
    optional = re.fullmatch(r"(?:typing\.)?Optional\[(.*)\]", text)
    if optional:
        text = optional.group(1)
    text = re.sub(r"\s*\|\s*None$", "", text)
    if not re.fullmatch(r"[\w.:]+", text):
        return None  # list[...], tuple[...], unions: not one object
    name = re.split(r"::|\.", text)[-1]
    # pybind11 prints the C++ name (nvonnxparser::IParserError) when the return type was bound
    # after the method; the Python class drops the interface's leading "I" (ParserError).
    for candidate in (name, name[1:] if name.startswith("I") else None):
        obj = getattr(trt, candidate, None) if candidate else None
        if isinstance(obj, type) and obj.__module__.split(".")[0] in _trt_roots(trt):
            return obj
    return None


def _trt_roots(trt: Any) -> set[str]:
    return {trt.__name__.split(".")[0], "tensorrt", "tensorrt_bindings"}


# ----------------------------------------------------------------- the walker

class _Walker:
    """Abstract interpretation of a set of modules, just enough to follow the tensorrt objects."""

    def __init__(self, trt: Any, sources: dict[str, str]) -> None:
        self.trt = trt
        self.trees = {name: ast.parse(text) for name, text in sources.items()}
        self.functions: dict[str, ast.FunctionDef] = {}
        self.forwarders: set[str] = set()
        for tree in self.trees.values():
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    self.functions.setdefault(node.name, node)
                    if _is_forwarder(node):
                        self.forwarders.add(node.name)
        self.param_values: dict[tuple[str, str], Any] = {}
        self.return_values: dict[str, Any] = {}
        self.class_attrs: dict[tuple[str, str], Any] = {}
        self.findings: dict[tuple, Finding] = {}
        self.uses: dict[tuple, Use] = {}
        self.file = ""
        self.function = "<module>"
        self.changed = False

    # --- driver
    def run(self) -> None:
        for _ in range(10):  # fixpoint over parameters, returns and self attributes
            self.changed = False
            for self.file, tree in self.trees.items():
                self._walk_body(tree.body, {}, None)
            if not self.changed:
                return

    def _learn(self, table: dict, key: Any, value: Any) -> None:
        if value is not None and table.get(key) is None:
            table[key] = value
            self.changed = True

    # --- statements
    def _walk_body(self, body: list[ast.stmt], env: dict[str, Any], cls: str | None) -> None:
        for statement in body:
            self._walk_statement(statement, env, cls)

    def _walk_statement(self, node: ast.stmt, env: dict[str, Any], cls: str | None) -> None:
        if isinstance(node, ast.ClassDef):
            self._walk_body(node.body, {}, node.name)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local = dict(env)
            for arg in node.args.posonlyargs + node.args.args + node.args.kwonlyargs:
                local[arg.arg] = self.param_values.get((node.name, arg.arg))
            outer, self.function = self.function, node.name
            self._walk_body(node.body, local, cls)
            self.function = outer
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            value = self._eval(node.value, env, cls) if node.value is not None else None
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                self._bind(target, value, env, cls)
        elif isinstance(node, ast.Return):
            if node.value is not None:
                self._learn(self.return_values, self.function, self._eval(node.value, env, cls))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if isinstance(node, ast.Import) and alias.name == "tensorrt":
                    env[alias.asname or alias.name] = Module()
                elif isinstance(node, ast.ImportFrom) and alias.name == "import_tensorrt":
                    env[alias.asname or alias.name] = ImportTensorrt()
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                value = self._eval(item.context_expr, env, cls)
                if item.optional_vars is not None:
                    self._bind(item.optional_vars, value, env, cls)
            self._walk_body(node.body, env, cls)
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            self._eval(node.iter, env, cls)
            self._bind(node.target, None, env, cls)
            self._walk_body(node.body + node.orelse, env, cls)
        else:  # if / while / try / expression / raise / del / assert: evaluate everything inside
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    self._walk_statement(child, env, cls)
                elif isinstance(child, ast.expr):
                    self._eval(child, env, cls)
                elif isinstance(child, ast.ExceptHandler):
                    self._walk_body(child.body, env, cls)

    def _bind(self, target: ast.expr, value: Any, env: dict[str, Any], cls: str | None) -> None:
        if isinstance(target, ast.Name):
            env[target.id] = value
        elif isinstance(target, ast.Attribute):
            if isinstance(target.value, ast.Name) and target.value.id == "self" and cls:
                self._learn(self.class_attrs, (cls, target.attr), value)
            else:
                self._check_assignment(self._eval(target.value, env, cls), target)
        elif isinstance(target, (ast.Tuple, ast.List)):
            values = value if isinstance(value, tuple) and len(value) == len(target.elts) else (None,) * len(target.elts)
            for element, element_value in zip(target.elts, values):
                self._bind(element, element_value, env, cls)

    # --- expressions
    def _eval(self, node: ast.expr, env: dict[str, Any], cls: str | None) -> Any:
        if isinstance(node, ast.Name):
            if node.id in env:
                return env[node.id]
            if node.id in self.forwarders:
                return Forwarder(node.id)
            return LocalFunction(node.id) if node.id in self.functions else None
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self" and cls:
                return self.class_attrs.get((cls, node.attr))
            return self._attribute(self._eval(node.value, env, cls), node.attr, node.lineno, optional=False)
        if isinstance(node, ast.Call):
            return self._call(node, env, cls)
        if isinstance(node, ast.Tuple):
            return tuple(self._eval(element, env, cls) for element in node.elts)
        if isinstance(node, ast.Lambda):
            return None
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            local = dict(env)
            for generator in node.generators:
                self._eval(generator.iter, local, cls)
                self._bind(generator.target, None, local, cls)
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.expr):
                    self._eval(child, local, cls)
            return None
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self._eval(child, env, cls)
            elif isinstance(child, ast.comprehension):
                self._eval(child.iter, env, cls)
        return None

    def _call(self, node: ast.Call, env: dict[str, Any], cls: str | None) -> Any:
        function = self._eval(node.func, env, cls)
        args = [self._eval(arg, env, cls) for arg in node.args]
        for keyword in node.keywords:
            self._eval(keyword.value, env, cls)
        callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if callee == "import_tensorrt" or isinstance(function, ImportTensorrt):
            return Module()
        if callee == "getattr" and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
            return self._attribute(args[0], str(node.args[1].value), node.lineno, optional=len(node.args) > 2)
        if isinstance(function, Forwarder) and node.args:
            inner = ast.Call(func=node.args[0], args=node.args[1:], keywords=node.keywords)
            ast.copy_location(inner, node)
            return self._call(inner, env, cls)
        if isinstance(function, LocalFunction):
            parameters = self.functions[function.name].args
            names = [a.arg for a in parameters.posonlyargs + parameters.args]
            for name, value in zip(names, args):
                self._learn(self.param_values, (function.name, name), value)
            return self.return_values.get(function.name)
        return self._apply(function, node)

    def _apply(self, function: Any, node: ast.Call) -> Any:
        if isinstance(function, Class):
            self._check_call(function.cls.__name__, "__init__", function.cls.__init__, True, node)
            return Instance(function.cls)
        if isinstance(function, Callable_):
            found = self._check_call(function.owner, function.name, function.obj, function.bound, node)
            for signature in found:
                resolved = resolve_type(self.trt, signature.returns)
                if resolved is not None:
                    return Instance(resolved)
        return None

    # --- checks
    def _record(self, owner: str, name: str, line: int, problem: str | None) -> None:
        self.uses[(self.file, line, owner, name)] = Use(self.file, line, owner, name)
        if problem:
            self.findings[(self.file, line, owner, name, problem)] = Finding(self.file, line, owner, name, problem)

    def _attribute(self, base: Any, name: str, line: int, optional: bool) -> Any:
        if isinstance(base, Module):
            owner, holder = "tensorrt", self.trt
        elif isinstance(base, (Class, Instance)):
            owner, holder = base.cls.__name__, base.cls
        else:
            return None
        missing = object()
        obj = getattr(holder, name, missing)
        if obj is missing:
            if not optional:
                self._record(owner, name, line, f"{owner} has no attribute {name!r} in TensorRT {self.trt.__version__}")
            return None
        self._record(owner, name, line, None)
        if isinstance(obj, type):
            return Class(obj)
        if isinstance(obj, property):
            if isinstance(base, Instance):
                returned = [resolve_type(self.trt, s.returns) for s in signatures(obj.fget, bound=False)]
                return next((Instance(r) for r in returned if r is not None), None)
            return None
        if callable(obj):
            return Callable_(owner, name, obj, bound=not isinstance(base, Module) and not isinstance(obj, staticmethod))
        if type(obj).__module__.split(".")[0] in _trt_roots(self.trt):
            return Instance(type(obj))  # an enum member such as Logger.WARNING
        return None

    def _check_call(self, owner: str, name: str, obj: Any, bound: bool, node: ast.Call) -> list[Signature]:
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            return signatures(obj, bound)
        found = signatures(obj, bound)
        keywords = tuple(k.arg for k in node.keywords)
        matching = [s for s in found if s.accepts(len(node.args), keywords)]
        if found and not matching:
            shapes = "; ".join("(" + ", ".join(n + ("=..." if d else "") for n, d in s.params) + ")" for s in found)
            self._record(owner, name, node.lineno, f"called with {len(node.args)} positional argument(s) and "
                                                   f"keywords {list(keywords)}, but it takes {shapes}")
        return matching or found

    def _check_assignment(self, base: Any, target: ast.Attribute) -> None:
        if not isinstance(base, Instance):
            return
        obj = getattr(base.cls, target.attr, None)
        owner = base.cls.__name__
        if obj is None:
            self._record(owner, target.attr, target.lineno,
                         f"{owner} has no attribute {target.attr!r} to assign in TensorRT {self.trt.__version__}")
        elif not isinstance(obj, property) or obj.fset is None:
            self._record(owner, target.attr, target.lineno, f"{owner}.{target.attr} is not a settable property")
        else:
            self._record(owner, target.attr, target.lineno, None)


def _is_forwarder(function: ast.FunctionDef) -> bool:
    """`def f(factory, *args): ... factory(*args)`: a call of f(g, x) is a call of g(x)."""
    arguments = function.args
    if not arguments.args or arguments.vararg is None:
        return False
    first, rest = arguments.args[0].arg, arguments.vararg.arg
    return any(isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == first
               and len(node.args) == 1 and isinstance(node.args[0], ast.Starred)
               and isinstance(node.args[0].value, ast.Name) and node.args[0].value.id == rest
               for node in ast.walk(function))


def check_sources(trt: Any, sources: dict[str, str]) -> tuple[list[Finding], list[Use]]:
    """Walk `sources` (name -> Python text) together; the findings and every checked use."""
    walker = _Walker(trt, sources)
    walker.run()
    findings = sorted(walker.findings.values(), key=lambda f: (f.file, f.line, f.name))
    return findings, sorted(walker.uses.values(), key=lambda u: (u.file, u.line, u.name))


def tensorrt_modules(root: Path) -> dict[str, str]:
    """nnslim's source files that get hold of the tensorrt module (import it or call import_tensorrt)."""
    found = {}
    for path in sorted(p for folder in ("compiler", "training", "nnslim", "scripts") for p in (root / folder).rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        uses = any(isinstance(node, (ast.Import, ast.ImportFrom))
                   and any(a.name in ("tensorrt", "import_tensorrt") for a in node.names)
                   or isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "import_tensorrt"
                   for node in ast.walk(tree))
        if uses:
            found[path.relative_to(root).as_posix()] = text
    return found
