"""Intake: know when ``todo/`` changed and when a file there is whole.

The watchdog observer only wakes the supervisor; the folder listing is the truth (watchdog
drops inotify overflows silently, gorakhargosh/watchdog#654, so the supervisor also lists
``todo/`` periodically). A file is whole when no process has it open for writing: the
kernel refuses a read lease on such a file, so ``settle_delay`` asks for one. Where leases
are not allowed (another user's file, some network filesystems) it falls back to waiting
until the file has been still for ``settle_s``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from daemon.backlog import is_ticket_name
from daemon.files import NotAFile, open_regular

# Every kind of event but a file opened or closed unwritten: the daemon's own reads (intake's
# probes, the index) would otherwise wake watchdog's thread twice for each file read, and
# with 10,000 tickets waiting a pass of intake spent most of its time on that thread.
EVENTS = [
    FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileMovedEvent, FileDeletedEvent,
    DirCreatedEvent, DirModifiedEvent, DirMovedEvent, DirDeletedEvent,
]  # fmt: skip


def ignore_lease_breaks() -> None:
    """A writer opening a file we hold a lease on sends us SIGIO, which would kill us.
    Leases are held for microseconds, so ignoring the signal is enough. Main thread only."""
    signal.signal(signal.SIGIO, signal.SIG_IGN)


def settle_delay(path: Path, now: float, settle_s: float) -> float:
    """0 when ``path`` is whole and can be claimed; else seconds to wait before asking again.
    ``now`` is ``time.time()``. Raises ``FileNotFoundError`` when it has gone.

    Anything but a regular file (a link, a directory, a FIFO), or a file it cannot open, is
    0 at once and never opened: reading it then says why it is no ticket."""
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        raise
    except (NotAFile, OSError):
        return 0.0
    try:
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError as e:
            if e.errno == errno.EAGAIN:  # open for writing somewhere: its close will wake us
                return settle_s or 0.5
            age = now - os.fstat(fd).st_mtime  # leases not allowed here: wait for stillness
            return max(0.0, settle_s - age)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return 0.0
    finally:
        os.close(fd)


class _Handler(FileSystemEventHandler):
    def __init__(
        self,
        folder: Path,
        on_event: Callable[[str, str], None],
        on_change: Callable[[Path], None],
    ) -> None:
        self.folder = str(folder)
        self.root = str(folder.parent)
        self.running = str(folder.parent / "in-progress")
        self.leases = str(folder.parent / ".leases")
        self.on_event, self.on_change = on_event, on_change

    def on_any_event(self, event: FileSystemEvent) -> None:
        source = os.fsdecode(event.src_path)
        target = os.fsdecode(getattr(event, "dest_path", "") or source)
        for path in {source, target}:  # a ticket in one of the backlog's folders
            parent, name = os.path.split(path)
            if os.path.dirname(parent) == self.root and is_ticket_name(name):
                self.on_change(Path(path))
        folder, name = os.path.split(target)
        source_folder = os.path.dirname(source)
        if folder == self.folder and is_ticket_name(name):
            self.on_event(event.event_type, name)
        elif source_folder == self.running and event.event_type in ("moved", "deleted"):
            self.on_event(event.event_type, name)  # a running ticket's file left by hand
        elif folder == self.leases and name.endswith(".cancel"):
            self.on_event(event.event_type, name)  # ``ticketd cancel``


class Watcher:
    """Calls ``on_event(kind, name)`` for tickets created, written or moved into ``folder``
    (``todo/``), for files leaving ``in-progress/``, and for cancel requests in ``.leases/``;
    and ``on_change(path)`` for every ticket file that changes, comes or goes in any folder
    beside ``folder`` (the ticket index's updates).

    It watches ``folder``'s parent recursively: a ticket claimed out of ``todo/`` then moves
    within one watch, and watchdog matches the move at once. With ``todo/`` alone, watchdog
    holds each unmatched move-out for half a second, and every later event waits behind it.
    """

    def __init__(
        self,
        folder: Path,
        on_event: Callable[[str, str], None],
        on_change: Callable[[Path], None] = lambda path: None,
    ) -> None:
        self.folder = folder
        self._observer = Observer()
        handler = _Handler(folder, on_event, on_change)
        self._observer.schedule(handler, str(folder.parent), recursive=True, event_filter=EVENTS)
        self._started = threading.Event()

    def start(self) -> None:
        self._observer.start()
        self._started.set()

    def alive(self) -> bool:
        return bool(self._observer.is_alive())

    def stop(self) -> None:
        if self._started.is_set():
            self._observer.stop()
            with contextlib.suppress(RuntimeError):
                self._observer.join(timeout=5)
