"""The schema of `manifest.json`: a decoded JSON object checked into an `EngineManifest`.

`parse_manifest` checks the required keys, their types and sane ranges (patch, batch, channels,
classes, spacing, mirror axes, label names against the number of output heads, region class
order (distinct labels of the engine: the dataset's label values the build recorded, else 1..heads),
the runtime choices the build recorded). A garbled manifest gives one `ManifestError`
naming the key, the value seen and the fix. Keys this nnslim does not know are allowed and kept
(`EngineManifest.extra`), so newer builds can add records.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable

from nnslim.compiler.runtime.manifest.records import (
    FORMAT,
    MANIFEST,
    READABLE_VERSIONS,
    CandidateRecord,
    EngineManifest,
    FileRecord,
    IORecord,
    ParityRecord,
    SelectionRecord,
    TensorRecord,
    TensorRTRecord,
    Tolerance,
    rebuild_hint,
)
from nnslim.compiler.runtime.safety import MAX_SPACING_MM, unprintable
from nnslim.errors import EngineError, InputError

MAX_PATCH = 1024  # voxels per axis of a network patch
MAX_BATCH = 4096
MAX_CHANNELS = 64
MAX_CLASSES = 255  # labels are written as uint8
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_KNOWN = {"format", "format_version", "created", "backend", "runtime_model", "io", "preprocessing", "labels",
          "postprocessing", "model", "source", "stages", "parity", "precision", "tools", "build", "tensorrt",
          "selection", "files"}


class ManifestError(EngineError):
    """A manifest that is not valid JSON or does not follow the schema."""


class TamperedEngineError(EngineError):
    """An engine whose files do not match its manifest (edited, truncated, swapped or foreign)."""


class _Reader:
    """Typed lookups that name the manifest key and the value seen in every error."""

    def __init__(self, raw: Any, source: Path | str) -> None:
        self.raw, self.source = raw, source
        build = raw.get("build") if isinstance(raw, dict) else None
        self.hint = rebuild_hint(build.get("command") if isinstance(build, dict) else None)

    def fail(self, key: str, value: Any, expected: str) -> ManifestError:
        shown = json.dumps(value)[:80] if _jsonable(value) else repr(value)[:80]
        return ManifestError(f"{self.source}: `{key}` is {shown}, expected {expected}; the manifest is garbled; "
                             f"{self.hint}")

    def get(self, key: str, kind: type | tuple[type, ...], optional: bool = False, within: Any = None) -> Any:
        value: Any = self.raw if within is None else within
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                if optional:
                    return None
                raise ManifestError(f"{self.source} lacks the required key `{key}`; {self.hint}")
            value = value[part]
        if value is None and optional:
            return None
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _tuple(kind)):
            raise self.fail(key, value, _kind_name(kind))
        return value

    def integer(self, key: str, value: Any, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(key, value, f"an integer in [{low}, {high}]")
        return value

    def number(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, value, "a number")
        return float(value)


def parse_json(data: bytes, source: Path | str, error: Callable[[str], Exception], hint: str) -> Any:
    """The JSON value of a file's bytes (a manifest, an nnU-Net plans.json or dataset.json), or
    `error` naming the file (`source`) and what is wrong with it: not UTF-8 text, not JSON, or
    nested deeper than Python's reader follows (a 200,000-deep `[[[...` would end in a RecursionError)."""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"{source} is not UTF-8 text (byte {exc.start} is 0x{data[exc.start]:02x}), so not valid JSON; "
                    f"{hint}") from exc
    except json.JSONDecodeError as exc:
        raise error(f"{source} is not valid JSON ({exc}); {hint}") from exc
    except ValueError as exc:  # an integer beyond Python's digit limit
        raise error(f"{source} holds a value nnslim cannot read ({exc}); {hint}") from None
    except RecursionError:
        raise error(f"{source} nests JSON more than about {sys.getrecursionlimit()} levels deep, which no file "
                    f"nnslim reads does; {hint}") from None


