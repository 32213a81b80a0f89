"""The backlog folders as a state machine: claim, move, leases, recovery, order.

The folder a ticket file sits in is the truth about its state. Moves are atomic renames
that never overwrite, so at every instant a ticket is in exactly one folder.

Claiming takes an exclusive ``flock`` on ``.leases/<name>.lock`` and then renames the
ticket from ``todo/`` into ``in-progress/``; two daemons on one backlog cannot both hold
the lock, and only one rename of a file can succeed. The kernel drops the lock when its
process dies (kill -9 included), so an ``in-progress/`` ticket whose lock can be taken
belongs to nobody: ``orphans()`` finds those for recovery.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon import tickets
from daemon.errors import InvalidTicket
from daemon.files import atomic_write, free_name, is_temp, remove_stale_temp, rename_noreplace

FOLDERS = ("todo", "in-progress", "review", "done", "failed")
PRIORITY_RANK = {"high": 0, "medium": 1, None: 1, "low": 2}
LEASE_ENV = "TICKETD_LEASE"


def words(ticket: tickets.Ticket) -> set[str]:
    """The distinct words of a ticket's title and description, for duplicate detection."""
    return set(re.findall(r"\w+", f"{ticket.title} {ticket.description}".lower()))


def is_ticket_name(name: str) -> bool:
    """A visible markdown file: editors' temp, swap and backup files are not tickets."""
    return (
        name.endswith(".md")
        and not name.startswith((".", "~", "#"))
        and not name.endswith(("~", ".tmp.md"))
    )


@dataclass
class Lease:
    """A held claim on one ticket: the open, locked lease file and what it records."""

    name: str
    path: Path  # the ticket, in in-progress/
    lock_path: Path
    fd: int
    info: dict[str, Any] = field(default_factory=dict)
    released: bool = False

    @property
    def marker(self) -> str:
        """The value of ``TICKETD_LEASE`` in the environment of this lease's agents."""
        return f"{self.lock_path}:{self.info.get('claimId', '')}"

    def record(self, **values: Any) -> None:
        """Store values (the agent's process group, the stage) in the lease file."""
        self.info.update(values)
        data = json.dumps(self.info, sort_keys=True).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)


@dataclass(frozen=True)
class Waiting:
    ticket: tickets.Ticket
    reason: str


