"""Engines built once per model and machine, then reused (`nnslim-predict-nnunet`'s cache).

An engine is built into `cache_root()/engines/KEY` (a private folder, `nnslim.cache.private_folder`)
where KEY hashes everything that decides it: the nnslim version, the sha256 of the model folder's
plans.json, dataset.json and each chosen fold's checkpoint, the folds, the checkpoint name, and the
machine (CPU model and the instruction sets the candidates use, the GPU, the runtime libraries'
versions). A model retrained, a fold added or another CPU is another key: never a stale engine.

Two processes asking for the same engine at once (array-job parts) build it once: the second waits
on a lock file and then reuses the first's. Opening a cached engine verifies every file's sha256
against its manifest, as every `load_engine` does. Without a usable private cache folder, the
engine is built into a temporary folder for this run only (a warning says so).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Iterator

from nnslim.cache import cache_root, entry_key, private_folder
from nnslim.compiler.stages.nnunet_import import available_folds
from nnslim.files import sha256_file

logger = logging.getLogger(__name__)

LIBRARIES = ("nnslim", "torch", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt-cu13", "tensorrt-cu12")


def machine() -> dict[str, object]:
    """What about this machine decides which engine is fastest and which can run."""
    from nnslim.compiler.runtime.backends.openvino_cpu import cpu_record

    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {"arch": platform.machine(), "cpu": cpu_record(), "gpu": _gpu_name(), "libraries": versions}


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except (ImportError, RuntimeError):
        return None


def engine_key(folder: Path, folds: tuple[str, ...], checkpoint: str, precision: str = "auto") -> str:
    """The cache key of an nnU-Net model folder's engine (module docstring)."""
    files = ["plans.json", "dataset.json", *(f"fold_{f}/{checkpoint}" for f in folds)]
    digests = {name: sha256_file(folder / name) for name in files}
    return entry_key("nnunet-engine", digests, folds, checkpoint, precision, machine())


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def first_case_file(inputs: Path) -> Path | None:
    """The parity volume: the first case's first channel file in a folder of nnU-Net cases (real
    tiles select engines better than synthetic ones); None when the folder has none."""
    files = sorted(p for p in inputs.iterdir() if p.is_file() and "_0000." in p.name)
    return files[0] if files else None


def _backend(precision: str) -> str:
    """The build's backend: auto, except fp32 on a machine without a GPU, where `build-engine` alone
    would keep ONNX Runtime fp32 untimed: OpenVINO's fp32 is the faster CPU engine (measured:
    docs/benchmarks.md)."""
    from nnslim.extras import installed

    if precision == "fp32" and _gpu_name() is None and installed("openvino"):
        return "openvino"
    return "auto"


def discard(engine_dir: Path) -> None:
    """Remove a cached engine that failed its check, so that the next `cached_engine` builds it again;
    only a folder directly under this user's engine cache (nothing nnslim did not write)."""
    import shutil

    root = private_folder("engines")
    engine_dir = Path(engine_dir)
    if root is None or engine_dir.parent.resolve() != root.resolve() or engine_dir.is_symlink():
        return
    with _locked(root / f"{engine_dir.name}.lock"):
        shutil.rmtree(engine_dir, ignore_errors=True)


def cached_engine(folder: Path, folds: list[str] | tuple[str, ...] | None, checkpoint: str,
                  inputs: Path | None = None, precision: str = "auto") -> Path:
    """The engine directory for `folder` with `folds` (None: every fold it has), `checkpoint` and
    `precision` on this machine: the cached one, or one built now with the first case of `inputs`
    as parity volume (auto: the fastest candidate inside its gate)."""
    from nnslim.compiler.stages.pipeline import build_engine
    from nnslim.compiler.stages.plan import BuildConfig

    folds = tuple(str(f) for f in folds) if folds else available_folds(folder, checkpoint)
    backend = _backend(precision)
    key = engine_key(folder, folds, checkpoint, f"{backend} {precision}")
    root = private_folder("engines")
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="nnslim-engine-"))
        logger.warning("building the engine into %s for this run only (no private cache under %s)", root, cache_root())
    target = root / key
    with _locked(root / f"{key}.lock"):
        if (target / "manifest.json").is_file():
            logger.info("reusing the engine %s", target)
            return target
        logger.warning("building an engine for %s (folds %s, %s) on this machine; later runs reuse it", folder.name,
                       " ".join(folds), checkpoint)
        parity = first_case_file(inputs) if inputs is not None else None
        build_engine(BuildConfig(checkpoint=folder, out_dir=target, folds=folds, nnunet_checkpoint=checkpoint,
                                 backend=backend, precision=precision, parity_volume=parity))
    return target
