"""Crash-safe file operations: atomic writes and renames that never overwrite.

A kill -9 at any instant leaves either the old or the new content, never a mix, and a
ticket in exactly one folder. Temporary files are hidden (``.name.tmp-...``) so the
watcher ignores them, and ``remove_stale_temp`` clears what a dead process left.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import tempfile
from pathlib import Path

TEMP_MARK = ".tmp-"
_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
_AT_FDCWD = -100


def atomic_write(path: Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data``: temp file in the same folder, fsync, rename."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TEMP_MARK}")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(OSError):
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Atomically move ``src`` to ``dst``; ``FileExistsError`` if ``dst`` exists,
    ``FileNotFoundError`` if ``src`` is gone (another process moved it first)."""
    if _renameat2 is not None:
        rc = _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            fsync_dir(dst.parent)
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):  # EINVAL: this filesystem lacks the flag
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    # Fallback for filesystems without the flag: check, then rename. Only a person creating
    # ``dst`` in the instant between the two could be overwritten.
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "file exists", str(dst))
    os.rename(src, dst)
    fsync_dir(dst.parent)


def free_name(folder: Path, name: str) -> Path:
    """``folder/name``, or ``folder/stem (2).md`` and so on when that is taken."""
    candidate = folder / name
    n = 2
    while os.path.lexists(candidate):
        stem, dot, ext = name.rpartition(".")
        candidate = folder / (f"{stem} ({n}).{ext}" if dot else f"{name} ({n})")
        n += 1
    return candidate


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_temp(name: str) -> bool:
    return TEMP_MARK in name and name.startswith(".")


def remove_stale_temp(folder: Path) -> list[Path]:
    removed = []
    for path in folder.iterdir() if folder.is_dir() else ():
        if is_temp(path.name):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed
