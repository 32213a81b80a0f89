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
import json
import os
import re
import socket
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
        self._cache: dict[Path, tuple[tuple[int, int], tickets.Ticket | InvalidTicket]] = {}

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
        """Parse a ticket, cached by size and mtime; raises ``InvalidTicket``."""
        st = path.stat()
        key = (st.st_mtime_ns, st.st_size)
        cached = self._cache.get(path)
        if cached is None or cached[0] != key:
            try:
                value: tickets.Ticket | InvalidTicket = tickets.parse_file(path)
            except InvalidTicket as e:
                value = e
            cached = (key, value)
            self._cache[path] = cached
        if isinstance(cached[1], InvalidTicket):
            raise cached[1]
        return cached[1]

    def forget(self, path: Path) -> None:
        self._cache.pop(path, None)

    def trim_cache(self) -> None:
        """Drop parsed tickets whose files have moved or gone."""
        self._cache = {p: v for p, v in self._cache.items() if p.exists()}

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
                if folder == "done" and now - path.stat().st_mtime > window_days * 86400:
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

    def claim(self, name: str, now: datetime, claim_id: str) -> Lease | None:
        """Take ``todo/<name>`` for this process, or None if someone else has it."""
        lease = self._lock(name)
        if lease is None:
            return None
        src, dst = self.folder("todo") / name, self.folder("in-progress") / name
        try:
            rename_noreplace(src, dst)
        except (FileNotFoundError, FileExistsError):
            self.release(lease)
            return None
        lease.path = dst
        lease.record(
            ticket=name,
            host=socket.gethostname(),
            pid=os.getpid(),
            claimId=claim_id,
            claimedAt=now.isoformat(),
            agentPgid=None,
            stage="claimed",
        )
        self.rewrite(dst, "in-progress", now)
        return lease

    def release(self, lease: Lease) -> None:
        """Give up the lease (the ticket has left in-progress/, or never entered)."""
        with contextlib.suppress(FileNotFoundError):
            lease.lock_path.unlink()
        os.close(lease.fd)

    def _lock(self, name: str) -> Lease | None:
        path = self.leases / f"{name}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
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
        return Lease(name=name, path=self.folder("todo") / name, lock_path=path, fd=fd)

    def orphans(self) -> Iterator[Lease]:
        """Locked leases for ``in-progress/`` tickets whose owner is gone. Lease files left
        by finished or never-started claims are removed on the way."""
        names = {p.name for p in self.files("in-progress")}
        names |= {p.name.removesuffix(".lock") for p in self.leases.glob("*.lock")}
        for name in sorted(names):
            lease = self._lock(name)
            if lease is None:
                continue  # a live daemon holds it
            lease.path = self.folder("in-progress") / name
            if not lease.path.exists():
                self.release(lease)
                continue
            with contextlib.suppress(ValueError, OSError):
                lease.info = json.loads(lease.lock_path.read_bytes() or b"{}")
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
