"""The engine directory's `manifest.json`: reading and verifying it.

`build-engine` writes the manifest last, into a temporary directory that is renamed into place,
so a directory with a manifest is complete. The runtime still checks the sha256 of every file the
manifest lists, so a tampered or half-copied engine is refused with a rebuild hint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from nnslim.compiler.runtime.errors import EngineError

MANIFEST = "manifest.json"
FORMAT = "nnslim.engine"
FORMAT_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def rebuild_hint(manifest: dict[str, Any] | None) -> str:
    command = (manifest or {}).get("build", {}).get("command")
    return f"rebuild it: {command}" if command else "rebuild it with `nnslim build-engine CHECKPOINT --out DIR`"


def read_manifest(engine_dir: str | Path, verify: bool = True) -> dict[str, Any]:
    """Load `manifest.json` and (by default) check every listed file's size and sha256."""
    engine_dir = Path(engine_dir)
    path = engine_dir / MANIFEST
    if not engine_dir.is_dir():
        raise EngineError(f"engine directory not found: {engine_dir}")
    if not path.is_file():
        raise EngineError(f"{engine_dir} has no {MANIFEST}; it is not a complete engine directory; {rebuild_hint(None)}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineError(f"{path} is not valid JSON ({exc}); {rebuild_hint(None)}") from exc
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise EngineError(
            f"{path} has format {manifest.get('format')!r} v{manifest.get('format_version')!r}; "
            f"this nnslim reads {FORMAT!r} v{FORMAT_VERSION}; {rebuild_hint(manifest)}"
        )
    if verify:
        verify_files(engine_dir, manifest)
    return manifest


def verify_files(engine_dir: Path, manifest: dict[str, Any]) -> None:
    for name, record in manifest.get("files", {}).items():
        path = engine_dir / name
        if not path.is_file():
            raise EngineError(f"{path} is listed in the manifest but missing; {rebuild_hint(manifest)}")
        if path.stat().st_size != record["bytes"] or sha256_file(path) != record["sha256"]:
            raise EngineError(
                f"{path} does not match the sha256 in the manifest (modified or truncated); {rebuild_hint(manifest)}"
            )
