"""nnslim's cache: compiled models kept between runs (OpenVINO blobs, TensorRT plans).

A cache is an optimisation that must never change an answer, so nothing in it is trusted:

- **Private folders.** Each tool caches in `cache_root()/TOOL`, created 0700 (whatever the umask).
  A folder (or the cache root) owned by another user, or writable by group or others, is not used:
  anyone who can write there could plant a compiled model.
- **Checked entries.** An entry is one file, `KEY.entry`: a header line with its key and the
  sha256 of the payload, then the payload, written atomically (0600). The key in the header must be
  the key asked for, so an entry renamed or linked under another key (another engine's compiled
  model) is refused. Reading one opens it without following
  links and without blocking (a FIFO cannot hang the run), refuses anything that is not a regular
  file owned by this user, hashes the payload and hands those very bytes to the caller. A damaged
  entry is ignored (and replaced by the next write); it is never handed on.
- **Failures are warnings.** A cache that cannot be created (read-only HOME, full disk) or is not
  private is skipped with one warning naming the folder, the reason and the fix (`NNSLIM_CACHE`);
  the run goes on without it (a slower start, the same labels).

The key of an entry is the caller's: a hash of everything that decides the payload (model bytes,
library version, settings, hardware), so a different input can never find an entry.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from pathlib import Path

from nnslim.files import sweep_leftovers, write_bytes_atomic

logger = logging.getLogger(__name__)

ENTRY_SUFFIX = ".entry"
_MAGIC = b"nnslim-cache-entry 2 "
MAX_ENTRY_BYTES = 16 << 30  # larger than any engine; a bound on what a read may allocate
_warned: set[str] = set()


def cache_root() -> Path:
    """$NNSLIM_CACHE, else ~/.cache/nnslim."""
    return Path(os.environ.get("NNSLIM_CACHE") or Path.home() / ".cache" / "nnslim")


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def _not_private(path: Path, info: os.stat_result) -> str | None:
    """Why a folder must not hold a cache, or None when only this user can write it."""
    if info.st_uid != os.geteuid():
        return f"it belongs to another user (uid {info.st_uid})"
    if info.st_mode & 0o022:
        return f"it is writable by other users (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def private_folder(tool: str, folder: Path | None = None) -> Path | None:
    """`folder` (default `cache_root()/tool`), created 0700 if absent; None (after one warning) when
    it cannot be created or someone else could write it."""
    root = cache_root() if folder is None else Path(folder)
    folder = root / tool if folder is None else root
    try:
        for path in dict.fromkeys((root, folder)):
            if not path.exists():
                old = os.umask(0o077)
                try:
                    path.mkdir(parents=True, exist_ok=True)
                finally:
                    os.umask(old)
            info = os.stat(path) if path == root else os.lstat(path)  # the root may be a link (~/.cache)
            if not stat.S_ISDIR(info.st_mode):
                _warn_once(f"not using the {tool} cache: {path} is not a folder ({'a symbolic link' if path.is_symlink() else 'a file'}); "
                           f"set NNSLIM_CACHE to a folder of yours. Going on without a cache (a slower start, the "
                           f"same results)")
                return None
            why = _not_private(path, info)
            if why:
                _warn_once(f"not using the {tool} cache: {path} is not private: {why}; caching there would let "
                           f"another user plant a compiled model. Make it yours and `chmod 700 {path}` after "
                           f"emptying it, or set NNSLIM_CACHE to a private folder. Going on without a cache "
                           f"(a slower start, the same results)")
                return None
    except OSError as exc:
        _warn_once(f"not using the {tool} cache: cannot create {exc.filename or folder} ({exc.strerror}); set "
                   f"NNSLIM_CACHE to a writable folder. Going on without a cache (a slower start, the same results)")
        return None
    sweep_leftovers(folder)  # entries half-written by a killed run (by their marker, as everywhere)
    return folder


def entry_key(*parts: object) -> str:
    """A cache key: the sha256 of the parts' text (pass everything that decides the payload)."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def read_entry(folder: Path, key: str) -> bytes | None:
    """The payload of `folder/KEY.entry` when it is a regular file of this user whose payload matches
    the sha256 it was written with; None when absent, and None after a warning when not to be trusted."""
    path = folder / f"{key}{ENTRY_SUFFIX}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        why = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
        _warn_once(f"ignoring cache entry {path}: {why}")
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_size > MAX_ENTRY_BYTES:
        os.close(fd)
        _warn_once(f"ignoring cache entry {path}: not a regular file of this user, or too large")
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    header, _, payload = data.partition(b"\n")
    if header != _header(key, payload):
        _warn_once(f"ignoring cache entry {path}: it is not the entry written for this key, or its content does "
                   f"not match the sha256 it was written with (damaged, edited or moved); it will be rebuilt")
        return None
    return payload


def _header(key: str, payload: bytes) -> bytes:
    return _MAGIC + f"key={key} sha256={hashlib.sha256(payload).hexdigest()}".encode()


def write_entry(folder: Path, key: str, payload: bytes) -> None:
    """Store `payload` as `folder/KEY.entry` (atomically, 0600); a failure to write is a warning."""
    try:
        write_bytes_atomic(folder / f"{key}{ENTRY_SUFFIX}", _header(key, payload) + b"\n" + payload, mode=0o600)
    except OSError as exc:
        _warn_once(f"could not write to the cache {folder} ({exc.strerror}); the next run compiles again")
