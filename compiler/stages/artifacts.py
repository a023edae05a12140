"""Compiled artifacts: backends that run a file of their own, built from the engine's graph for one
machine (a TensorRT plan), instead of the graph itself.

Such a backend's record names a build hook (`Backend.build`, a module) with two functions:
- `check(config, precision)`: before anything is loaded, refuse settings or a machine it cannot
  build for (missing library, no GPU, an unsupported precision or mode);
- `build(job) -> Artifact`: compile the graph of `job.precision` into `job.staging`.
The pipeline calls them through `hook` without naming the backend, checks the artifact's parity
against PyTorch on the backend's device, and records `Artifact.manifest` in the engine manifest.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from nnslim.compiler.runtime.backends import BACKENDS, Backend, get_backend
from nnslim.compiler.runtime.precision import AUTO


@dataclass(frozen=True)
class ArtifactJob:
    """What a build hook gets: the build's settings, the engine's graphs and the input shape."""

    config: Any  # the pipeline's BuildConfig (backend-specific settings live there)
    staging: Path
    models: dict[str, Path]  # graph kind ("fp32", "fp16", "int8") -> file
    precision: str
    in_channels: int
    patch: tuple[int, ...]


@dataclass(frozen=True)
class Artifact:
    """A built artifact: its file in the engine directory, the manifest fields it sets (e.g.
    `tensorrt`), and what the build's stage record says of it."""

    file: str
    manifest: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)


def hook(backend: Backend) -> ModuleType:
    """The build hook module of a backend with a compiled artifact."""
    if backend.build is None:
        raise ValueError(f"backend {backend.name!r} runs the engine's graph; it has no artifact to build")
    return importlib.import_module(backend.build)


def compiled_backend(requested: str) -> Backend | None:
    """The backend whose artifact a build makes: the one requested by name, or with "auto" the first
    GPU backend with a build hook that is available here; None: the graph itself runs (CPU candidates)."""
    if requested != AUTO:
        entry = get_backend(requested)
        return entry if entry.build is not None else None
    return next((b for b in BACKENDS.values() if b.build and b.device == "cuda" and b.available()), None)
