"""Reading an engine directory's manifest and verifying its files before anything is opened.

`build-engine` writes the manifest last, into a staging directory that is renamed into place, so
a directory with a manifest is complete. `load_manifest` reads it, checks its schema
(`schema.parse_manifest`) and then its integrity (`verify_files`): every path the runtime opens
from the manifest (`runtime_model`, each entry of a legacy `runtime_models`, the model of each
passing `selection.candidates` entry (the runtime's fallbacks), the external-data files an ONNX
model names, the `.bin` of an OpenVINO `.xml`) must be a relative path inside the engine
directory, listed in `files`, and every listed file must have the recorded size and sha256. A
symlink that leaves the directory is refused, and so is a manifest that lists no files.

What the hashes protect against: accidental corruption, a partial copy, a file swapped or edited
on its own. What they do not: a deliberate edit of the manifest and the files together (whoever
can write the directory can rewrite both). `manifest_digest` gives the sha256 of the manifest
itself, which a deployment can pin to detect that too.
"""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath
from typing import Any

from nnslim.compiler.runtime.manifest.records import MANIFEST, EngineManifest, rebuild_hint
from nnslim.compiler.runtime.manifest.schema import (
    ManifestError,
    TamperedEngineError,
    check_relative,
    parse_json,
    parse_manifest,
)
from nnslim.errors import EngineError
from nnslim.extras import installed
from nnslim.files import sha256_file


def manifest_digest(engine_dir: str | Path) -> str:
    """sha256 of `manifest.json`: pin it in a deployment to detect an edit of manifest and files together."""
    return sha256_file(Path(engine_dir) / MANIFEST)


def load_manifest(engine_dir: str | Path, verify: bool = True, expected_sha256: str | None = None) -> EngineManifest:
    """Load, validate and (by default) verify `engine_dir/manifest.json`; with `expected_sha256` (a
    pin), the manifest's bytes are read once, hashed and parsed from those same bytes."""
    engine_dir = Path(engine_dir)
    path = engine_dir / MANIFEST
    if not engine_dir.is_dir():
        raise EngineError(f"engine directory not found: {engine_dir}")
    if not path.is_file():
        raise EngineError(f"{engine_dir} has no {MANIFEST}; it is not a complete engine directory; {rebuild_hint()}")
    data = path.read_bytes()
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256.strip().lower():
        raise TamperedEngineError(f"{path} has sha256 {hashlib.sha256(data).hexdigest()}, not the pinned "
                                  f"{expected_sha256}; the engine was changed since it was pinned: rebuild or re-pin it")
    manifest = parse_manifest(parse_json(data, path, ManifestError, rebuild_hint()), path)
    if verify:
        verify_files(engine_dir, manifest)
    return manifest


def verify_files(engine_dir: Path, manifest: EngineManifest) -> None:
    """Refuse unless every referenced file is listed and every listed file matches its record."""
    engine_dir, hint = Path(engine_dir), manifest.rebuild_hint()
    if not manifest.files:
        raise TamperedEngineError(f"{engine_dir / MANIFEST} lists no files (`files` is empty), so nothing in the "
                                  f"engine is vouched for; the engine is tampered with or damaged; {hint}")
    for name in manifest.referenced_files():
        _require_listed(engine_dir, manifest, name, "is a model the manifest runs")
    for name, record in manifest.files.items():
        path = inside(engine_dir, name, hint)
        if path.stat().st_size != record.bytes or sha256_file(path) != record.sha256:
            raise _mismatch(engine_dir / name, hint)
    for name in manifest.referenced_files():
        for location in _external_data(engine_dir, manifest, name):  # resolved beside the model, as ONNX Runtime does
            _require_listed(engine_dir, manifest, str(PurePosixPath(name).parent / location), f"is external data of {name}")
        if name.endswith(".xml"):  # an OpenVINO IR reads its weights from the .bin beside it
            _require_listed(engine_dir, manifest, name[:-4] + ".bin", f"holds the weights of {name}")


def _require_listed(engine_dir: Path, manifest: EngineManifest, name: str, role: str) -> None:
    check_relative(engine_dir / MANIFEST, manifest.rebuild_hint(), "a file the runtime opens", name)
    if PurePosixPath(name).as_posix() not in manifest.files:
        raise TamperedEngineError(
            f"{engine_dir / name} {role} but is not listed with a sha256 in `files`; the engine is tampered "
            f"with or damaged; {manifest.rebuild_hint()}")


def inside(engine_dir: Path, name: str, hint: str = "") -> Path:
    """`engine_dir / name` as a regular file whose real path stays inside `engine_dir` (symlinks resolved)."""
    path = engine_dir / name
    if not path.is_file():
        raise TamperedEngineError(f"{path} is listed in the manifest but missing; {hint or rebuild_hint()}")
    real, root = path.resolve(), engine_dir.resolve()
    if not real.is_relative_to(root):
        raise TamperedEngineError(f"{path} is a link to {real}, outside the engine directory; refusing to open it; "
                                  f"{hint or rebuild_hint()}")
    return path


def _external_data(engine_dir: Path, manifest: EngineManifest, name: str) -> list[str]:
    """The external-data files a model names: as the build recorded them, or (an engine built before
    that was recorded) read from the model with `onnx`, which the runtime alone does not install."""
    recorded = manifest.files[PurePosixPath(name).as_posix()].external_data
    if recorded is not None or not name.endswith(".onnx"):
        return list(recorded or ())
    if not installed("onnx"):
        raise EngineError(f"{engine_dir} was built by an older nnslim that did not record the external-data files of "
                          f"{name}; checking them needs onnx: {manifest.rebuild_hint()}, or pip install 'nnslim[build]'")
    return onnx_external_data(engine_dir / name)


def onnx_external_data(model: Path) -> list[str]:
    """Locations of the external-data files an ONNX model names (empty for a plan or a self-contained model)."""
    if model.suffix != ".onnx":
        return []
    import onnx  # lazily: only engines with ONNX models need it

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise TamperedEngineError(f"{model} is not a readable ONNX model ({type(exc).__name__}); "
                                  f"{rebuild_hint()}") from exc
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


def read_verified(engine_dir: str | Path, manifest: EngineManifest, name: str) -> bytes | None:
    """The bytes of the engine's file `name`, read once and checked against its manifest record:
    hand these to the runtime library, so that what runs is what was hashed (a file swapped after
    `verify_files` cannot run). None for a model with external-data files, which ONNX Runtime and
    OpenVINO resolve by path beside it (those are verified, but opened again by path)."""
    engine_dir, hint = Path(engine_dir), manifest.rebuild_hint()
    record = manifest.files.get(PurePosixPath(name).as_posix())
    if record is None:
        raise TamperedEngineError(f"{engine_dir / name} is not listed with a sha256 in `files`; the engine is "
                                  f"tampered with or damaged; {hint}")
    if record.external_data:
        return None
    with open(inside(engine_dir, name, hint), "rb") as f:
        data = f.read(record.bytes + 1)
    if len(data) != record.bytes or hashlib.sha256(data).hexdigest() != record.sha256:
        raise _mismatch(engine_dir / name, hint)
    return data


def _mismatch(path: Path, hint: str) -> TamperedEngineError:
    return TamperedEngineError(f"{path} does not match the sha256 in the manifest (modified, truncated or swapped): "
                               f"the engine is tampered with or damaged; {hint}")
