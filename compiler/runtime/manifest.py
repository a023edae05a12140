"""The engine directory's `manifest.json`: reading, validating and verifying it.

`build-engine` writes the manifest last, into a staging directory that is renamed into place, so
a directory with a manifest is complete. On load the runtime checks, before opening anything:

- the schema (`parse_manifest`): required keys, types and sane ranges (patch, batch, channels,
  classes, spacing, mirror axes, label names against the number of output heads, region class
  order). A garbled manifest gives one `ManifestError` naming the key, the value and the fix.
  Keys this nnslim does not know are allowed and kept, so newer builds can add records.
- integrity (`verify_files`): every path the runtime opens from the manifest (`runtime_model`,
  each entry of `runtime_models`, the model of each passing `selection.candidates` entry (the
  runtime's fallbacks), the external-data files an ONNX model names, the `.bin` of an
  OpenVINO `.xml`) must be a relative path inside the engine directory, listed in `files`, and
  every listed file must have the recorded size and sha256. A symlink that leaves the
  directory is refused, and so is a manifest that lists no files.

What the hashes protect against: accidental corruption, a partial copy, a file swapped or edited
on its own. What they do not: a deliberate edit of the manifest and the files together (whoever
can write the directory can rewrite both). `manifest_digest` gives the sha256 of the manifest
itself, which a deployment can pin to detect that too.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from nnslim.compiler.runtime.errors import EngineError

MANIFEST = "manifest.json"
FORMAT = "nnslim.engine"
FORMAT_VERSION = 1  # what this nnslim writes
READABLE_VERSIONS = (1,)  # what it reads; version 1 is every manifest written so far

MAX_PATCH = 1024  # voxels per axis of a network patch
MAX_BATCH = 4096
MAX_CHANNELS = 64
MAX_CLASSES = 255  # labels are written as uint8
MAX_SPACING_MM = 1e4
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PATH_KEYS = ("file", "path", "runtime_model", "model")  # where `runtime_models` entries name files


class ManifestError(EngineError):
    """A manifest that is not valid JSON or does not follow the schema."""


class TamperedEngineError(EngineError):
    """An engine whose files do not match its manifest (edited, truncated, swapped or foreign)."""


@dataclass(frozen=True)
class FileRecord:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class EngineManifest:
    """The validated fields the runtime relies on; `raw` keeps the whole manifest (extra keys too)."""

    format_version: int
    backend: str
    runtime_model: str
    input_name: str
    output_name: str
    in_channels: int
    num_classes: int
    patch_size: tuple[int, int, int]
    batch: tuple[int, int, int]  # min, opt, max
    spacing: tuple[float, ...] | None
    mirror_axes: tuple[int, ...]
    labels: tuple[str, ...]
    files: dict[str, FileRecord]
    raw: dict[str, Any]

    def referenced_files(self) -> list[str]:
        """Every file the runtime may open, by the manifest's word (external data comes later)."""
        names = [self.runtime_model, *_runtime_model_names(self.raw.get("runtime_models"))]
        selection = self.raw.get("selection")
        candidates = selection.get("candidates") if isinstance(selection, dict) else None
        for candidate in candidates if isinstance(candidates, list) else []:
            if isinstance(candidate, dict) and candidate.get("passed"):  # the runtime may fall back to these
                names.append(candidate.get("model"))
        return list(dict.fromkeys(names))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def manifest_digest(engine_dir: str | Path) -> str:
    """sha256 of `manifest.json`: pin it in a deployment to detect an edit of manifest and files together."""
    return sha256_file(Path(engine_dir) / MANIFEST)


def rebuild_hint(manifest: dict[str, Any] | None) -> str:
    build = (manifest or {}).get("build") if isinstance(manifest, dict) else None
    command = build.get("command") if isinstance(build, dict) else None
    return f"rebuild it: {command}" if isinstance(command, str) else "rebuild it with `nnslim build-engine CHECKPOINT --out DIR`"


def read_manifest(engine_dir: str | Path, verify: bool = True) -> dict[str, Any]:
    """Load, validate and (by default) verify `manifest.json`; returns the whole manifest dict."""
    return load_manifest(engine_dir, verify).raw


def load_manifest(engine_dir: str | Path, verify: bool = True) -> EngineManifest:
    """`read_manifest`, typed: validated fields plus the raw dict."""
    engine_dir = Path(engine_dir)
    path = engine_dir / MANIFEST
    if not engine_dir.is_dir():
        raise EngineError(f"engine directory not found: {engine_dir}")
    if not path.is_file():
        raise EngineError(f"{engine_dir} has no {MANIFEST}; it is not a complete engine directory; {rebuild_hint(None)}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}); {rebuild_hint(None)}") from exc
    manifest = parse_manifest(raw, path)
    if verify:
        verify_files(engine_dir, manifest)
    return manifest


