"""Files: atomic writes, staging folders, the leftovers of killed runs, and the sha256 of a file.

Atomic writes: a temporary file in the destination folder, then a rename, so an
interrupted run never leaves a half-written file that looks complete.

`atomic_path` is the one mechanism; the bytes / text / JSON writers use it, and so does any
writer that wants a file name (`torch.save`, `nibabel.save`). The temporary file has the target's
own name, inside a hidden folder beside the target, `.NAME.nnslim-TOKEN/` (a rename on one file
system is atomic), so writers that pick the format from the name (`.nii.gz`) write the right one.
It is flushed to disk before the rename, and removed on any failure (an exception, Ctrl-C, or
SIGTERM, which the CLI turns into an exception), leaving an existing target as it was.

Leftovers. A run killed with SIGKILL (or a power cut) cannot clean up. Every temporary folder
nnslim makes (`atomic_path`'s, a build's `.NAME.building-PID-TOKEN`, an export's staging folder,
an engine moved aside while being replaced) holds a marker file, `.nnslim-temporary`: JSON with
the process id, a random token that is also the end of the folder's name, and what may be
removed. `sweep_leftovers` removes only folders whose marker is intact, owned by this user, and
whose process is gone, and only what the marker lists; a file or folder of the user's, whatever
its name, is never touched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

logger = logging.getLogger(__name__)

MARKER = ".nnslim-temporary"

def chmod_default(path: str | os.PathLike, mode: int | None = None) -> None:
    """mkstemp creates files 0600; give the final file `mode`, or the permissions a plain open() would."""
    if mode is None:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    os.chmod(path, mode)


@contextmanager
def atomic_path(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; on success it becomes `path`.

    The temporary is `.NAME.nnslim-TOKEN/NAME` (a marked folder, see the module docstring). On
    leaving the block normally it is fsynced, given a plain open()'s permissions (or `mode`) and
    renamed over `path` (then the folder is fsynced); if the block raises, the temporary is removed
    and `path` is untouched. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with marked_folder(path.parent, f".{path.name}.nnslim") as folder:
        tmp = folder / path.name
        yield tmp
        fsync_path(tmp)  # on disk before the rename makes it visible
        chmod_default(tmp, mode)
        os.replace(tmp, path)
    fsync_path(path.parent)  # the rename itself survives a power cut


@contextmanager
def marked_folder(parent: Path, stem: str) -> Iterator[Path]:
    """A new folder `parent/STEM-TOKEN` holding a marker (pid, token; all of it removable), removed
    with all it holds on leaving the block."""
    folder = mark(parent / f"{stem}-{secrets.token_hex(6)}", create=True)
    try:
        yield folder
    finally:
        if folder.is_dir() and not folder.is_symlink():  # not moved into place: this process's own, remove it
            shutil.rmtree(folder, ignore_errors=True)


def mark(folder: Path, removable: str | list[str] = "all", create: bool = False) -> Path:
    """Write the marker into `folder` (created first, private, when `create`): the folder's name must
    end in `-TOKEN`; `removable` is "all" or the relative paths a sweep may delete."""
    folder = Path(folder)
    if create:
        folder.mkdir(mode=0o700)
    token = folder.name.rsplit("-", 1)[-1]
    record = {"pid": os.getpid(), "token": token, "removable": removable}
    try:
        fd = os.open(folder / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
    except BaseException:  # a full disk or a file-size limit: leave nothing half-made behind
        (folder / MARKER).unlink(missing_ok=True)
        if create:
            folder.rmdir()
        raise
    return folder


def unmark(folder: Path) -> None:
    """Remove the marker (before a marked folder is emptied on purpose)."""
    (Path(folder) / MARKER).unlink(missing_ok=True)


def _marker(folder: Path) -> dict | None:
    """The marker of `folder` if it is nnslim's: a regular file of this user, whose token ends the folder's name."""
    try:
        fd = os.open(folder / MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_size > 1 << 20:
        os.close(fd)
        return None
    with os.fdopen(fd, "rb") as f:
        try:
            record = json.loads(f.read())
        except ValueError:
            return None
    if (not isinstance(record, dict) or not isinstance(record.get("pid"), int) or not isinstance(record.get("token"), str)
            or not record["token"] or not folder.name.endswith(f"-{record['token']}")):
        return None
    removable = record.get("removable")
    if removable != "all" and not (isinstance(removable, list) and all(isinstance(n, str) for n in removable)):
        return None
    return record


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (a reused id counts as alive: the safe side)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def sweep_leftovers(folder: Path, names: Iterable[str] | None = None) -> list[Path]:
    """Remove the marked temporary folders in `folder` left by processes that are gone (only what
    their markers list); `names`: look only at these entries. Returns what was removed."""
    removed = []
    try:
        entries = [Path(folder) / n for n in names] if names is not None else list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir():
            continue
        record = _marker(entry)
        if record is None or pid_alive(record["pid"]):
            continue
        if record["removable"] == "all":
            shutil.rmtree(entry, ignore_errors=True)
        else:
            remove_listed(entry, [*record["removable"], MARKER])
        if not entry.exists():
            logger.info("removed %s, left by an interrupted nnslim run (process %s is gone)", entry, record["pid"])
            removed.append(entry)
    return removed


def remove_listed(folder: Path, names: Iterable[str]) -> bool:
    """Delete the listed files of `folder` (relative paths, no `..`), then its emptied subfolders and
    itself; anything else in it is kept (and so is the folder). True when the folder is gone."""
    folder = Path(folder)
    names = [n for n in names if ".." not in Path(n).parts and not Path(n).is_absolute()]
    for name in names:
        (folder / name).unlink(missing_ok=True)
    subdirs = sorted({p for n in names for p in (folder / n).parents if folder in p.parents}, reverse=True)
    try:
        for directory in [*subdirs, folder]:  # deepest first
            directory.rmdir()
    except OSError:
        return False
    return True


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk (folders: where the OS allows opening them)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, mode: int | None = None) -> Path:
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | os.PathLike, data: Any, **dumps: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, **dumps) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes, read in chunks (hex digest)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_tree(directory: Path) -> None:
    """Flush every file of `directory` and the directory entries to disk (before a final rename)."""
    for path in sorted(Path(directory).rglob("*"), reverse=True):
        if path.is_symlink():
            continue
        fsync_path(path)
    fsync_path(Path(directory))


@contextmanager
def staging_folder(target: str | os.PathLike, tag: str) -> Iterator[Path]:
    """A fresh folder to assemble a directory in, `.NAME.TAG-PID-TOKEN/NAME` beside `target` (the
    marked folder holds it, so the marker never becomes part of the result); the caller moves it into
    place (after `fsync_tree`). Whatever is left on leaving the block, after an error or after the
    move, is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with marked_folder(target.parent, f".{target.name}.{tag}-{os.getpid()}") as folder:
        staging = folder / target.name
        staging.mkdir()
        yield staging
