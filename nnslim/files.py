"""Files: atomic writes, staging folders, and the sha256 of a file.

Atomic writes: a temporary file in the destination folder, then a rename, so an
interrupted run never leaves a half-written file that looks complete.

`atomic_path` is the one mechanism; the bytes / text / JSON writers use it, and so does any
writer that wants a file name (`torch.save`, `nibabel.save`). The temporary file is
`.NAME.PID.XXXXXXXX<NAME's suffixes>`, hidden, beside the target (a rename within one folder is
atomic), and keeps the target's suffixes so writers that pick the format from the name
(`.nii.gz`) write the right one. It is flushed to disk before the rename, and removed on any
failure (an exception or Ctrl-C), leaving an existing target as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def chmod_default(path: str | os.PathLike) -> None:
    """mkstemp creates files 0600; give the final file the permissions a plain open() would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; on success it becomes `path`.

    On leaving the block normally the temporary file is fsynced, given a plain open()'s
    permissions and renamed over `path` (then the folder is fsynced); if the block raises, the
    temporary file is removed and `path` is untouched. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix="".join(path.suffixes),
                                dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_path(tmp)  # on disk before the rename makes it visible
        chmod_default(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)  # the rename itself survives a power cut


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


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
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
    """A fresh hidden folder `.NAME.TAG-PID` beside `target` to assemble a directory in; the caller
    moves it into place (after `fsync_tree`). Whatever is left of it on leaving the block, after an
    error or after the move, is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{tag}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # our own pid: a previous process that had it is gone
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