class _Reader:
    """Typed lookups that name the manifest key and the value seen in every error."""

    def __init__(self, raw: Any, source: Path | str) -> None:
        self.raw, self.source = raw, source

    def fail(self, key: str, value: Any, expected: str) -> ManifestError:
        shown = json.dumps(value)[:80] if _jsonable(value) else repr(value)[:80]
        return ManifestError(f"{self.source}: `{key}` is {shown}, expected {expected}; the manifest is garbled; "
                             f"{rebuild_hint(self.raw)}")

    def get(self, key: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
        value: Any = self.raw
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                if optional:
                    return None
                raise ManifestError(f"{self.source} lacks the required key `{key}`; {rebuild_hint(self.raw)}")
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


def parse_manifest(raw: Any, source: Path | str = MANIFEST) -> EngineManifest:
    """Check the schema of a decoded manifest (see module docstring); extra keys are allowed."""
    if not isinstance(raw, dict):
        raise ManifestError(f"{source} holds {type(raw).__name__}, not a JSON object; {rebuild_hint(None)}")
    r = _Reader(raw, source)
    version = raw.get("format_version")
    if raw.get("format") != FORMAT or type(version) is not int or version not in READABLE_VERSIONS:
        raise ManifestError(
            f"{source} has format {raw.get('format')!r} version {version!r}; this nnslim reads "
            f"{FORMAT!r} versions {list(READABLE_VERSIONS)}; {rebuild_hint(raw)}")
    in_channels, patch, batch = _input_shape(r)
    num_classes = _output_classes(r, patch)
    labels = tuple(r.get("labels", list))
    if len(labels) != num_classes or not all(isinstance(n, str) and n for n in labels):
        raise r.fail("labels", list(labels), f"{num_classes} non-empty label names, one per output head")
    _check_postprocessing(r, num_classes)
    return EngineManifest(
        format_version=version, backend=r.get("backend", str), runtime_model=_member(r, "runtime_model"),
        input_name=r.get("io.input.name", str), output_name=r.get("io.output.name", str), in_channels=in_channels,
        num_classes=num_classes, patch_size=patch, batch=batch, spacing=_spacing(r), mirror_axes=_mirror_axes(r),
        labels=labels, files=_files(r), raw=raw,
    )


def _input_shape(r: _Reader) -> tuple[int, tuple[int, int, int], tuple[int, int, int]]:
    shape = r.get("io.input.shape", list)
    if len(shape) != 5:
        raise r.fail("io.input.shape", shape, "[batch, channels, x, y, z]")
    channels = r.integer("io.input.shape[1]", shape[1], 1, MAX_CHANNELS)
    patch = tuple(r.integer("io.input.shape[2:]", p, 1, MAX_PATCH) for p in shape[2:])
    low, opt, high = (r.integer(f"io.batch.{k}", r.get(f"io.batch.{k}", int), 1, MAX_BATCH) for k in ("min", "opt", "max"))
    if not low <= opt <= high:
        raise r.fail("io.batch", r.raw["io"]["batch"], "min <= opt <= max")
    return channels, patch, (low, opt, high)  # type: ignore[return-value]


def _output_classes(r: _Reader, patch: tuple[int, ...]) -> int:
    shape = r.get("io.output.shape", list)
    if len(shape) != 5 or tuple(shape[2:]) != patch:
        raise r.fail("io.output.shape", shape, f"[batch, classes, {', '.join(map(str, patch))}] (the input's patch)")
    return r.integer("io.output.shape[1]", shape[1], 1, MAX_CLASSES)


def _check_postprocessing(r: _Reader, num_classes: int) -> None:
    post = r.get("postprocessing", dict, optional=True) or {"kind": "argmax"}
    if post.get("kind", "argmax") == "argmax":
        return
    if post.get("kind") != "regions":
        raise r.fail("postprocessing.kind", post.get("kind"), "'argmax' or 'regions'")
    order = r.get("postprocessing.class_order", list)
    if len(order) != num_classes:
        raise r.fail("postprocessing.class_order", order, f"one label value per output head ({num_classes})")
    for value in order:
        r.integer("postprocessing.class_order[]", value, 1, MAX_CLASSES)


def _spacing(r: _Reader) -> tuple[float, ...] | None:
    spacing = r.get("preprocessing.spacing", list, optional=True)
    if not spacing:
        return None
    good = len(spacing) in (2, 3) and all(
        isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and 0 < s <= MAX_SPACING_MM
        for s in spacing)
    if not good:
        raise r.fail("preprocessing.spacing", spacing, f"2 or 3 voxel sizes in mm, each in (0, {MAX_SPACING_MM:g}]")
    return tuple(float(s) for s in spacing)


def _mirror_axes(r: _Reader) -> tuple[int, ...]:
    r.get("preprocessing", dict)
    r.get("preprocessing.normalization", dict)
    axes = r.get("preprocessing.mirror_axes", list, optional=True) or []
    axes = tuple(r.integer("preprocessing.mirror_axes[]", a, 0, 2) for a in axes)
    if len(set(axes)) != len(axes):
        raise r.fail("preprocessing.mirror_axes", list(axes), "distinct axes among 0, 1, 2")
    return axes


def _files(r: _Reader) -> dict[str, FileRecord]:
    files = r.get("files", dict)
    records = {}
    for name, record in files.items():
        _check_relative(r, f"files[{name!r}]", name)
        if not isinstance(record, dict) or not isinstance(record.get("sha256"), str) \
                or not _SHA256.match(record["sha256"]):
            raise r.fail(f"files[{name!r}]", record, "{\"sha256\": 64 hex digits, \"bytes\": size}")
        records[name] = FileRecord(record["sha256"], r.integer(f"files[{name!r}].bytes", record.get("bytes"), 0, 2**62))
    return records


def _member(r: _Reader, key: str) -> str:
    name = r.get(key, str)
    _check_relative(r, key, name)
    return name


def _check_relative(r: _Reader, key: str, name: Any) -> None:
    """A plain relative path that cannot leave the directory (checked again on disk by `verify_files`)."""
    posix, windows = PurePosixPath(str(name)), PureWindowsPath(str(name))
    if (not isinstance(name, str) or not name or "\0" in name or "\\" in name or posix.is_absolute()
            or windows.is_absolute() or windows.drive or ".." in posix.parts or name == MANIFEST):
        raise TamperedEngineError(
            f"{r.source}: `{key}` names {name!r}, which is not a file inside the engine directory; the engine is "
            f"tampered with or damaged; {rebuild_hint(r.raw)}")


def _runtime_model_names(entry: Any) -> list[str]:
    """File names in a `runtime_models` record: {precision: name} or {precision: {"file": name, ...}} or a list."""
    values = entry.values() if isinstance(entry, dict) else entry if isinstance(entry, list) else []
    names = []
    for value in values:
        if isinstance(value, str):
            names.append(value)
        elif isinstance(value, dict):
            names += [value[k] for k in _PATH_KEYS if isinstance(value.get(k), str)]
    return names


def verify_files(engine_dir: Path, manifest: EngineManifest | dict[str, Any]) -> None:
    """Refuse unless every referenced file is listed and every listed file matches its record."""
    if isinstance(manifest, dict):
        manifest = parse_manifest(manifest, Path(engine_dir) / MANIFEST)
    engine_dir, hint = Path(engine_dir), rebuild_hint(manifest.raw)
    if not manifest.files:
        raise TamperedEngineError(f"{engine_dir / MANIFEST} lists no files (`files` is empty), so nothing in the "
                                  f"engine is vouched for; the engine is tampered with or damaged; {hint}")
    for name in manifest.referenced_files():
        _require_listed(engine_dir, manifest, name, "is a model the manifest runs")
    for name, record in manifest.files.items():
        path = inside(engine_dir, name, hint)
        if path.stat().st_size != record.bytes or sha256_file(path) != record.sha256:
            raise TamperedEngineError(f"{engine_dir / name} does not match the sha256 in the manifest (modified, "
                                      f"truncated or swapped): the engine is tampered with or damaged; {hint}")
    for name in manifest.referenced_files():
        for location in onnx_external_data(engine_dir / name):  # resolved beside the model, as ONNX Runtime does
            _require_listed(engine_dir, manifest, str(PurePosixPath(name).parent / location), f"is external data of {name}")
        if name.endswith(".xml"):  # an OpenVINO IR reads its weights from the .bin beside it
            _require_listed(engine_dir, manifest, name[:-4] + ".bin", f"holds the weights of {name}")


def _require_listed(engine_dir: Path, manifest: EngineManifest, name: str, role: str) -> None:
    _check_relative(_Reader(manifest.raw, engine_dir / MANIFEST), "a file the runtime opens", name)
    if PurePosixPath(name).as_posix() not in manifest.files:
        raise TamperedEngineError(
            f"{engine_dir / name} {role} but is not listed with a sha256 in `files`; the engine is tampered "
            f"with or damaged; {rebuild_hint(manifest.raw)}")


def inside(engine_dir: Path, name: str, hint: str = "") -> Path:
    """`engine_dir / name` as a regular file whose real path stays inside `engine_dir` (symlinks resolved)."""
    path = engine_dir / name
    if not path.is_file():
        raise TamperedEngineError(f"{path} is listed in the manifest but missing; {hint or rebuild_hint(None)}")
    real, root = path.resolve(), engine_dir.resolve()
    if not real.is_relative_to(root):
        raise TamperedEngineError(f"{path} is a link to {real}, outside the engine directory; refusing to open it; "
                                  f"{hint or rebuild_hint(None)}")
    return path


def onnx_external_data(model: Path) -> list[str]:
    """Locations of the external-data files an ONNX model names (empty for a plan or a self-contained model)."""
    if model.suffix != ".onnx":
        return []
    import onnx  # lazily: only engines with ONNX models need it

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise TamperedEngineError(f"{model} is not a readable ONNX model ({type(exc).__name__}); "
                                  f"{rebuild_hint(None)}") from exc
    locations = []
    for tensor in _tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations += [e.value for e in tensor.external_data if e.key == "location"]
    return list(dict.fromkeys(locations))


def _tensors(graph: Any) -> list[Any]:
    """Initializers and attribute tensors of a graph and all its subgraphs."""
    tensors = list(graph.initializer)
    for node in graph.node:
        for attribute in node.attribute:
            tensors += ([attribute.t] if attribute.HasField("t") else []) + list(attribute.tensors)
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                tensors += _tensors(sub)
    return tensors


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