class Backlog:
    def __init__(self, root: Path, statuses: Mapping[str, str]) -> None:
        self.root = root
        self.statuses = dict(statuses)  # folder name -> status text
        self.leases = root / ".leases"
        # path -> (what lstat said of it, the ticket or why it is none); shared by the main
        # loop and the workers, so every use of it holds the lock.
        self._cache: dict[Path, tuple[tuple[int, ...], tickets.Ticket | str]] = {}
        self._cache_lock = threading.Lock()

    def ensure(self) -> None:
        for name in (*FOLDERS, ".leases"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        for name in FOLDERS:
            remove_stale_temp(self.root / name)

    def folder(self, name: str) -> Path:
        return self.root / name

    def files(self, folder: str) -> list[Path]:
        try:
            names = os.listdir(self.root / folder)
        except FileNotFoundError:
            return []
        return sorted(self.root / folder / n for n in names if is_ticket_name(n) and not is_temp(n))

    def read(self, path: Path) -> tickets.Ticket:
        """Parse a ticket, cached on what ``lstat`` says of the file (a link is never followed).

        Raises ``InvalidTicket`` with the reason for anything that is not a readable ticket: a
        link, a directory, a FIFO or another non-regular file, a file that cannot be read, bad
        content. Raises ``FileNotFoundError`` when the file has moved away. Nothing else.
        """
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise InvalidTicket(tickets.os_reason(e)) from e
        key = (st.st_dev, st.st_ino, st.st_mode, st.st_mtime_ns, st.st_size)
        with self._cache_lock:
            cached = self._cache.get(path)
        if cached is None or cached[0] != key:
            try:
                ticket = tickets.parse_file(path)
            except InvalidTicket as e:
                with self._cache_lock:
                    self._cache[path] = (key, e.message)
                raise
            with self._cache_lock:
                self._cache[path] = (key, ticket)
            return ticket
        if isinstance(cached[1], str):
            raise InvalidTicket(cached[1])
        return cached[1]

    def forget(self, path: Path) -> None:
        with self._cache_lock:
            self._cache.pop(path, None)

    def trim_cache(self) -> None:
        """Drop parsed tickets whose files have moved or gone."""
        with self._cache_lock:
            paths = list(self._cache)
        gone = [p for p in paths if not os.path.lexists(p)]
        with self._cache_lock:
            for path in gone:
                self._cache.pop(path, None)

    def done_ids(self) -> list[str]:
        ids = []
        for path in self.files("done"):
            with contextlib.suppress(InvalidTicket, OSError):
                ids.append(self.read(path).id)
        return ids

    def plan(
        self, candidates: Sequence[tickets.Ticket], behind: Set[str] = frozenset()
    ) -> tuple[list[tickets.Ticket], list[Waiting]]:
        """Split todo tickets into ready ones (by priority, then fresh before those named in
        ``behind`` (retries), then id) and waiting ones."""
        ready = [t for t in candidates if not t.dependencies]
        waiting: list[Waiting] = []
        if len(ready) < len(candidates):  # only then read the other folders
            done = {i.lower() for i in self.done_ids()}
            elsewhere = self._ids_by_folder(("failed", "review", "in-progress"))
            elsewhere.update({t.id.lower(): "todo" for t in candidates})
            for t in candidates:
                missing = [d for d in t.dependencies if d.lower() not in done]
                if t.dependencies and not missing:
                    ready.append(t)
                elif missing:
                    why = [f"{d} ({elsewhere.get(d.lower(), 'not found')})" for d in missing]
                    waiting.append(Waiting(t, "waits for " + ", ".join(why)))
        ready.sort(
            key=lambda t: (
                PRIORITY_RANK.get(t.priority, 1),
                t.path.name in behind,
                tickets.id_key(t.id),
            )
        )
        return ready, waiting

    def _ids_by_folder(self, folders: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for folder in folders:
            for path in self.files(folder):
                with contextlib.suppress(InvalidTicket, OSError):
                    found.setdefault(self.read(path).id.lower(), folder)
        return found

    def duplicate_of(
        self, ticket: tickets.Ticket, threshold: float, window_days: float, now: float
    ) -> tickets.Ticket | None:
        """An older ticket in todo/, a ticket in in-progress/, or one done within
        ``window_days``, sharing at least ``threshold`` of its words with ``ticket``."""
        mine = words(ticket)
        if not mine:
            return None
        others = [("todo", p) for p in self.files("todo") if p != ticket.path]
        others += [("in-progress", p) for p in self.files("in-progress")]
        others += [("done", p) for p in self.files("done")]
        for folder, path in others:
            try:
                if folder == "done" and now - os.lstat(path).st_mtime > window_days * 86400:
                    continue
                other = self.read(path)
            except (InvalidTicket, OSError):
                continue
            if folder == "todo" and tickets.id_key(other.id) >= tickets.id_key(ticket.id):
                continue  # of two in todo/, the later one is the duplicate
            theirs = words(other)
            if theirs and len(mine & theirs) / len(mine | theirs) >= threshold:
                return other
        return None

    # -- claims ---------------------------------------------------------------------------

    def claim(
        self, name: str, now: datetime, claim_id: str, *, source: str = "todo", **info: Any
    ) -> Lease | None:
        """Take ``<source>/<name>`` (todo/, or review/ for a revision) for this process, or
        None if someone else has it. ``info`` is recorded in the lease (a revision's pull
        request: recovery returns the ticket to review/)."""
        lease = self._lock(name)
        if lease is None:
            return None
        src, dst = self.folder(source) / name, self.folder("in-progress") / name
        try:
            rename_noreplace(src, dst)
        except (FileNotFoundError, FileExistsError):
            self.release(lease)
            return None
        lease.path = dst
        try:
            lease.record(
                ticket=name,
                host=socket.gethostname(),
                pid=os.getpid(),
                claimId=claim_id,
                claimedAt=now.isoformat(),
                agentPgid=None,
                stage="claimed",
                **info,
            )
            self.rewrite(dst, "in-progress", now)
        except OSError:  # a full disk: undo the claim, the ticket stays in todo/
            with contextlib.suppress(OSError):
                rename_noreplace(dst, src)
            self.release(lease)
            raise
        return lease

    def take(self, name: str, folder: str) -> Lease | None:
        """Lock the lease of ``<folder>/<name>`` without moving it (to move it elsewhere), or
        None when someone holds it or the file is not there."""
        lease = self._lock(name)
        if lease is None:
            return None
        lease.path = self.folder(folder) / name
        if not os.path.lexists(lease.path):
            self.release(lease)
            return None
        return lease

    def release(self, lease: Lease) -> None:
        """Give up the lease (the ticket has left in-progress/, or never entered). Once."""
        if lease.released:
            return
        lease.released = True
        with contextlib.suppress(FileNotFoundError):
            lease.lock_path.unlink()
        os.close(lease.fd)

    def lock_path(self, name: str) -> Path:
        """``.leases/<name>.lock``; a name too long for that gets a hash of it instead."""
        return self.leases / _side_name(name, ".lock")

    def cancel_path(self, name: str) -> Path:
        """``.leases/<name>.cancel``: ``ticketd cancel`` asks the owning daemon to end a run."""
        return self.leases / _side_name(name, ".cancel")

    def _lock(self, name: str) -> Lease | None:
        lease = self._lock_file(self.lock_path(name))
        if lease is not None:
            lease.name, lease.path = name, self.folder("todo") / name
        return lease

    def _lock_file(self, path: Path) -> Lease | None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:  # the file we locked must still be the one at that path
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return None
        return Lease(name=path.name, path=path, lock_path=path, fd=fd)

    def orphans(self) -> Iterator[Lease]:
        """Locked leases for ``in-progress/`` tickets whose owner is gone. Lease files left
        by finished or never-started claims are removed on the way."""
        names = {p.name for p in self.files("in-progress")}
        known = {self.lock_path(n).name for n in names}
        for stale in self.leases.glob("*.lock"):  # a lease whose ticket left: remove it
            if stale.name not in known and (lease := self._lock_file(stale)) is not None:
                self.release(lease)
        for name in sorted(names):
            lease = self._lock(name)
            if lease is None:
                continue  # a live daemon holds it
            lease.path = self.folder("in-progress") / name
            if not os.path.lexists(lease.path):  # a link to nowhere is still there to recover
                self.release(lease)
                continue
            with contextlib.suppress(ValueError, OSError, InvalidTicket):
                info = json.loads(tickets.read_bytes(lease.lock_path) or b"{}")
                lease.info = info if isinstance(info, dict) else {}
            yield lease

    # -- moves ------------------------------------------------------------------------------

    def rewrite(
        self, path: Path, folder: str, now: datetime, references: Sequence[str] = ()
    ) -> None:
        """Set the ticket's ``status`` (and ``updated_date``, ``references``) for ``folder``,
        in place and atomically; a file that cannot be parsed is left as it is."""
        try:
            text = tickets.read_text(path)
            current = tickets.parse_text(text, path)
        except InvalidTicket:
            return
        updates: dict[str, str | list[str]] = {
            "status": self.statuses[folder],
            "updated_date": now.strftime("%Y-%m-%d %H:%M"),
        }
        if references:
            old = current.frontmatter.get("references") or []
            old_list = [str(r) for r in old] if isinstance(old, list) else [str(old)]
            updates["references"] = old_list + [r for r in references if r not in old_list]
        new = tickets.update_frontmatter(text, updates)
        if new != text:  # already as it should read (rewritten just before a move): no I/O
            atomic_write(path, new)
        self.forget(path)

    def target(self, folder: str, name: str) -> Path:
        """Where a ticket called ``name`` would land in ``folder`` (never over another)."""
        return free_name(self.folder(folder), name)

    def move(
        self,
        path: Path,
        folder: str,
        now: datetime,
        references: Sequence[str] = (),
        dst: Path | None = None,
    ) -> Path:
        """Rewrite the status for ``folder`` then rename the ticket there. Returns the new path."""
        self.rewrite(path, folder, now, references)
        dst = dst or self.target(folder, path.name)
        rename_noreplace(path, dst)
        self.forget(path)
        return dst


def _side_name(name: str, suffix: str) -> str:
    """``name + suffix``, or a hash of ``name`` when that would pass 255 bytes."""
    full = name + suffix
    if len(full.encode()) <= 255:
        return full
    return hashlib.sha256(name.encode()).hexdigest() + suffix
