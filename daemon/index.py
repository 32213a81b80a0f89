"""An index of the backlog's tickets in SQLite (``state_dir/index.sqlite3``): what intake and
``ticketd status`` ask of every ticket (its id, priority, order and dependencies; its words for
duplicate detection) without reading the folders again, so a claim costs the same with ten
tickets in ``done/`` or ten thousand, and memory stays flat.

It is a cache, never the truth: each row keeps what ``lstat`` said of its file (device,
inode, mode, size, mtime) and is read again when that changes. ``refresh`` lists the indexed
folders and reads only the files that changed (at start and at every reconcile: watchdog can
drop events); ``touch`` marks one path changed (the daemon's own moves, watchdog's events),
read again at the next question. A file that is no database is replaced; where none can be
written (another user's state folder), or the file fails (a full disk), the index lives in
memory for the process.

Similar tickets are found by prefix filtering: a ticket sharing at least ``threshold`` of
``A ∪ B`` with ``A`` shares at least ``m = ceil(threshold * |A|)`` words of ``A``: it lacks
at most ``s = |A| - m`` of them, so it holds at least ``k - s`` of any ``k`` of them. The
``2(s + 1)`` rarest are asked for, and only the tickets holding ``s + 2`` of those are read:
the few that share rare words, whatever the number of tickets.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from daemon import tickets
from daemon.errors import InvalidTicket
from daemon.historyfile import transaction

SCHEMA = 2
_SCHEMA = """
CREATE TABLE tickets(
    path TEXT PRIMARY KEY,       -- folder/name, under the backlog's root
    folder TEXT NOT NULL,
    stat TEXT NOT NULL,          -- dev:ino:mode:mtime_ns:size, as lstat said when it was read
    mtime REAL NOT NULL,
    id TEXT,                     -- NULL: no ticket (invalid says why)
    invalid TEXT,
    title TEXT, priority TEXT, ordinal REAL, dependencies TEXT,
    words TEXT NOT NULL,         -- its distinct words, space-separated
    nwords INTEGER NOT NULL
);
CREATE INDEX tickets_folder ON tickets(folder, path);
CREATE TABLE words(path TEXT, word TEXT, PRIMARY KEY(path, word)) WITHOUT ROWID;
CREATE INDEX words_word ON words(word);
CREATE TABLE vocab(word TEXT PRIMARY KEY, df INTEGER NOT NULL) WITHOUT ROWID;
"""
_EPS = 1e-9
BATCH = 200  # files read, or rows fetched, at a time
T = TypeVar("T")


@dataclass(frozen=True)
class Brief:
    """What the index knows of a ticket: enough to order and plan it (``Backlog.plan``)."""

    path: Path
    id: str
    title: str
    priority: str | None
    ordinal: float | None
    dependencies: tuple[str, ...]

    @classmethod
    def of(cls, ticket: tickets.Ticket) -> Brief:
        return cls(
            ticket.path, ticket.id, ticket.title, ticket.priority, ticket.ordinal,
            ticket.dependencies,
        )  # fmt: skip


@dataclass(frozen=True)
class Similar:
    path: Path
    folder: str
    id: str
    mtime: float  # of the file, as last read


def stat_key(st: os.stat_result) -> tuple[int, ...]:
    """What ``lstat`` says of a file that changes when its content does: device, inode, mode,
    mtime in ns, size (the index's rows and the backlog's parse cache are keyed by it)."""
    return (st.st_dev, st.st_ino, st.st_mode, st.st_mtime_ns, st.st_size)


def _stat_text(st: os.stat_result) -> str:
    return ":".join(map(str, stat_key(st)))


def _row(
    rel: str, st: os.stat_result, read: Callable[[Path], tickets.Ticket], path: Path
) -> tuple[Any, ...]:
    """The ``tickets`` row of the file at ``path`` (``rel`` in the index), as ``read`` reads
    it: a ticket, or why it is none. Raises ``FileNotFoundError`` when it has gone."""
    head = (rel, rel.split("/", 1)[0], _stat_text(st), st.st_mtime)
    try:
        ticket = read(path)
    except InvalidTicket as e:
        return (*head, None, e.message, None, None, None, None, "", 0)
    deps = json.dumps(ticket.dependencies)
    words = ticket.words
    return (
        *head, ticket.id, None, ticket.title, ticket.priority, ticket.ordinal, deps,
        " ".join(words), len(words),
    )  # fmt: skip


class Index:
    """The index of the tickets in ``folders`` under ``root`` (see the module's doc).
    ``read`` parses a ticket (``Backlog.read``'s contract: ``InvalidTicket`` or
    ``FileNotFoundError``); ``names`` lists the names of a folder's ticket files."""

    def __init__(
        self,
        root: Path,
        folders: Sequence[str],
        read: Callable[[Path], tickets.Ticket],
        names: Callable[[str], list[str]],
        path: Path | None = None,
    ) -> None:
        self.root, self.folders = root, tuple(folders)
        self._read, self._names = read, names
        self._lock = threading.Lock()
        self._dirty: set[Path] = set()
        self._fresh: set[str] = set()  # folders listed since the index was opened
        self.path = path
        self._db = _connect(path)
        # Called with (files read, files to read) after each batch of long work (the first
        # start on a large backlog): the daemon says so and keeps systemd waiting.
        self.on_progress: Callable[[int, int], None] = lambda done, total: None

    # -- what the index answers: on an index in memory if its file fails -------------------

    def refresh(self, folders: Iterable[str] | None = None) -> int:
        """List ``folders`` (all indexed ones by default) and read the files that changed.
        Returns how many files were read or dropped."""
        return self._safely(lambda: self._refresh(folders))

    def flush(self, but: Path | None = None) -> None:
        """Read the touched files now, all but ``but`` (the daemon does, once a loop's
        claims are made, so that the next claim finds little to read)."""
        self._safely(lambda: self._flush(but))

    def briefs(self, folder: str) -> tuple[list[Brief], dict[Path, str]]:
        """The tickets of ``folder`` by file name, and the files there that are no ticket
        (why, by path)."""
        return self._safely(lambda: self._briefs(folder))

    def kept(self, folder: str) -> list[tuple[tuple[int, ...], Brief]]:
        """The tickets of ``folder``, each with what ``lstat`` said of its file when it was
        read (device, inode, mode, mtime in ns, size): what a restart need not parse again."""
        return self._safely(lambda: self._kept(folder))

    def ids(self, folder: str) -> list[str]:
        """The ids of the tickets in ``folder``."""
        return self._safely(lambda: self._ids(folder))

    def similar(
        self, words: frozenset[str], threshold: float, asking: Path | None = None
    ) -> list[Similar]:
        """The tickets sharing at least ``threshold`` of their distinct words with ``words``
        (Jaccard), in no order (the layout ranks them by state). ``asking``: the file of the
        ticket that asks, left to be read later (its row answers nothing here: a claim
        does not wait for it)."""
        return self._safely(lambda: self._similar(words, threshold, asking))

    def _safely(self, work: Callable[[], T]) -> T:
        """``work``; when the file fails it (a full disk, an I/O error), ``work`` again on
        an index in memory, built afresh: the index is a cache, never a reason to stop."""
        try:
            return work()
        except sqlite3.Error as e:
            from loguru import logger  # only here: ``ticketd status`` loads no logging

            logger.warning("ticket index {}: {}; kept in memory until a restart", self.path, e)
            with self._lock:
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
                self._db = _open(":memory:")
                self._fresh.clear()
            return work()

    # -- keeping it current ------------------------------------------------------------

    def touch(self, *paths: Path) -> None:
        """These files changed (or came or went): read them again before the next answer.
        Cheap and safe from any thread (watchdog's calls it)."""
        with self._lock:
            self._dirty.update(paths)

    def _refresh(self, folders: Iterable[str] | None = None) -> int:
        count = 0
        for folder in self.folders if folders is None else folders:
            with self._lock:  # what is touched from here on is read again later
                self._dirty = {p for p in self._dirty if p.parent.name != folder}
                self._fresh.add(folder)
            listed, base = {}, os.path.join(self.root, folder)
            for name in self._names(folder):
                with contextlib.suppress(OSError):
                    listed[f"{folder}/{name}"] = os.lstat(os.path.join(base, name))
            with self._lock:
                known = dict(
                    self._db.execute("SELECT path, stat FROM tickets WHERE folder = ?", (folder,))
                )
            changed = [rel for rel, st in listed.items() if known.get(rel) != _stat_text(st)]
            changed += [rel for rel in known if rel not in listed]
            self._update(changed)
            count += len(changed)
        return count

    def _current(self, folders: Iterable[str], but: Path | None = None) -> None:
        """Folders never listed by this process are listed; touched files are read (all
        but ``but``)."""
        with self._lock:
            stale = [f for f in folders if f not in self._fresh]
        if stale:
            self._refresh(stale)
        self._flush(but)

    def _flush(self, but: Path | None = None) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty - {but}, self._dirty & {but}
        mine = [self._rel(p) for p in dirty if p.parent == self.root / p.parent.name]
        self._update(rel for rel in mine if rel.split("/", 1)[0] in self.folders)

    def _update(self, rels: Iterable[str]) -> None:
        """Read each file again (its row, words and counts), or drop it when it has gone;
        a few hundred at a time, so that memory stays flat however many there are."""
        rels = list(rels)
        for i in range(0, len(rels), BATCH):
            self._update_some(rels[i : i + BATCH])
            if len(rels) > BATCH:
                self.on_progress(min(i + BATCH, len(rels)), len(rels))

    def _update_some(self, rels: Sequence[str]) -> None:
        """Read these files again and write what changed in one transaction: their rows,
        their words, and each word's count of tickets (once per word, not per ticket)."""
        with self._lock:
            before = {
                rel: self._db.execute(
                    "SELECT stat, words FROM tickets WHERE path = ?", (rel,)
                ).fetchone()
                for rel in rels
            }
        gone, rows = [], []
        for rel in rels:
            path = self.root / rel
            try:
                row: tuple[Any, ...] | None = _row(rel, os.lstat(path), self._read, path)
            except OSError:  # gone (FileNotFoundError included)
                row = None
            old = before[rel]
            if row is not None and old is not None and old[0] == row[2]:
                continue  # as read before (the event of a move the daemon made itself)
            if old is not None:
                gone.append(rel)
            if row is not None:
                rows.append(row)
        counts: Counter[str] = Counter()
        for rel in gone:
            counts.subtract(before[rel][1].split())
        for row in rows:
            counts.update(row[-2].split())
        with self._lock, transaction(self._db) as db:
            db.executemany("DELETE FROM words WHERE path = ?", ((rel,) for rel in gone))
            db.executemany("DELETE FROM tickets WHERE path = ?", ((rel,) for rel in gone))
            db.executemany("INSERT INTO tickets VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            db.executemany(
                "INSERT INTO words VALUES (?, ?)",
                ((row[0], word) for row in rows for word in row[-2].split()),
            )
            db.executemany(
                "INSERT INTO vocab VALUES (?, ?) ON CONFLICT(word) DO UPDATE"
                " SET df = df + excluded.df",
                ((word, n) for word, n in counts.items() if n),
            )
            db.executemany(
                "DELETE FROM vocab WHERE word = ? AND df <= 0",
                ((word,) for word, n in counts.items() if n < 0),
            )

    def _rel(self, path: Path) -> str:
        return f"{path.parent.name}/{path.name}"

    # -- questions ---------------------------------------------------------------------------

    def _briefs(self, folder: str) -> tuple[list[Brief], dict[Path, str]]:
        found, invalid = [], {}
        for _, path, brief in self._rows(folder):
            if isinstance(brief, str):
                invalid[path] = brief
            else:
                found.append(brief)
        return found, invalid

    def _kept(self, folder: str) -> list[tuple[tuple[int, ...], Brief]]:
        return [
            (tuple(map(int, stat.split(":"))), brief)
            for stat, _, brief in self._rows(folder)
            if isinstance(brief, Brief)
        ]

    def _rows(self, folder: str) -> list[tuple[str, Path, Brief | str]]:
        """(stat key, path, Brief or why it is no ticket) of each file of ``folder``."""
        self._current([folder])
        found: list[tuple[str, Path, Brief | str]] = []
        with self._lock:
            rows = self._db.execute(
                "SELECT path, stat, id, invalid, title, priority, ordinal, dependencies"
                " FROM tickets WHERE folder = ? ORDER BY path",
                (folder,),
            )
            while batch := rows.fetchmany(BATCH):  # not all at once: 10,000 rows are 4 MB
                for rel, stat, task_id, why, title, priority, ordinal, deps in batch:
                    path = self.root / rel
                    brief = why if task_id is None else Brief(
                        path, task_id, title, priority, ordinal, tuple(json.loads(deps))
                    )  # fmt: skip
                    found.append((stat, path, brief))
        return found

    def _ids(self, folder: str) -> list[str]:
        self._current([folder])
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM tickets WHERE folder = ? AND id IS NOT NULL ORDER BY path",
                (folder,),
            ).fetchall()
        return [task_id for (task_id,) in rows]

    def _similar(
        self, words: frozenset[str], threshold: float, asking: Path | None = None
    ) -> list[Similar]:
        self._current(self.folders, but=asking)
        if not words:
            return []
        need = max(1, math.ceil(threshold * len(words) - _EPS))
        spare = len(words) - need  # words of ``words`` a match may lack
        with self._lock:
            self._db.execute("DELETE FROM temp.asked")
            self._db.executemany("INSERT INTO temp.asked VALUES (?)", ((w,) for w in words))
            df = dict(
                self._db.execute(
                    "SELECT a.word, v.df FROM temp.asked a CROSS JOIN vocab v ON v.word = a.word"
                )
            )
            # The rarest words, twice as many as one match must hold; a match lacks at most
            # ``spare`` of them: it holds the rest, and only tickets that do are read.
            probe = sorted(words, key=lambda w: (df.get(w, 0), w))[: 2 * (spare + 1)]
            self._db.execute("DELETE FROM temp.probe")
            self._db.executemany("INSERT INTO temp.probe VALUES (?)", ((w,) for w in probe))
            low, high = threshold * len(words) - _EPS, len(words) / threshold + _EPS
            candidates = self._db.execute(
                "SELECT t.path, t.folder, t.id, t.mtime, t.nwords, t.words FROM tickets t JOIN"
                " (SELECT w.path FROM temp.probe p CROSS JOIN words w ON w.word = p.word"
                "  GROUP BY w.path HAVING count(*) >= ?) m ON m.path = t.path"
                " WHERE t.nwords BETWEEN ? AND ?",  # CROSS JOIN: the probe's words first
                (len(probe) - spare, low, high),
            ).fetchall()
        found = []
        for rel, folder, task_id, mtime, size, theirs in candidates:
            shared = len(words.intersection(theirs.split()))
            if shared >= need and shared / (len(words) + size - shared) >= threshold - _EPS:
                found.append(Similar(self.root / rel, folder, task_id, mtime))
        return found


