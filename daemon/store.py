"""Run history in SQLite (WAL): runs, their stages, their outcomes; the ``Store`` and its queries.

The history explains what happened; it is never needed to know where a ticket is (the
folders say that). Writers are the daemon's worker threads, serialised by a lock; readers
(``ticketd status``) open their own connection.

The file itself (its schema, checking it, moving a corrupt or unreadable one aside and
starting afresh, ``HistoryUnavailable``) is ``daemon/historyfile.py``'s: ``Store(path)``
opens it there, and ``Store.recovered_from`` says where an unusable old file went.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.historyfile import open_history, transaction

if TYPE_CHECKING:
    from daemon.llm.client import Call


_HISTORY = (
    "SELECT ticket, MAX(outcome IN ('failed', 'interrupted', 'review')) AS retried"
    " FROM runs WHERE ticket IN ({}) GROUP BY ticket"
)


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        # recovered_from: where an unusable history was moved before a fresh one was
        # started, else None.
        self._db, self.recovered_from = open_history(path)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock, transaction(self._db) as db:
            yield db

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
        self,
        run_id: int,
        calls: Sequence[Call],
        *,
        quality: float | None,
        outcomes: dict[str, str],
        edit_format: str | None = None,
    ) -> None:
        """Each LLM request of a run, its totals, each model's outcome, the quality score and
        (builtin) the edit format of the answer that passed."""
        with self._tx() as db:
            db.executemany(
                "INSERT INTO llm_calls (run_id, model, prompt_tokens, eval_tokens, duration_s,"
                " outcome, host) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        run_id,
                        c.model,
                        c.prompt_tokens,
                        c.eval_tokens,
                        c.duration_s,
                        c.outcome,
                        c.host or None,
                    )
                    for c in calls
                ],
            )
            db.execute(
                "UPDATE runs SET llm_calls = ?, prompt_tokens = ?, eval_tokens = ?, quality = ?,"
                " model_outcomes = ?, edit_format = ? WHERE id = ?",
                (
                    len(calls),
                    sum(c.prompt_tokens for c in calls),
                    sum(c.eval_tokens for c in calls),
                    quality,
                    json.dumps(outcomes),
                    edit_format or None,
                    run_id,
                ),
            )

    def edit_formats(self, recent: int = 10, window: int = 200) -> dict[str, str]:
        """Per model, the edit format most of its last ``recent`` passing answers were in
        (the latest wins a tie), among the last ``window`` of all models: asked at every
        run's start, it reads a bounded tail of the history, however long that grows."""
        rows = self._read(
            "SELECT model, edit_format FROM runs WHERE edit_format IS NOT NULL AND model IS NOT"
            " NULL ORDER BY id DESC LIMIT ?",
            (window,),
        )
        seen: dict[str, list[str]] = {}
        for row in rows:
            kept = seen.setdefault(row["model"], [])
            if len(kept) < recent:
                kept.append(row["edit_format"])
        return {model: max(kept, key=kept.count) for model, kept in seen.items()}

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

    def runs_of(self, ticket: str, limit: int = 50) -> list[dict[str, Any]]:
        """The latest ``limit`` runs of this ticket file, oldest first (the dashboard)."""
        rows = self._read(
            "SELECT * FROM (SELECT id, started_at, outcome, stage, error_code, error, model,"
            " host, duration_s, branch, llm_calls, prompt_tokens, eval_tokens FROM runs"
            " WHERE ticket = ? ORDER BY id DESC LIMIT ?) ORDER BY id",
            (ticket, limit),
        )
        return [dict(r) for r in rows]

    def history(self, tickets: Sequence[str]) -> dict[str, bool]:
        """Which of these ticket files have run before, each with whether a run was
        unsuccessful (duplicate detection is for new tickets; retries queue behind fresh
        ones). Reads their runs alone, however long the history."""
        found: dict[str, bool] = {}
        for i in range(0, len(tickets), 500):
            chunk = tickets[i : i + 500]
            marks = ", ".join("?" * len(chunk))  # placeholders: the names are parameters
            rows = self._read(_HISTORY.format(marks), chunk)
            found.update((r["ticket"], bool(r["retried"])) for r in rows)
        return found

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

    # -- pull requests (daemon/pulls.py) --

    def pull_opened(self, number: int, ticket: str, task_id: str, url: str, at: str) -> None:
        """A pull request ticketd opened (again: the first opening time is kept)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO pulls (number, ticket, task_id, url, opened_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (number) DO UPDATE SET state = 'open', finished_at = NULL",
                (number, ticket, task_id, url, at),
            )

    def pull_finished(self, number: int, state: str, at: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE pulls SET state = ?, finished_at = ? WHERE number = ?", (state, at, number)
            )

    def mark_revision(self, run_id: int, number: int) -> None:
        """This run revises pull request ``number``."""
        with self._tx() as db:
            db.execute("UPDATE runs SET revision = ? WHERE id = ?", (number, run_id))
            db.execute("UPDATE pulls SET revisions = revisions + 1 WHERE number = ?", (number,))

    def revisions_of(self, number: int) -> int:
        """Revision runs of pull request ``number`` that finished (not cut off by an outage
        or a stop)."""
        rows = self._read(
            "SELECT COUNT(*) AS n FROM runs WHERE revision = ? AND outcome IN ('done', 'failed')",
            (number,),
        )
        return int(rows[0]["n"])

    def revisions_since(self, at: str) -> int:
        rows = self._read(
            "SELECT COUNT(*) AS n FROM runs WHERE revision IS NOT NULL AND started_at >= ?", (at,)
        )
        return int(rows[0]["n"])

    def pulls(self) -> list[dict[str, Any]]:
        """Every pull request ticketd opened, newest first."""
        rows = self._read(
            "SELECT number, ticket, task_id, url, opened_at, state, finished_at, revisions"
            " FROM pulls ORDER BY opened_at DESC, number DESC"
        )
        return [dict(r) for r in rows]

    # -- stats and the learning loop (daemon/stats.py, daemon/insights.py) --

    def set_labels(self, run_id: int, labels: Sequence[str]) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE runs SET labels = ? WHERE id = ?", (json.dumps(list(labels)), run_id)
            )

    def set_host(self, run_id: int, host: str) -> None:
        """The Ollama host the run is pinned to."""
        with self._tx() as db:
            db.execute("UPDATE runs SET host = ? WHERE id = ?", (host, run_id))

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

    def calls_by_host(self, since: str, until: str) -> list[dict[str, Any]]:
        """Per Ollama host, over the runs started in ``[since, until)``: its requests, those
        that failed, their tokens and seconds, and the runs that ended on it and were done."""
        rows = self._read(
            "SELECT c.host, COUNT(*) AS calls,"
            " SUM(c.outcome NOT IN ('ok', 'truncated')) AS failed,"
            " SUM(c.prompt_tokens) AS prompt_tokens, SUM(c.eval_tokens) AS eval_tokens,"
            " SUM(c.duration_s) AS seconds,"
            " COUNT(DISTINCT c.run_id) AS runs,"
            " COUNT(DISTINCT CASE WHEN r.outcome = 'done' AND r.host = c.host THEN r.id END)"
            " AS done"
            " FROM llm_calls c JOIN runs r ON r.id = c.run_id"
            " WHERE r.started_at >= ? AND r.started_at < ? AND c.host IS NOT NULL"
            " GROUP BY c.host ORDER BY c.host",
            (since, until),
        )
        return [dict(r) for r in rows]

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
