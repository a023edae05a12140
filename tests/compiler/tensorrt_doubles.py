"""Test doubles restricted to the real TensorRT classes, for the control-flow checks.

`double(trt, cls)` is `unittest.mock.create_autospec(cls, instance=True, spec_set=True)` of a
real bindings class: reading, calling or assigning a name the class does not have raises. On top
of autospec (which cannot read pybind11 signatures) every method checks its arguments against
the pybind11 overloads, and returns a double of the class its signature names
(`Builder.create_network -> INetworkDefinition`), so a chain of calls stays on real classes.
Tests set only data (`return_value = True`, sizes, bytes).

`install(trt, monkeypatch)` replaces the three factories that would need a GPU (`Builder`,
`Runtime`, `OnnxParser`) with callables that check their arguments the same way and hand out
those doubles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from unittest import mock

from tests.compiler.tensorrt_api import resolve_type, signatures


def _checked(trt: Any, where: str, sigs: list, method: Any, returned: type | None, memo: dict[type, Any]):
    """A side effect that refuses calls no pybind11 overload accepts, and hands out return doubles lazily."""

    def check(*args: Any, **kwargs: Any) -> Any:
        if sigs and not any(s.accepts(len(args), tuple(kwargs)) for s in sigs):
            raise TypeError(f"{where}{args!r} {kwargs!r} matches none of its pybind11 signatures")
        if returned is not None and method._mock_return_value is mock.DEFAULT:  # the test set no value: a double
            method.return_value = double(trt, returned, memo)
        return mock.DEFAULT

    return check


def double(trt: Any, cls: type, memo: dict[type, Any] | None = None) -> Any:
    """A spec_set autospec of the real `cls` whose methods check arity and return doubles."""
    memo = {} if memo is None else memo
    if cls in memo:
        return memo[cls]
    instance = mock.create_autospec(cls, instance=True, spec_set=True)
    memo[cls] = instance
    for name in dir(cls):
        attribute = getattr(cls, name, None)
        if name.startswith("_") or isinstance(attribute, (property, type)) or not callable(attribute):
            continue
        sigs = signatures(attribute, bound=True)
        returned = next((r for r in (resolve_type(trt, s.returns) for s in sigs) if r is not None), None)
        if returned is not None and hasattr(returned, "__members__"):
            returned = None  # enums are data: tests set them
        method = getattr(instance, name)
        method.side_effect = _checked(trt, f"{cls.__name__}.{name}", sigs, method, returned, memo)
    return instance


@dataclass
class Factories:
    """The doubles handed out, and every construction (class name, args)."""

    trt: Any
    made: list[tuple[str, tuple]] = field(default_factory=list)
    memo: dict[type, Any] = field(default_factory=dict)

    def of(self, cls: Any) -> Any:
        """The double of a real class (or of a factory `install` replaced: `of(trt.Builder)`)."""
        return double(self.trt, getattr(cls, "real", cls), self.memo)


def install(trt: Any, monkeypatch: Any) -> Factories:
    """Replace trt.Builder / Runtime / OnnxParser (the GPU-touching factories) with spec'd doubles."""
    factories = Factories(trt)
    for name in ("Builder", "Runtime", "OnnxParser"):
        real = getattr(trt, name)
        sigs = signatures(real.__init__, bound=True)

        def make(*args: Any, _real: type = real, _sigs: list = sigs) -> Any:
            if not any(s.accepts(len(args), ()) for s in _sigs):
                raise TypeError(f"{_real.__name__}{args!r} matches none of its pybind11 signatures")
            factories.made.append((_real.__name__, args))
            return factories.of(_real)

        make.__name__ = name
        make.real = real  # type: ignore[attr-defined]
        monkeypatch.setattr(trt, name, make)
    return factories