def label_names_ok(names: Any, count: int) -> bool:
    """One non-empty name per class, without control characters (they are printed in tables and reports)."""
    return (isinstance(names, (list, tuple)) and len(names) == count
            and all(isinstance(n, str) and n and not unprintable(n) for n in names))


def parse_manifest(raw: Any, source: Path | str = MANIFEST) -> EngineManifest:
    """Check the schema of a decoded manifest (module docstring) and return it as records."""
    if not isinstance(raw, dict):
        raise ManifestError(f"{source} holds {type(raw).__name__}, not a JSON object; {rebuild_hint()}")
    r = _Reader(raw, source)
    version = raw.get("format_version")
    if raw.get("format") != FORMAT or type(version) is not int or version not in READABLE_VERSIONS:
        raise ManifestError(
            f"{source} has format {raw.get('format')!r} version {version!r}; this nnslim reads "
            f"{FORMAT!r} versions {list(READABLE_VERSIONS)}; {r.hint}")
    io = _io(r)
    labels = tuple(r.get("labels", list))
    if not label_names_ok(labels, io.num_classes):
        raise r.fail("labels", list(labels), f"{io.num_classes} non-empty label names without control characters "
                     "(they are printed in tables and reports), one per output head")
    preprocessing = r.get("preprocessing", dict)
    r.get("preprocessing.normalization", dict)
    _spacing(r)
    _mirror_axes(r)
    return EngineManifest(
        format_version=version, created=raw.get("created"), backend=r.get("backend", str),
        precision=r.get("precision", str, optional=True) or "fp32", runtime_model=member(r, "runtime_model"), io=io,
        preprocessing=preprocessing, labels=labels, postprocessing=_postprocessing(r, io.num_classes),
        model=r.get("model", dict, optional=True) or {}, source=r.get("source", dict, optional=True) or {},
        stages=tuple(r.get("stages", list, optional=True) or ()), parity=_parity(r, r.get("parity", dict, optional=True)),
        tools=r.get("tools", dict, optional=True) or {}, build=r.get("build", dict, optional=True) or {},
        tensorrt=_tensorrt(r), selection=_selection(r), files=_files(r),
        extra={k: v for k, v in raw.items() if k not in _KNOWN},
    )


def _io(r: _Reader) -> IORecord:
    shape = r.get("io.input.shape", list)
    if len(shape) != 5:
        raise r.fail("io.input.shape", shape, "[batch, channels, x, y, z]")
    r.integer("io.input.shape[1]", shape[1], 1, MAX_CHANNELS)
    patch = tuple(r.integer("io.input.shape[2:]", p, 1, MAX_PATCH) for p in shape[2:])
    low, opt, high = (r.integer(f"io.batch.{k}", r.get(f"io.batch.{k}", int), 1, MAX_BATCH) for k in ("min", "opt", "max"))
    if not low <= opt <= high:
        raise r.fail("io.batch", r.raw["io"]["batch"], "min <= opt <= max")
    out = r.get("io.output.shape", list)
    if len(out) != 5 or tuple(out[2:]) != patch:
        raise r.fail("io.output.shape", out, f"[batch, classes, {', '.join(map(str, patch))}] (the input's patch)")
    r.integer("io.output.shape[1]", out[1], 1, MAX_CLASSES)
    tensors = [TensorRecord(r.get(f"io.{t}.name", str), r.get(f"io.{t}.dtype", str, optional=True) or "float32",
                            tuple(r.get(f"io.{t}.shape", list))) for t in ("input", "output")]
    return IORecord(tensors[0], tensors[1], (low, opt, high))


