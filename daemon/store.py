"""Run history in SQLite (WAL): runs, their stages, their outcomes.

The history explains what happened; it is never needed to know where a ticket is (the
folders say that). Writers are the daemon's worker threads, serialised by a lock; readers
(``ticketd status``) open their own connection.

Because the history is expendable, a file that cannot be used never stops a start: when
opening it fails with corruption ("file is not a database", "database disk image is
malformed"), when ``PRAGMA quick_check`` (milliseconds for a history of years) finds damage,
or when the file cannot be read (permissions), ``Store`` moves it aside, with its ``-wal``
and ``-shm`` files, to ``history.sqlite3.corrupt-<UTC timestamp>`` (for example
``history.sqlite3.corrupt-20261122T103000Z``), logs a warning naming it, and starts a fresh
history; ``Store.recovered_from`` says where the old file went. Other errors (a lock held
too long, a full disk), or a fresh history that cannot be created either, raise
``HistoryUnavailable``. Stores in several threads or processes take turns, on
``history.sqlite3.lock``, to move a file aside or to set up a fresh one.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from daemon.errors import TicketdError

if TYPE_CHECKING:
    from daemon.llm.client import Call

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
]


_OBJECTS = frozenset(re.findall(r"CREATE (?:TABLE|INDEX) IF NOT EXISTS (\w+)", SCHEMA))

# SQLite's primary result codes that mean the file itself is damaged or not a database.
_DAMAGED = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB


class HistoryUnavailable(TicketdError):
    """The history cannot be opened, and no fresh one can be created in its place."""


class _Unusable(Exception):
    """The file at the history's path cannot serve as the history; it may be moved aside."""


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


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        # Where an unusable history was moved before a fresh one was started, else None.
        self.recovered_from: Path | None = None
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise HistoryUnavailable(f"{path}: cannot create its folder: {e}") from e
        try:
            self._db = _open(path)
        except _Unusable as e:
            self._db = self._recover(str(e))
        except sqlite3.Error as e:
            raise HistoryUnavailable(f"{path}: cannot open the history: {e}") from e

    def _recover(self, reason: str) -> sqlite3.Connection:
        """Move the unusable file aside and open a fresh history, one recovery at a time
        across threads and processes (another may have recovered it while we waited)."""
        path = self.path
        try:
            with _exclusive(_lock_path(path)):
                try:
                    return _open(path, locked=True)
                except _Unusable as e:
                    reason = str(e)
                aside = _move_aside(path)
                self.recovered_from = aside
                logger.warning(
                    "history {} cannot be used ({}); moved it aside to {} and started a fresh one",
                    path,
                    reason,
                    aside,
                )
                return _open(path, locked=True)
        except (OSError, sqlite3.Error, _Unusable) as e:
            raise HistoryUnavailable(
                f"{path} cannot be used ({reason}), and no fresh history can take its place: {e}"
            ) from e

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """One query on the shared connection, under the same lock as the writers."""
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def start_run(
        self,
        claim_id: str,
        ticket: str,
        task_id: str,
        title: str,
        at: str,
        config: dict[str, Any],
        *,
        branch: str | None = None,
    ) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO runs (claim_id, ticket, task_id, title, started_at, config, branch)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (claim_id, ticket, task_id, title, at, json.dumps(config), branch),
            )
            return int(cur.lastrowid or 0)

    def branch_owner(self, branch: str, ticket: str) -> str | None:
        """Another ticket file whose run is on ``branch`` now or pushed it (one branch per
        ticket file), or None."""
        rows = self._read(
            "SELECT ticket FROM runs WHERE branch = ? AND ticket != ?"
            " AND outcome IN ('running', 'done') ORDER BY id DESC LIMIT 1",
            (branch, ticket),
        )
        return str(rows[0]["ticket"]) if rows else None

    def start_stage(self, run_id: int, stage: str, at: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE runs SET stage = ? WHERE id = ?", (stage, run_id))
            db.execute(
                "INSERT INTO stages (run_id, stage, started_at) VALUES (?, ?, ?)",
                (run_id, stage, at),
            )

    def end_stage(self, run_id: int, stage: str, duration_s: float, outcome: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE stages SET duration_s = ?, outcome = ? WHERE run_id = ? AND stage = ?"
                " AND duration_s IS NULL",
                (duration_s, outcome, run_id, stage),
            )

    def finish_run(
        self,
        run_id: int,
        at: str,
        outcome: str,
        duration_s: float,
        *,
        error_code: str | None = None,
        error: str | None = None,
        branch: str | None = None,
        model: str | None = None,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE runs SET finished_at = ?, outcome = ?, duration_s = ?, error_code = ?,"
                " error = ?, branch = COALESCE(?, branch), model = COALESCE(?, model) WHERE id = ?",
                (at, outcome, duration_s, error_code, error, branch, model, run_id),
            )

    def record_calls(
        self, run_id: int, calls: Sequence[Call], *, quality: float | None, outcomes: dict[str, str]
    ) -> None:
        """Each LLM request of a run, its totals, each model's outcome and the quality score."""
        with self._tx() as db:
            db.executemany(
                "INSERT INTO llm_calls (run_id, model, prompt_tokens, eval_tokens, duration_s,"
                " outcome) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (run_id, c.model, c.prompt_tokens, c.eval_tokens, c.duration_s, c.outcome)
                    for c in calls
                ],
            )
            db.execute(
                "UPDATE runs SET llm_calls = ?, prompt_tokens = ?, eval_tokens = ?, quality = ?,"
                " model_outcomes = ? WHERE id = ?",
                (
                    len(calls),
                    sum(c.prompt_tokens for c in calls),
                    sum(c.eval_tokens for c in calls),
                    quality,
                    json.dumps(outcomes),
                    run_id,
                ),
            )

    def interrupt(self, claim_id: str, ticket: str, task_id: str, at: str) -> None:
        """Record that the run under ``claim_id`` was cut off (a dead daemon's run)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE runs SET outcome = 'interrupted', error_code = 'INTERRUPTED',"
                " error = 'the daemon stopped during the run', finished_at = ?"
                " WHERE claim_id = ? AND outcome = 'running'",
                (at, claim_id),
            )
            if cur.rowcount == 0:
                db.execute(
                    "INSERT OR IGNORE INTO runs (claim_id, ticket, task_id, started_at,"
                    " finished_at, outcome, error_code, error) VALUES (?, ?, ?, ?, ?,"
                    " 'interrupted', 'INTERRUPTED', 'the daemon stopped during the run')",
                    (claim_id or f"lost-{ticket}-{at}", ticket, task_id, at, at),
                )

    def attempts(self, ticket: str) -> list[dict[str, Any]]:
        """Earlier unsuccessful runs of this ticket file, oldest first."""
        rows = self._read(
            "SELECT started_at, stage, error_code, model, duration_s FROM runs"
            " WHERE ticket = ? AND outcome IN ('failed', 'interrupted', 'review') ORDER BY id",
            (ticket,),
        )
        return [
            {
                "at": r["started_at"],
                "stage": r["stage"],
                "errorCode": r["error_code"],
                "model": r["model"],
                "durationS": r["duration_s"],
            }
            for r in rows
        ]

    def history(self) -> dict[str, bool]:
        """Ticket files that have run before, each with whether a run was unsuccessful
        (duplicate detection is for new tickets; retries queue behind fresh ones)."""
        rows = self._read(
            "SELECT ticket, MAX(outcome IN ('failed', 'interrupted', 'review')) AS retried"
            " FROM runs GROUP BY ticket"
        )
        return {r["ticket"]: bool(r["retried"]) for r in rows}

    def last_run(self, ticket: str) -> dict[str, Any] | None:
        """The latest finished run of this ticket file."""
        row = self._read(
            "SELECT outcome, error_code, error, stage, branch FROM runs WHERE ticket = ?"
            " AND outcome != 'running' ORDER BY id DESC LIMIT 1",
            (ticket,),
        )
        return dict(row[0]) if row else None

    def running(self) -> dict[str, dict[str, Any]]:
        """Runs still marked running, by ticket file name, with their current stage."""
        rows = self._read(
            "SELECT r.ticket, r.task_id, r.stage, r.started_at, r.claim_id,"
            " (SELECT s.started_at FROM stages s WHERE s.run_id = r.id ORDER BY s.rowid DESC"
            "  LIMIT 1) AS stage_started FROM runs r WHERE r.outcome = 'running'"
        )
        return {r["ticket"]: dict(r) for r in rows}

    def recent(self, limit: int = 10) -> list[dict[str, Any]]:
        rows = self._read(
            "SELECT ticket, task_id, title, outcome, error_code, error, branch, started_at,"
            " finished_at, duration_s, model, llm_calls, prompt_tokens, eval_tokens, quality"
            " FROM runs WHERE outcome != 'running'"
            " ORDER BY finished_at DESC, id DESC LIMIT ?",
            (limit,),
        )
        return [dict(r) for r in rows]

    def stages(self, claim_id: str) -> list[dict[str, Any]]:
        rows = self._read(
            "SELECT s.stage, s.duration_s, s.outcome FROM stages s JOIN runs r ON r.id = s.run_id"
            " WHERE r.claim_id = ? ORDER BY s.rowid",
            (claim_id,),
        )
        return [dict(r) for r in rows]

    # -- stats and the learning loop (daemon/stats.py, daemon/insights.py) --

    def set_labels(self, run_id: int, labels: Sequence[str]) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE runs SET labels = ? WHERE id = ?", (json.dumps(list(labels)), run_id)
            )

    def set_lesson_version(self, run_id: int, version: int) -> None:
        """The lesson version the builtin agent's prompt carried (0: no lessons)."""
        with self._tx() as db:
            db.execute("UPDATE runs SET lesson_version = ? WHERE id = ?", (version, run_id))

    def runs_started(self, since: str, until: str | None = None) -> list[dict[str, Any]]:
        """Runs started in ``[since, until)``, oldest first; ``labels`` and
        ``model_outcomes`` decoded (``[]`` and ``{}`` when not recorded)."""
        rows = self._read(
            "SELECT id, ticket, task_id, started_at, outcome, stage, error_code, model,"
            " duration_s, llm_calls, prompt_tokens, eval_tokens, quality, model_outcomes,"
            " labels, lesson_version FROM runs WHERE started_at >= ? AND started_at < ?"
            " ORDER BY started_at, id",
            (since, until or "9999"),
        )
        runs = [dict(r) for r in rows]
        for run in runs:
            run["labels"] = json.loads(run["labels"] or "[]")
            run["model_outcomes"] = json.loads(run["model_outcomes"] or "{}")
        return runs

    def stage_durations(self, since: str, until: str) -> list[tuple[str, float]]:
        """(stage, seconds) of every finished stage of the runs started in ``[since, until)``."""
        rows = self._read(
            "SELECT s.stage, s.duration_s FROM stages s JOIN runs r ON r.id = s.run_id"
            " WHERE r.started_at >= ? AND r.started_at < ? AND s.duration_s IS NOT NULL"
            " ORDER BY s.rowid",
            (since, until),
        )
        return [(r["stage"], float(r["duration_s"])) for r in rows]

    def add_lesson(self, at: str, text: str, codes: Sequence[str]) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO lessons (created_at, text, codes) VALUES (?, ?, ?)",
                (at, text, json.dumps(list(codes))),
            )
            return int(cur.lastrowid or 0)

    def roll_back_lesson(self, version: int, at: str, reason: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE lessons SET active = 0, rolled_back_at = ?, reason = ? WHERE version = ?",
                (at, reason, version),
            )

    def lessons(self) -> list[dict[str, Any]]:
        """Every lesson version, oldest first, ``codes`` decoded and ``active`` a bool."""
        rows = self._read("SELECT * FROM lessons ORDER BY version")
        return [
            {**dict(r), "codes": json.loads(r["codes"]), "active": bool(r["active"])} for r in rows
        ]

    def set_label_chain(
        self, label: str, models: Sequence[str], evidence: dict[str, Any], at: str
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO label_chains (label, models, evidence, updated_at)"
                " VALUES (?, ?, ?, ?)",
                (label, json.dumps(list(models)), json.dumps(evidence), at),
            )

    def label_chains(self) -> dict[str, dict[str, Any]]:
        """Learned chains by label: ``models``, ``evidence`` (decoded) and ``updated_at``."""
        rows = self._read("SELECT * FROM label_chains ORDER BY label")
        return {
            r["label"]: {
                "models": json.loads(r["models"]),
                "evidence": json.loads(r["evidence"]),
                "updated_at": r["updated_at"],
            }
            for r in rows
        }

    def log_insights(self, at: str, lines: Sequence[str]) -> None:
        with self._tx() as db:
            db.executemany(
                "INSERT INTO insight_log (at, line) VALUES (?, ?)", [(at, x) for x in lines]
            )

    def insight_log(self, limit: int = 50) -> list[dict[str, Any]]:
        """The learning loop's latest log lines, oldest first."""
        rows = self._read(
            "SELECT at, line FROM (SELECT rowid, at, line FROM insight_log"
            " ORDER BY rowid DESC LIMIT ?) ORDER BY rowid",
            (limit,),
        )
        return [dict(r) for r in rows]
