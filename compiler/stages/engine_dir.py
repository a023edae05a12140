"""Writing an engine directory without losing anything that was there before.

A build assembles its engine in a hidden sibling, `.NAME.building-PID-TOKEN`, and only when every
stage has passed renames it to `NAME`. What may be replaced:

- nothing (NAME absent) or an empty directory;
- a directory that is provably an nnslim engine: its manifest parses, carries nnslim's format
  tag, and the files it lists (plus the manifest) are all that is there. Such an engine is
  renamed aside to `.NAME.old-PID-TOKEN` and then only its listed files are removed, never a blind
  recursive delete;
- anything else only with `overwrite=True` (the CLI's `--overwrite`), and never a directory
  that holds the build's input or the working directory.

A run killed half-way leaves `.NAME.building-PID-TOKEN` / `.NAME.old-PID-TOKEN` behind; the next
build to the same place removes those whose process is gone, by the marker nnslim wrote into each
(`nnslim.files.sweep_leftovers`), never by name: a user's `.NAME.old-2024/` backup is kept. Two builds racing to the same NAME end with one
complete engine: the rename that loses finds NAME taken and reports it cleanly.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from nnslim.errors import NnslimError
from nnslim.compiler.runtime.manifest import FORMAT, MANIFEST
from nnslim.files import fsync_path, fsync_tree, mark, remove_listed, staging_folder, sweep_leftovers, unmark

logger = logging.getLogger(__name__)


class EngineDirError(NnslimError):
    """An output directory that cannot be (re)placed safely."""


def clean_stale(out_dir: Path) -> list[Path]:
    """Remove the staging and moved-aside folders beside `out_dir` that interrupted nnslim runs left
    (marked by nnslim, their process gone); nothing else."""
    return sweep_leftovers(Path(out_dir).parent)


def engine_files(directory: Path) -> list[str] | None:
    """The files of `directory` if it is provably an nnslim engine (manifest + exactly its listed files)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: a hostile, deeply nested file
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        return None
    listed = {MANIFEST, *manifest["files"]}
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if not p.is_dir() or p.is_symlink()}
    return sorted(listed) if present == listed and all(".." not in Path(n).parts for n in listed) else None


def check_replaceable(out_dir: Path, overwrite: bool = False, protect: Iterable[Path] = ()) -> None:
    """Refuse (before any work) to write an engine where it would destroy something else."""
    out_dir = Path(out_dir)
    real = out_dir.resolve()
    for kept in (Path.cwd(), *protect):
        if Path(kept).resolve() == real or real in Path(kept).resolve().parents:
            raise EngineDirError(f"--out {out_dir} contains {kept}, which the build needs or runs in; "
                                 "choose a new folder for the engine")
    if out_dir.is_symlink():
        raise EngineDirError(f"--out {out_dir} is a symbolic link (to {real}); give the real directory instead")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise EngineDirError(f"--out {out_dir} is a file, not a directory; choose another path or remove it")
    if overwrite or not any(out_dir.iterdir()) or engine_files(out_dir) is not None:
        return
    raise EngineDirError(f"--out {out_dir} exists but is not an nnslim engine ({_why_not_engine(out_dir)}); refusing "
                         "to replace it. Choose another folder, or pass --overwrite to replace it with everything in it")


def _why_not_engine(directory: Path) -> str:
    """What disqualifies a non-empty directory from being replaced as an engine, for the message."""
    if not (directory / MANIFEST).is_file():
        return f"it has no {MANIFEST}"
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: a hostile, deeply nested file
        return f"its {MANIFEST} does not parse"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        return f"its {MANIFEST} is not an nnslim engine manifest"
    listed = {MANIFEST, *manifest["files"]}
    extra = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                   if (not p.is_dir() or p.is_symlink()) and p.relative_to(directory).as_posix() not in listed)
    missing = sorted(n for n in listed if not (directory / n).exists())
    if extra:
        return f"it holds {len(extra)} file(s) its manifest does not list, e.g. {extra[0]}"
    return f"{len(missing)} file(s) its manifest lists are missing, e.g. {missing[0]}" if missing else "unsafe file names"


@contextmanager
def staging_dir(out_dir: Path, overwrite: bool = False, protect: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a fresh hidden sibling of `out_dir`; on success put it in place (`replace_dir`), else delete it.

    Args:
        overwrite: replace `out_dir` even when it is not an nnslim engine (the CLI's `--overwrite`).
        protect: paths (the build's inputs) that `out_dir` must not contain.
    """
    out_dir = Path(out_dir)
    protect = tuple(protect)
    check_replaceable(out_dir, overwrite, protect)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out_dir)
    with staging_folder(out_dir, "building") as staging:
        yield staging
        replace_dir(staging, out_dir, overwrite, protect)


def replace_dir(staging: Path, out_dir: Path, overwrite: bool = False, protect: Iterable[Path] = ()) -> None:
    """Move a complete `staging` directory to `out_dir`, replacing what `check_replaceable` allows.

    The old directory is renamed aside first, so `out_dir` is at every moment either the old
    engine, absent, or the new engine; then only the old engine's own files are removed.
    """
    check_replaceable(out_dir, overwrite, protect)  # again: time has passed since the build began
    fsync_tree(staging)
    aside = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{secrets.token_hex(6)}"
    try:
        out_dir.rename(aside)
    except FileNotFoundError:
        aside = None  # nothing there (or another build just moved it aside)
    if aside is not None:  # what a sweep may remove if this process dies before it does
        listed = engine_files(aside)
        mark(aside, listed if listed is not None else ("all" if overwrite else []))
    try:
        staging.rename(out_dir)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        shutil.rmtree(staging, ignore_errors=True)
        if aside is not None:
            _remove_old(aside, overwrite)
        raise EngineDirError(f"another process wrote {out_dir} while this build was finishing; its engine was kept "
                             "and this build's result discarded; run the build again to replace it") from exc
    fsync_path(out_dir.parent)
    if aside is not None:
        _remove_old(aside, overwrite)


def _remove_old(aside: Path, overwrite: bool) -> None:
    """Delete a replaced directory: an engine file by file; anything else only under `overwrite`."""
    unmark(aside)
    listed = engine_files(aside)
    if listed is None:
        if overwrite:
            logger.warning("--overwrite: removing the previous contents of %s", aside)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            logger.warning("kept %s: it changed while the build ran and is no longer just an engine", aside)
        return
    if not remove_listed(aside, listed):
        logger.warning("kept %s: files appeared in it while the build ran", aside)