def _postprocessing(r: _Reader, num_classes: int) -> dict[str, Any]:
    post = r.get("postprocessing", dict, optional=True) or {"kind": "argmax"}
    if "steps" in post:  # nnU-Net's post-processing steps, applied to the labels (`build-engine --postprocessing`)
        from nnslim.compiler.runtime.nnunet.postprocessing import check_steps

        try:
            check_steps(post["steps"])
        except InputError as exc:
            raise r.fail("postprocessing.steps", post["steps"], f"nnU-Net's post-processing steps ({exc})") from None
    if post.get("kind", "argmax") == "argmax":
        return post
    if post.get("kind") != "regions":
        raise r.fail("postprocessing.kind", post.get("kind"), "'argmax' or 'regions'")
    order = r.get("postprocessing.class_order", list)
    if len(order) != num_classes:
        raise r.fail("postprocessing.class_order", order, f"one label value per output head ({num_classes})")
    for value in order:
        r.integer("postprocessing.class_order[]", value, 1, MAX_CLASSES)
    recorded = r.get("postprocessing.label_values", list, optional=True)
    if recorded is not None:  # the dataset's labels, recorded by the build
        allowed = {r.integer("postprocessing.label_values[]", v, 1, MAX_CLASSES) for v in recorded}
        expected = f"one of the engine's label values {sorted(allowed)} (postprocessing.label_values)"
    else:  # one label per head: nnU-Net numbers a region-based dataset's labels 1..regions
        allowed, expected = set(range(1, num_classes + 1)), f"a label value in [1, {num_classes}], one per output head"
    for value in order:
        if value not in allowed:
            raise r.fail("postprocessing.class_order[]", value, expected)
    if len(set(order)) != len(order):
        raise r.fail("postprocessing.class_order", order, "distinct label values, one per output head")
    return post


def _spacing(r: _Reader) -> None:
    spacing = r.get("preprocessing.spacing", list, optional=True)
    if not spacing:
        return
    good = len(spacing) in (2, 3) and all(
        isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and 0 < s <= MAX_SPACING_MM
        for s in spacing)
    if not good:
        raise r.fail("preprocessing.spacing", spacing, f"2 or 3 voxel sizes in mm, each in (0, {MAX_SPACING_MM:g}]")


def _mirror_axes(r: _Reader) -> None:
    axes = r.get("preprocessing.mirror_axes", list, optional=True) or []
    axes = tuple(r.integer("preprocessing.mirror_axes[]", a, 0, 2) for a in axes)
    if len(set(axes)) != len(axes):
        raise r.fail("preprocessing.mirror_axes", list(axes), "distinct axes among 0, 1, 2")


_PARITY_NUMBERS = ("max_abs_logit_error", "mean_abs_logit_error", "max_abs_reference_logit", "argmax_agreement")


def _parity(r: _Reader, raw: dict[str, Any] | None) -> ParityRecord:
    """A parity record; an engine written before a field existed gets NaN (nothing gates on it at run time)."""
    raw = raw or {}
    numbers = {k: r.number(f"parity.{k}", raw[k]) if k in raw else math.nan for k in _PARITY_NUMBERS}
    rel = raw.get("max_rel_logit_error")
    tolerance = raw.get("tolerance")
    return ParityRecord(
        source=str(raw.get("source", "")), tiles=int(raw.get("tiles", 0) or 0), voxels=int(raw.get("voxels", 0) or 0),
        max_rel_logit_error=r.number("parity.max_rel_logit_error", rel) if rel is not None else math.nan,
        tolerance=_tolerance(r, "parity.tolerance", tolerance), figure=raw.get("figure"),
        extra={k: v for k, v in raw.items() if k not in {*_PARITY_NUMBERS, "source", "tiles", "voxels",
                                                           "max_rel_logit_error", "tolerance", "figure"}},
        **numbers,
    )


def _tolerance(r: _Reader, key: str, raw: Any) -> Tolerance | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise r.fail(key, raw, "an object with max_rel_logit_error and min_argmax_agreement")
    return Tolerance(r.number(f"{key}.max_rel_logit_error", raw.get("max_rel_logit_error")),
                     r.number(f"{key}.min_argmax_agreement", raw.get("min_argmax_agreement")))


