"""The history file (``history.sqlite3``): its schema, opening it, and recovering from a bad one.

``open_history`` returns a connection to a checked history in WAL mode with the current schema
(``SCHEMA``, plus the columns in ``MIGRATIONS`` for a history from an older release); the
queries on it are ``daemon/store.py``'s.

Because the history is expendable, a file that cannot be used never stops a start: when
opening it fails with corruption ("file is not a database", "database disk image is
malformed"), when ``PRAGMA quick_check`` (milliseconds for a history of years) finds damage,
or when the file cannot be read (permissions), the file is moved aside, with its ``-wal``
and ``-shm`` files, to ``history.sqlite3.corrupt-<UTC timestamp>`` (for example
``history.sqlite3.corrupt-20261122T103000Z``), a warning naming it is logged, and a fresh
history is started; ``open_history`` says where the old file went. Other errors (a lock held
too long, a full disk), or a fresh history that cannot be created either, raise
``HistoryUnavailable``. Openers in several threads or processes take turns, on
``history.sqlite3.lock``, to switch a fresh file to WAL, to move a file aside or to set up a
fresh one.
"""

from __future__ import annotations

import fcntl
import os
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from datetime import UTC, datetime
from pathlib import Path

from daemon.errors import HistoryUnavailable

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    claim_id TEXT UNIQUE NOT NULL,
    ticket TEXT NOT NULL,          -- file name, stable across folders
    task_id TEXT NOT NULL,
    title TEXT NOT NULL DEFAULT '',
    started_at TEXT NOT NULL,
    finished_at TEXT,
    outcome TEXT NOT NULL DEFAULT 'running',  -- running done failed review requeued interrupted
    stage TEXT,
    error_code TEXT,
    error TEXT,
    branch TEXT,
    model TEXT,
    duration_s REAL,
    config TEXT
);
CREATE INDEX IF NOT EXISTS runs_ticket ON runs (ticket, started_at);
CREATE INDEX IF NOT EXISTS runs_branch ON runs (branch);
CREATE TABLE IF NOT EXISTS stages (
    run_id INTEGER NOT NULL REFERENCES runs (id),
    stage TEXT NOT NULL,
    started_at TEXT NOT NULL,
    duration_s REAL,
    outcome TEXT
);
CREATE INDEX IF NOT EXISTS stages_run ON stages (run_id);
CREATE TABLE IF NOT EXISTS llm_calls (
    run_id INTEGER NOT NULL REFERENCES runs (id),
    model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    eval_tokens INTEGER NOT NULL,
    duration_s REAL NOT NULL,
    outcome TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS llm_calls_run ON llm_calls (run_id);
-- the learning loop (daemon/insights.py): versioned prompt lessons, learned chains, its log
CREATE TABLE IF NOT EXISTS lessons (
    version INTEGER PRIMARY KEY,
    created_at TEXT NOT NULL,
    text TEXT NOT NULL,
    codes TEXT NOT NULL,           -- JSON list of the failure codes it answers
    active INTEGER NOT NULL DEFAULT 1,
    rolled_back_at TEXT,
    reason TEXT
);
CREATE TABLE IF NOT EXISTS label_chains (
    label TEXT PRIMARY KEY,
    models TEXT NOT NULL,          -- JSON list, best first
    evidence TEXT NOT NULL,        -- JSON {model: {runs, ok, rate}}
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS insight_log (
    at TEXT NOT NULL,
    line TEXT NOT NULL
);
-- pull requests ticketd opened (daemon/pulls.py): how long they took to merge, revisions
CREATE TABLE IF NOT EXISTS pulls (
    number INTEGER PRIMARY KEY,
    ticket TEXT NOT NULL,
    task_id TEXT NOT NULL,
    url TEXT NOT NULL,
    opened_at TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'open',  -- open merged closed
    finished_at TEXT,
    revisions INTEGER NOT NULL DEFAULT 0
);
"""
# Columns added after the first release: (table, column, declaration).
MIGRATIONS = [
    ("runs", "llm_calls", "INTEGER"),
    ("runs", "prompt_tokens", "INTEGER"),
    ("runs", "eval_tokens", "INTEGER"),
    ("runs", "quality", "REAL"),
    ("runs", "model_outcomes", "TEXT"),  # JSON {model: ok | not_found | failed}
    ("runs", "labels", "TEXT"),  # JSON list of the ticket's labels
    ("runs", "lesson_version", "INTEGER"),  # lessons in the builtin prompt; 0: none
    ("runs", "revision", "INTEGER"),  # a revision run: its pull request's number
    ("runs", "edit_format", "TEXT"),  # builtin: the format of the answer that passed
    ("runs", "host", "TEXT"),  # the Ollama host the run was pinned to (where it ended)
    ("llm_calls", "host", "TEXT"),  # the Ollama host that answered (or failed)
]


_OBJECTS = frozenset(re.findall(r"CREATE (?:TABLE|INDEX) IF NOT EXISTS (\w+)", SCHEMA))

# SQLite's primary result codes that mean the file itself is damaged or not a database.
_DAMAGED = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB


class _Unusable(Exception):
    """The file at the history's path cannot serve as the history; it may be moved aside."""


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction on ``db`` (a connection in autocommit mode), rolled back when
    the block or the commit fails."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:  # a COMMIT that failed (a full disk) leaves it open
            with suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise


def open_history(path: Path) -> tuple[sqlite3.Connection, Path | None]:
    """A connection to the history at ``path`` (its folder created if missing), and where an
    unusable file there was moved aside before a fresh history was started (else None).
    Raises ``HistoryUnavailable`` when neither the history nor a fresh one can be opened."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HistoryUnavailable(f"{path}: cannot create its folder: {e}") from e
    try:
        return _open(path), None
    except _Unusable as e:
        return _recover(path, str(e))
    except sqlite3.Error as e:
        raise HistoryUnavailable(f"{path}: cannot open the history: {e}") from e


def _recover(path: Path, reason: str) -> tuple[sqlite3.Connection, Path | None]:
    """Move the unusable file aside and open a fresh history, one recovery at a time
    across threads and processes (another may have recovered it while we waited)."""
    try:
        with _exclusive(_lock_path(path)):
            try:
                return _open(path, locked=True), None
            except _Unusable as e:
                reason = str(e)
            aside = _move_aside(path)
            from loguru import logger  # only here: ``ticketd status`` loads no logging

            logger.warning(
                "history {} cannot be used ({}); moved it aside to {} and started a fresh one",
                path,
                reason,
                aside,
            )
            return _open(path, locked=True), aside
    except (OSError, sqlite3.Error, _Unusable) as e:
        raise HistoryUnavailable(
            f"{path} cannot be used ({reason}), and no fresh history can take its place: {e}"
        ) from e


def _open(path: Path, *, locked: bool = False) -> sqlite3.Connection:
    """A connection to a checked history with the current schema (``locked``: the caller
    holds the lock beside it). Raises ``_Unusable`` when the file is damaged or cannot be
    read, ``sqlite3.Error`` for anything else."""
    _check(path)
    try:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
    except sqlite3.Error as e:
        if _damaged(e):
            raise _Unusable(str(e)) from e
        raise
    try:
        db.row_factory = sqlite3.Row
        if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            # A fresh file. Two connections switching it at once can fail at once (no busy
            # wait for that), so they take turns; a file once switched stays in WAL.
            with nullcontext() if locked else _exclusive(_lock_path(path)):
                db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        _migrate(db)
    except sqlite3.Error as e:
        db.close()
        if _damaged(e):
            raise _Unusable(str(e)) from e
        raise
    except BaseException:
        db.close()
        raise
    return db


def _migrate(db: sqlite3.Connection) -> None:
    """Create the missing tables and columns. Only when something is missing, and then in one
    write transaction, since another connection may be doing the same; a history that is
    current is only read (a reader may lack write access)."""
    if _current(db):
        return
    db.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}")
    try:
        for table, column, declaration in MIGRATIONS:
            if column not in _columns(db, table):
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _current(db: sqlite3.Connection) -> bool:
    have = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    return have >= _OBJECTS and all(
        column in _columns(db, table) for table, column, _ in MIGRATIONS
    )


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def _check(path: Path) -> None:
    """Raise ``_Unusable`` when the file at ``path`` cannot be the history: not accessible,
    not a database, or damaged (``PRAGMA quick_check``). The look is read-only, because
    closing a read-write connection deletes the -wal file, which must go aside with it."""
    try:
        if path.stat().st_size == 0:
            return  # no history yet
    except FileNotFoundError:
        return
    if not os.access(path, os.R_OK):
        raise _Unusable("permission denied")
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as e:
        if _damaged(e):
            raise _Unusable(str(e)) from e
        return  # the read-write open says what is wrong
    try:
        found = [row[0] for row in db.execute("PRAGMA quick_check")]
    except sqlite3.Error as e:
        if _damaged(e):
            raise _Unusable(str(e)) from e
        return  # busy, or a WAL only a writer can recover: the read-write open decides
    finally:
        db.close()
    if found != ["ok"]:
        raise _Unusable("damaged: " + " ".join(" ".join(found).split())[:200])


def _damaged(e: sqlite3.Error) -> bool:
    """Does the error say the file is damaged or not a database (not busy, not full)?"""
    return (getattr(e, "sqlite_errorcode", 0) & 0xFF) in _DAMAGED


def _move_aside(path: Path) -> Path:
    """Rename ``path`` to ``<name>.corrupt-<UTC timestamp>``, its -wal and -shm files first
    (a WAL left beside a fresh file would be replayed into it)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    for suffix in ("-wal", "-shm"):
        with suppress(FileNotFoundError):
            path.with_name(path.name + suffix).rename(aside.with_name(aside.name + suffix))
    path.rename(aside)
    return aside


def _lock_path(path: Path) -> Path:
    """Beside the history: taken while a fresh file is set up or a bad one moved aside."""
    return path.with_name(path.name + ".lock")


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``lock_path`` while inside."""
    with lock_path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
