"""nnU-Net's small pickles (`postprocessing.pkl`, a case's properties `.pkl`) read without being
unpickled freely.

`pickle.load` builds whatever a file names, so these files go through `read`: an unpickler whose
`find_class` knows a few names and nothing else. Numbers numpy pickled (`numpy.dtype`,
`multiarray.scalar`, `multiarray._reconstruct` of an `ndarray`, protocol 5's `numeric._frombuffer`)
become placeholders that decode the file's bytes themselves (`np.frombuffer` on a numeric type:
booleans, integers, floats), so numpy
never runs anything a file says; any other name is an `InputError` before anything is built. The
caller adds the names it maps (nnU-Net's post-processing function, as a string) and checks the
shape of what comes back.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import reprlib
import stat
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nnslim.errors import InputError

NUMERIC = {"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8"}
INTEGERS = {"i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8"}
_SCALAR = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}
_RECONSTRUCT = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}
_FROMBUFFER = {("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}
MAX_ARRAY = 1 << 16  # values in one array: a properties file holds 4x4 affines
MAX_VALUES = 100_000  # values in one file, shared references counted each time they are reached


class _Type:
    """A pickled numpy dtype: its type code and byte order, checked against the allowed codes."""

    def __init__(self, codes: set[str], what: str, code: Any, align: Any = False, copy: Any = False) -> None:
        if code not in codes:
            raise InputError(f"{what} holds a numpy value of type {code!r:.20}; nnslim reads "
                             f"{', '.join(sorted(codes))} values only")
        self.code, self.order, self.what = code, "<", what

    def __setstate__(self, state: Any) -> None:  # pickle's BUILD: numpy's (version, byte order, ...)
        if not (isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", ">", "|", "=")):
            raise InputError(f"{self.what}: a numpy type with an unexpected state")
        self.order = ">" if state[1] == ">" else "<"

    def dtype(self) -> np.dtype:
        return np.dtype(self.order + self.code)


class _Array:
    """A pickled numpy array (`_reconstruct`, then BUILD with its shape, type and bytes)."""

    def __init__(self, what: str) -> None:
        self.what, self.value = what, None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[1], tuple)
                and isinstance(state[2], _Type) and isinstance(state[4], bytes)):
            raise InputError(f"{self.what}: a numpy array with an unexpected state")
        self.value = _decode(self.what, state[4], state[2], state[1], "F" if state[3] else "C")


def _decode(what: str, data: Any, kind: Any, shape: Any, order: Any) -> np.ndarray:
    """A small numeric array from its bytes, type, shape and order, each checked first."""
    if not (isinstance(data, (bytes, bytearray)) and isinstance(kind, _Type) and isinstance(shape, tuple)
            and order in ("C", "F")):
        raise InputError(f"{what}: a numpy array with an unexpected state")
    if not all(type(s) is int and 0 <= s <= MAX_ARRAY for s in shape) or math.prod(shape) > MAX_ARRAY:
        raise InputError(f"{what}: a numpy array of shape {shown(shape)}; nnslim reads small arrays only")
    dtype = kind.dtype()
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise InputError(f"{what}: a numpy array whose bytes do not fit its shape")
    return np.frombuffer(bytes(data), dtype).reshape(shape, order=order).copy()


class _Short(reprlib.Repr):
    """`reprlib` with small limits: a value from a file is shown without building its whole repr."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother = 3, width, width
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = self.maxfrozenset = 6

    def repr_int(self, x: int, level: int) -> str:
        return f"<an integer of {x.bit_length()} bits>" if x.bit_length() > 256 else repr(x)

    def repr_bytes(self, x: bytes, level: int) -> str:
        return repr(x[:self.maxstring]) + ("..." if len(x) > self.maxstring else "")

    repr_bytearray = repr_bytes


def shown(value: Any, width: int = 40) -> str:
    """A short repr of `value` (at most about `width` characters per part), whatever a file held."""
    return _Short(width).repr(value)[:2 * width]


def _plain(value: Any, budget: list[int], depth: int = 0) -> Any:
    """The loaded structure with array placeholders replaced by their arrays; bounded in depth and in
    values visited (a pickle's shared references must not multiply the walk)."""
    budget[0] -= 1
    if depth > 32 or budget[0] < 0:
        raise InputError(f"a pickle nested or repeated beyond nnslim's bounds (depth 32, {MAX_VALUES} values)")
    if isinstance(value, _Array):
        return value.value
    if isinstance(value, dict):
        return {_plain(k, budget, depth + 1): _plain(v, budget, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, budget, depth + 1) for v in value)
    if isinstance(value, (set, frozenset, _Type)):
        raise InputError(f"a pickle holding a {type(value).__name__.strip('_')}, which nnU-Net's files do not hold")
    return value


def read_regular(path: Path, what: str, max_bytes: int) -> bytes:
    """At most `max_bytes` + 1 bytes of a regular file: opened without blocking (a FIFO would wait
    forever), refused when it is a device, a FIFO or a folder, and never read past the bound."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise InputError(f"cannot open {path.name} ({exc.strerror}); {what} is a file nnU-Net wrote") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"{path.name} is not a regular file; {what} is a file nnU-Net wrote")
        os.set_blocking(fd, True)
        return f.read(max_bytes + 1)


def read(path: Path, what: str, names: dict[tuple[str, str], Any] | None = None, codes: set[str] = NUMERIC,
         max_bytes: int = 1 << 20) -> Any:
    """The content of the pickle at `path` (module docstring): `names` maps (module, name) pairs to
    what stands for them; `codes` are the numpy types its numbers may have; `what` names the file
    in errors. A damaged or foreign pickle is an `InputError` naming what failed."""
    path = Path(path)
    data = read_regular(path, what, max_bytes)
    if len(data) > max_bytes:
        raise InputError(f"{path.name} is more than {max_bytes} bytes; {what} is at most {max_bytes}")

    def scalar(kind: Any, raw: Any = None) -> Any:
        if not (isinstance(kind, _Type) and isinstance(raw, bytes) and len(raw) == kind.dtype().itemsize):
            raise InputError(f"{what}: a numpy scalar that is not a number of its declared size")
        return np.frombuffer(raw, kind.dtype())[0].item()

    known: dict[tuple[str, str], Callable[..., Any] | Any] = {
        **{k: scalar for k in _SCALAR}, ("numpy", "dtype"): lambda *a: _Type(codes, what, *a),
        **{k: (lambda cls, *a: _Array(what)) for k in _RECONSTRUCT},
        ("numpy", "ndarray"): "numpy.ndarray",  # only ever an argument of _reconstruct
        **{k: (lambda data, kind, shape, order: _decode(what, data, kind, shape, order)) for k in _FROMBUFFER},
        **(names or {})}

    class Reader(pickle._Unpickler):  # Python's own: its memo is a dict (the C one preallocates to any index)
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) in known:
                return known[(module, name)]
            raise InputError(f"{what} names {module}.{name}, which nnslim does not run (the file is read with an "
                             "allow-list, not unpickled freely)")

    try:
        return _plain(Reader(io.BytesIO(data)).load(), [MAX_VALUES])
    except InputError:
        raise
    except (Exception, RecursionError) as exc:  # a damaged or foreign pickle: any error the unpickler raises
        raise InputError(f"{path.name} is not {what}: {type(exc).__name__}: {exc}") from None
