"""Crash-safe file operations: atomic writes and renames that never overwrite, and reads
that a hostile file cannot hurt.

A kill -9 at any instant leaves either the old or the new content, never a mix, and a
ticket in exactly one folder. Temporary files are hidden (``.name.tmp-...``) so the
watcher ignores them, and ``remove_stale_temp`` clears what a dead process left.
``open_regular``/``read_regular`` read a file someone else controls (a ticket, the agent's
checkout): never through a symbolic link, never blocking on a FIFO, never past a limit.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import tempfile
from pathlib import Path

TEMP_MARK = ".tmp-"
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)
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


class NotAFile(Exception):
    """Not a regular file; ``kind`` says what it is ("a symbolic link", "a FIFO", ...)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class TooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def kind_of(mode: int) -> str | None:
    """What a file of this ``st_mode`` is when it is not a regular file; None when it is."""
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def open_regular(path: Path) -> int:
    """A read-only descriptor on ``path`` when it is a regular file (the caller closes it);
    ``NotAFile`` otherwise, without opening it. ``OSError`` (``FileNotFoundError`` when gone)
    passes through."""
    kind = kind_of(os.lstat(path).st_mode)
    if kind is not None:
        raise NotAFile(kind)
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as e:
        if e.errno == errno.ELOOP:  # a link put there since the lstat
            raise NotAFile("a symbolic link") from e
        raise
    kind = kind_of(os.fstat(fd).st_mode)  # something else put there since the lstat
    if kind is not None:
        os.close(fd)
        raise NotAFile(kind)
    return fd


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of ``path`` when it is a regular file of at most ``limit`` bytes, never read
    past the limit. Raises ``NotAFile``, ``TooLarge`` or ``OSError``."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise TooLarge(size)
        chunks: list[bytes] = []
        left = limit + 1
        while left > 0 and (chunk := os.read(fd, left)):
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:  # it grew while it was read
            raise TooLarge(os.fstat(fd).st_size)
        return b"".join(chunks)
    finally:
        os.close(fd)
