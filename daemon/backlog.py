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
import math
import os
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from daemon import tickets
from daemon.errors import InvalidTicket
from daemon.files import atomic_write, free_name, is_temp, remove_stale_temp, rename_noreplace
from daemon.index import Brief, Index, stat_key

FOLDERS = ("todo", "in-progress", "review", "done", "failed")
RECORDS = {"failed": ".error.json", "review": ".review.json"}  # a folder's side record
PRIORITY_RANK = {"high": 0, "medium": 1, None: 1, "low": 2}
LEASE_ENV = "TICKETD_LEASE"


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
        os.pwrite(self.fd, data, 0)  # never empty meanwhile: an empty lease is no claim
        os.ftruncate(self.fd, len(data))


class Plannable(Protocol):
    """What ``Backlog.plan`` orders by: a parsed ticket, or the index's brief of one."""

    @property
    def id(self) -> str: ...
    @property
    def path(self) -> Path: ...
    @property
    def priority(self) -> str | None: ...
    @property
    def ordinal(self) -> float | None: ...
    @property
    def dependencies(self) -> tuple[str, ...]: ...


T = TypeVar("T", bound=Plannable)


@dataclass(frozen=True)
class Waiting(Generic[T]):
    ticket: T
    reason: str


class Backlog:
    """The folder layout: the folder a ticket sits in is its state (see the module's doc).
    ``daemon/board.py`` is the Backlog.md layout behind the same methods."""

    layout = "folders"
    indexed: tuple[str, ...] = FOLDERS  # the folders the ticket index covers
    # What the cache keeps of a parsed ticket: its Brief (what intake plans with; a claim
    # parses the file again), so that memory does not grow with whole tickets in todo/.
    keeps_whole = False

    def __init__(self, root: Path, statuses: Mapping[str, str], index: Path | None = None) -> None:
        """``index``: the file of the ticket index (``daemon/index.py``; None: in memory)."""
        self.root = root
        self.statuses = dict(statuses)  # folder name -> status text
        self.leases = root / ".leases"
        # path -> (what lstat said of it, what is kept of the ticket (``keeps_whole``) or why it
        # is none); shared by the main loop and the workers, so every use of it holds the lock.
        self._cache: dict[Path, tuple[tuple[int, ...], tickets.Ticket | Brief | str]] = {}
        # Files read whole (``read(whole=True)``) whose cached parse is current as far as
        # events tell: ``forget`` (an event, the daemon's own write) takes a file out, and so
        # does ``doubt`` (each reconcile) when ``lstat`` says it changed unseen.
        self._trusted: set[Path] = set()
        self._todo: dict[str, Path] = {}  # the last listing of todo/, by name
        self._cache_lock = threading.Lock()
        self.index = Index(
            root, self.indexed, lambda path: self.read(path, keep=False), self._names, index
        )

    def ensure(self) -> None:
        for name in (*FOLDERS, ".leases"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        for name in FOLDERS:
            remove_stale_temp(self.root / name)

    def folder(self, name: str) -> Path:
        return self.root / name

    def key(self, path: Path) -> str:
        """The name a ticket is known by in leases, records, the history and worktrees."""
        return path.name

    def record(self, folder: str, name: str) -> Path:
        """The side record of ticket ``name`` in ``folder``: ``failed/X.error.json``,
        ``review/X.review.json``."""
        return self.folder(folder) / (name.removesuffix(".md") + RECORDS[folder])

    def records(self, folder: str) -> list[tuple[str, Path]]:
        """The ``(name, record)`` of each side record in ``folder``."""
        suffix = RECORDS[folder]
        try:
            found = [p for p in self.folder(folder).iterdir() if p.name.endswith(suffix)]
        except FileNotFoundError:
            return []
        return [(p.name.removesuffix(suffix) + ".md", p) for p in sorted(found)]

    def state_of(self, name: str) -> str | None:
        """The folder ticket ``name`` is in, or None."""
        return next((f for f in FOLDERS if os.path.lexists(self.folder(f) / name)), None)

    def locate(self, name: str, folder: str) -> Path | None:
        """The file of ticket ``name`` when it is in ``folder``."""
        path = self.folder(folder) / name
        return path if os.path.lexists(path) else None

    def present(self, lease: Lease) -> bool:
        """Is the leased ticket still where its run put it (not moved or removed by hand)?"""
        return os.path.lexists(lease.path)

    def failure_note(self, record: Mapping[str, Any], now: datetime) -> str:
        """A line for the ticket itself on why it failed: none here (``.error.json`` is
        beside it)."""
        return ""

    def problems(self) -> dict[Path, str]:
        """Files that cannot run and are not moved for it (the Backlog.md layout's)."""
        return {}

    def ticket_ids(self) -> list[str]:
        """Every id in use, for ``ticketd new``."""
        ids = []
        for folder in FOLDERS:
            for path in self.files(folder):
                try:
                    ids.append(self.read(path).id)
                except (InvalidTicket, OSError):
                    ids.append(tickets.id_from_filename(path))
        return ids

    def new_id(self, prefix: str) -> str:
        """The id ``ticketd new`` gives the next ticket."""
        return tickets.next_id(self.ticket_ids(), prefix)

    def new_ticket_path(self, ticket_id: str, title: str) -> Path:
        """Where ``ticketd new`` writes a ticket."""
        return self.folder("todo") / tickets.filename_for(ticket_id, title)

    def new_ticket_fields(self) -> dict[str, Any]:
        """What ``ticketd new`` writes besides the title and what the person gave."""
        return {"status": self.statuses["todo"]}

    def files(self, folder: str) -> list[Path]:
        """The tickets in ``folder``."""
        return self._listing(folder)

    def count(self, folder: str) -> int:
        """How many tickets are in ``folder``."""
        return len(self._names(folder))

    def _listing(self, folder: str) -> list[Path]:
        """The ticket files of ``root/folder`` (a path under the backlog), by name."""
        base = self.root / folder
        if folder != "todo":
            return [base / name for name in sorted(self._names(folder))]
        known = self._todo  # the same Path each time (its hash is kept) for intake's passes
        self._todo = {name: known.get(name) or base / name for name in self._names(folder)}
        return [self._todo[name] for name in sorted(self._todo)]

    def _names(self, folder: str) -> list[str]:
        """The names of the ticket files of ``root/folder``, in no order."""
        try:
            names = os.listdir(self.root / folder)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [n for n in names if is_ticket_name(n) and not is_temp(n)]

    def read(self, path: Path, *, keep: bool = True, whole: bool = False) -> tickets.Ticket:
        """Parse a ticket, cached on what ``lstat`` says of the file (a link is never followed).
        With ``keep`` false (the index's reads of every folder) a cached parse is used but a
        new one is not kept: memory holds the tickets intake reads (their Briefs, unless
        ``keeps_whole``), not all of ``done/``.
        ``whole``: the caller knows the file is whole (intake's settle probe), so ``unchanged``
        may answer with this parse until an event says the file changed.

        Raises ``InvalidTicket`` with the reason for anything that is not a readable ticket: a
        link, a directory, a FIFO or another non-regular file, a file that cannot be read, bad
        content. Raises ``FileNotFoundError`` when the file has moved away. Nothing else.
        """
        key, cached = self._lookup(path)
        if isinstance(cached, str):
            raise InvalidTicket(cached)
        if isinstance(cached, tickets.Ticket):
            ticket = cached
        else:
            try:
                ticket = tickets.parse_file(path)
            except InvalidTicket as e:
                if keep:
                    with self._cache_lock:
                        self._cache[path] = (key, e.message)
                        self._trusted.discard(path)
                raise
            if keep and cached is None:  # new content (a Brief kept says the same)
                kept = ticket if self.keeps_whole else Brief.of(ticket)
                with self._cache_lock:
                    self._cache[path] = (key, kept)
                    self._trusted.discard(path)
        if whole and keep:
            with self._cache_lock:
                self._trusted.add(path)
        return ticket

    def unchanged(self, path: Path, *, trust: bool = True) -> Plannable | None:
        """What was kept of the ticket read whole from ``path`` before (its Brief, or the
        ticket), when the file is as it was then; else None. Intake asks this of every file in
        todo/ at every pass: a file read whole is neither probed nor parsed again, nor even
        ``lstat``-ed while no event says it changed (``trust`` false: ``lstat`` it anyway)."""
        with self._cache_lock:
            cached = self._cache.get(path) if path in self._trusted else None
        if cached is None or isinstance(cached[1], str):
            return None
        if not trust:
            try:
                if self._lookup(path)[1] is not cached[1]:
                    return None
            except (FileNotFoundError, InvalidTicket):
                return None
        return cached[1]

    def settled(self, path: Path) -> Plannable:
        """What is kept of the ticket at ``path``, now known to be whole (intake's settle
        probe said so): parsed again only if the file changed since it was last read.
        Raises as ``read`` does."""
        cached = self._lookup(path)[1]
        if cached is None or isinstance(cached, str):
            ticket = self.read(path, whole=True)
            return self.unchanged(path) or ticket
        with self._cache_lock:
            self._trusted.add(path)
        return cached

    def seed(self) -> None:
        """Keep what the ticket index knows of each file in todo/, so that the first pass
        after a start parses only the files that changed while the daemon was away."""
        if self.keeps_whole:
            return
        listed = {path.name: path for path in self._listing("todo")}  # one Path a file
        kept = [
            (key, replace(brief, path=listed[brief.path.name]))
            for key, brief in self.index.kept("todo")
            if brief.path.name in listed
        ]
        with self._cache_lock:
            for key, brief in kept:
                self._cache.setdefault(brief.path, (key, brief))

    def doubt(self) -> None:
        """``lstat`` every file ``unchanged`` trusts: one that changed without an event (watchdog
        can drop them) is probed and read again at the next pass."""
        with self._cache_lock:
            trusted = list(self._trusted)
        changed = [path for path in trusted if self.unchanged(path, trust=False) is None]
        with self._cache_lock:
            self._trusted.difference_update(changed)

    def _lookup(self, path: Path) -> tuple[tuple[int, ...], tickets.Ticket | Brief | str | None]:
        """What ``lstat`` says of ``path``, and what was read of it when it said the same."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise InvalidTicket(tickets.os_reason(e)) from e
        key = stat_key(st)
        with self._cache_lock:
            cached = self._cache.get(path)
        return key, cached[1] if cached is not None and cached[0] == key else None

    def forget(self, *paths: Path) -> None:
        """These files changed, came or went (the daemon's own moves and writes, watchdog's
        events): nothing read of them before is used again."""
        with self._cache_lock:
            for path in paths:
                self._cache.pop(path, None)
                self._trusted.discard(path)
        self.index.touch(*paths)

    def trim_cache(self) -> None:
        """Drop parsed tickets whose files have moved or gone."""
        with self._cache_lock:
            paths = list(self._cache)
        gone = [p for p in paths if not os.path.lexists(p)]
        with self._cache_lock:
            for path in gone:
                self._cache.pop(path, None)
                self._trusted.discard(path)

    def done_ids(self) -> list[str]:
        return self.index.ids("done")

    def briefs(self) -> tuple[Sequence[Plannable], dict[Path, str]]:
        """What ``plan`` needs of each ticket in todo/, from the index (nothing is parsed
        twice), and the files there that are no ticket (why, by path)."""
        return self.index.briefs("todo")

    def runnable(self, candidates: Sequence[T]) -> list[T]:
        """The todo tickets whose dependencies are done, in no order (``order`` orders them)."""
        missing = self._missing(candidates)
        return [t for t, m in zip(candidates, missing, strict=True) if not m]

    def plan(
        self, candidates: Sequence[T], behind: Set[str] = frozenset()
    ) -> tuple[list[T], list[Waiting[T]]]:
        """Split todo tickets into ready ones (``order``'s order) and waiting ones, with why."""
        missing = self._missing(candidates)
        ready = [t for t, m in zip(candidates, missing, strict=True) if not m]
        waiting: list[Waiting[T]] = []
        if len(ready) < len(candidates):  # only then read where the others are
            elsewhere = {self.canonical(t.id): "todo" for t in candidates} | self.whereabouts()
            for t, m in zip(candidates, missing, strict=True):
                if m:
                    why = [f"{d} ({elsewhere.get(self.canonical(d), 'not found')})" for d in m]
                    waiting.append(Waiting(t, "waits for " + ", ".join(why)))
        return self.order(ready, behind), waiting

    def _missing(self, candidates: Sequence[Plannable]) -> list[list[str]]:
        """Each candidate's dependencies that are not done."""
        if not any(t.dependencies for t in candidates):  # only then read done/
            return [[] for _ in candidates]
        done = {self.canonical(i) for i in self.done_ids()}
        return [[d for d in t.dependencies if self.canonical(d) not in done] for t in candidates]

    def order(self, ready: list[T], behind: Set[str] = frozenset()) -> list[T]:
        """Tickets in the order they run: by priority, then fresh before those named in
        ``behind`` (retries), then their ordinal, then id."""
        return sorted(
            ready,
            key=lambda t: (
                PRIORITY_RANK.get(t.priority, 1),
                self.key(t.path) in behind,
                math.inf if t.ordinal is None else t.ordinal,
                tickets.id_key(t.id),
            ),
        )

    def canonical(self, task_id: str) -> str:
        """An id as dependencies are matched against it."""
        return task_id.strip().lower()

    def whereabouts(self) -> dict[str, str]:
        """Where each ticket not done is, by canonical id (a waiting ticket's reason)."""
        found: dict[str, str] = {}
        for folder in ("failed", "review", "in-progress"):
            for task_id in self.index.ids(folder):
                found.setdefault(self.canonical(task_id), folder)
        return found

    def duplicate_of(
        self, ticket: tickets.Ticket, threshold: float, window_days: float, now: float
    ) -> tickets.Ticket | None:
        """An older ticket in todo/, a ticket in in-progress/, or one done within
        ``window_days``, sharing at least ``threshold`` of its words with ``ticket``: found
        in the index, so the cost does not grow with the number of tickets."""
        rank = {"todo": 0, "in-progress": 1, "done": 2}
        found = []
        for similar in self.index.similar(ticket.words, threshold, ticket.path):
            if similar.path == ticket.path:
                continue
            try:
                state = self._indexed_state(similar.path)
                if state == "done" and now - similar.mtime > window_days * 86400:
                    continue
                if state == "todo" and tickets.id_key(similar.id) >= tickets.id_key(ticket.id):
                    continue  # of two in todo/, the later one is the duplicate
                if state in rank:
                    found.append((rank[state], similar.path.name, self.read(similar.path)))
            except (InvalidTicket, OSError):
                continue
        return min(found, key=lambda f: f[:2])[2] if found else None

    def _indexed_state(self, path: Path) -> str | None:
        """The state of a ticket the index found at ``path``: its folder here."""
        return path.parent.name

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
        try:
            src, dst = self._enter(name, source)
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
                self._leave(src, dst)
            self.release(lease)
            raise
        return lease

    def _enter(self, name: str, source: str) -> tuple[Path, Path]:
        """Put ticket ``name`` from ``source`` into in-progress/: (where it was, where it is).
        Raises FileNotFoundError when it is not in ``source``."""
        src, dst = self.folder(source) / name, self.folder("in-progress") / name
        rename_noreplace(src, dst)
        self.forget(src, dst)
        return src, dst

    def _leave(self, src: Path, dst: Path) -> None:
        """Undo ``_enter``."""
        rename_noreplace(dst, src)
        self.forget(src, dst)

    def take(self, name: str, folder: str) -> Lease | None:
        """Lock the lease of ``<folder>/<name>`` without moving it (to move it elsewhere), or
        None when someone holds it or the file is not there."""
        lease = self._lock(name)
        if lease is None:
            return None
        path = self.locate(name, folder)
        if path is None:
            self.release(lease)
            return None
        lease.path = path
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
        names = {self.key(p) for p in self.files("in-progress")}
        known = {self.lock_path(n).name for n in names}
        for stale in self.leases.glob("*.lock"):  # a lease whose ticket left: remove it
            if stale.name not in known and (lease := self._lock_file(stale)) is not None:
                self.release(lease)
        for name in sorted(names):
            lease = self._lock(name)
            if lease is None:
                continue  # a live daemon holds it
            path = self.locate(name, "in-progress")
            if path is None:  # a link to nowhere is still there to recover
                self.release(lease)
                continue
            lease.path = path
            with contextlib.suppress(ValueError, OSError, InvalidTicket):
                info = json.loads(tickets.read_bytes(lease.lock_path) or b"{}")
                lease.info = info if isinstance(info, dict) else {}
            yield lease

    # -- moves ------------------------------------------------------------------------------

    def rewrite(
        self,
        path: Path,
        folder: str,
        now: datetime,
        references: Sequence[str] = (),
        note: str = "",
    ) -> None:
        """Set the ticket's ``status`` (and ``updated_date``, ``references``) for ``folder``,
        in place and atomically; a file that cannot be parsed is left as it is. The file is
        read afresh, so an edit a person made meanwhile is kept. (``note`` is for the
        Backlog.md layout, which says in the ticket why it failed.)"""
        try:
            text = tickets.read_text(path)
            current = tickets.parse_text(text, path)
        except InvalidTicket:
            return
        updates: dict[str, str | Sequence[str]] = {
            "status": self.statuses[folder],
            "updated_date": now.strftime("%Y-%m-%d %H:%M"),
        }
        if references:
            old = list(current.references)
            updates["references"] = old + [r for r in references if r not in old]
        new = self._edit(current, folder, tickets.update_frontmatter(text, updates), note)
        if new != text:  # already as it should read (rewritten just before a move): no I/O
            atomic_write(path, new)
        self.forget(path)

    def _edit(self, ticket: tickets.Ticket, folder: str, text: str, note: str) -> str:
        """More of ``rewrite`` for a layout: the folder layout changes nothing else."""
        return text

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
        note: str = "",
    ) -> Path:
        """Rewrite the status for ``folder`` then put the ticket there. Returns its path."""
        path = self._follow(path)
        self.rewrite(path, folder, now, references, note)
        return self._place(path, folder, dst)

    def _follow(self, path: Path) -> Path:
        """Where the ticket last seen at ``path`` is now (it stays put here)."""
        return path

    def _place(self, path: Path, folder: str, dst: Path | None) -> Path:
        """The folder layout: rename the ticket into ``folder`` (to ``dst`` when given)."""
        dst = dst or self.target(folder, path.name)
        rename_noreplace(path, dst)
        self.forget(path, dst)
        return dst


def _side_name(name: str, suffix: str) -> str:
    """``name + suffix``, or a hash of ``name`` when that would pass 255 bytes."""
    full = name + suffix
    if len(full.encode()) <= 255:
        return full
    return hashlib.sha256(name.encode()).hexdigest() + suffix