def _connect(path: Path | None) -> sqlite3.Connection:
    """The index at ``path``, a fresh one in place of a file that is no index, or one in
    memory where none can be written."""
    if path is not None:
        for attempt in range(2):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                return _open(str(path))
            except (sqlite3.Error, OSError):
                if attempt or not path.exists():
                    break  # no state folder to write in: ``ticketd doctor`` says so
                for suffix in ("", "-wal", "-shm", "-journal"):  # a cache: start it afresh
                    with contextlib.suppress(OSError):  # none, or a folder: memory then
                        os.unlink(f"{path}{suffix}")
    return _open(":memory:")


def _open(name: str) -> sqlite3.Connection:
    db = sqlite3.connect(name, check_same_thread=False, isolation_level=None, timeout=10)
    try:
        with contextlib.suppress(sqlite3.OperationalError):  # another process is switching it
            db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("BEGIN IMMEDIATE")  # also proves it can be written
        if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA:
            tables = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
            for (table,) in tables:
                db.execute(f'DROP TABLE "{table}"')
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA}")
        db.execute("COMMIT")
        for table in ("asked", "probe"):  # the words of one question (``Index.similar``)
            db.execute(f"CREATE TEMP TABLE {table} (word TEXT PRIMARY KEY) WITHOUT ROWID")
    except BaseException:
        db.close()
        raise
    return db