def _selection(r: _Reader) -> SelectionRecord | None:
    raw = r.get("selection", dict, optional=True)
    if raw is None:
        return None
    candidates = []
    for i, c in enumerate(r.get("candidates", list, optional=True, within=raw) or []):
        key = f"selection.candidates[{i}]"
        if not isinstance(c, dict) or not all(isinstance(c.get(k), str) for k in ("backend", "precision")) \
                or not isinstance(c.get("passed"), bool):
            raise r.fail(key, c, "an object with backend, precision (strings), model and passed (true/false)")
        if c["passed"]:
            _check_relative(r, f"{key}.model", c.get("model"))
        candidates.append(CandidateRecord(
            backend=c["backend"], precision=c["precision"], model=str(c.get("model")), passed=c["passed"],
            error=c.get("error"), seconds_per_batch=c.get("seconds_per_batch"), speedup_vs_torch=c.get("speedup_vs_torch"),
            parity=_parity(r, c["parity"]) if isinstance(c.get("parity"), dict) else None,
            tolerance=_tolerance(r, f"{key}.tolerance", c.get("tolerance")),
            extra={k: v for k, v in c.items() if k not in {"backend", "precision", "model", "passed", "error",
                                                             "seconds_per_batch", "speedup_vs_torch", "parity",
                                                             "tolerance"}}))
    known = {"backend", "precision", "batch", "candidates", "skipped", "requested", "reference_seconds_per_batch",
             "models", "machine"}
    return SelectionRecord(
        backend=str(raw.get("backend", r.raw.get("backend"))), precision=str(raw.get("precision", "fp32")),
        batch=int(raw.get("batch") or 1), candidates=tuple(candidates), skipped=tuple(raw.get("skipped") or ()),
        requested=dict(raw.get("requested") or {}), reference_seconds_per_batch=raw.get("reference_seconds_per_batch"),
        models=dict(raw.get("models") or {}), machine=dict(raw.get("machine") or {}),
        extra={k: v for k, v in raw.items() if k not in known})


def _tensorrt(r: _Reader) -> TensorRTRecord | None:
    raw = r.get("tensorrt", dict, optional=True)
    if raw is None:
        return None
    capability = raw.get("compute_capability") or ()
    return TensorRTRecord(version=raw.get("version"), gpu=raw.get("gpu"),
                          compute_capability=tuple(capability) if isinstance(capability, list) else (),
                          onnx_model=raw.get("onnx_model"), cache_hit=raw.get("cache_hit"),
                          extra={k: v for k, v in raw.items()
                                 if k not in {"version", "gpu", "compute_capability", "onnx_model", "cache_hit"}})


def _files(r: _Reader) -> dict[str, FileRecord]:
    files = r.get("files", dict)
    records = {}
    for name, record in files.items():
        _check_relative(r, f"files[{name!r}]", name)
        if not isinstance(record, dict) or not isinstance(record.get("sha256"), str) \
                or not _SHA256.match(record["sha256"]):
            raise r.fail(f"files[{name!r}]", record, "{\"sha256\": 64 hex digits, \"bytes\": size}")
        external = record.get("external_data")
        if external is not None and (not isinstance(external, list) or not all(isinstance(e, str) for e in external)):
            raise r.fail(f"files[{name!r}].external_data", external, "a list of file names")
        records[name] = FileRecord(record["sha256"], r.integer(f"files[{name!r}].bytes", record.get("bytes"), 0, 2**62),
                                   None if external is None else tuple(external))
    return records


def member(r: _Reader, key: str) -> str:
    name = r.get(key, str)
    _check_relative(r, key, name)
    return name


def _check_relative(r: _Reader, key: str, name: Any) -> None:
    check_relative(r.source, r.hint, key, name)


def check_relative(source: Path | str, hint: str, key: str, name: Any) -> None:
    """Refuse a file name that is not a plain relative path inside the engine directory (checked again
    on disk by `verify.verify_files`)."""
    posix, windows = PurePosixPath(str(name)), PureWindowsPath(str(name))
    if (not isinstance(name, str) or not name or "\0" in name or "\\" in name or posix.is_absolute()
            or windows.is_absolute() or windows.drive or ".." in posix.parts or name == MANIFEST):
        raise TamperedEngineError(
            f"{source}: `{key}` names {name!r}, which is not a file inside the engine directory; the engine is "
            f"tampered with or damaged; {hint}")


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number", bool: "true/false"}
    return " or ".join(names.get(k, k.__name__) for k in _tuple(kind))
