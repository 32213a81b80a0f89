"""``ticketd stats``: exact numbers from a hand-built history in a real SQLite store."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from daemon import stats
from daemon.failures import iso
from daemon.llm.client import Call
from daemon.store import Store

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


class History:
    """Writes runs through the Store's own methods, the way the runner does, at given times."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.ids = itertools.count(1)

    def run(
        self,
        at: datetime,
        outcome: str,
        *,
        model: str | None = None,
        labels: Sequence[str] = (),
        error_code: str | None = None,
        stages: Sequence[tuple[str, float | None]] = (),
        calls: Sequence[Call] = (),
        quality: float | None = None,
        outcomes: dict[str, str] | None = None,
        lesson: int | None = None,
        host: str | None = None,
    ) -> int:
        n = next(self.ids)
        run_id = self.store.start_run(
            f"claim-{n}", f"task-{n} - T.md", f"task-{n}", "T", iso(at), {}
        )
        self.store.set_labels(run_id, labels)
        if host is not None:
            self.store.set_host(run_id, host)
        if lesson is not None:
            self.store.set_lesson_version(run_id, lesson)
        for stage, seconds in stages:
            self.store.start_stage(run_id, stage, iso(at))
            if seconds is not None:
                self.store.end_stage(run_id, stage, seconds, "ok")
        if calls or outcomes is not None:
            self.store.record_calls(run_id, calls, quality=quality, outcomes=outcomes or {})
        if outcome != "running":
            self.store.finish_run(
                run_id,
                iso(at + timedelta(minutes=1)),
                outcome,
                60.0,
                error_code=error_code,
                model=model,
            )
        return run_id


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state" / "history.db")
    yield s
    s.close()


A, B = "http://gpu-a:11434", "http://gpu-b:11434"  # Ollama hosts


def call(model: str, prompt: int, evals: int, host: str = A, outcome: str = "ok") -> Call:
    return Call(model, prompt, evals, 1.0, outcome, host)


def build(store: Store) -> None:
    h = History(store)
    at = (T0 + timedelta(hours=i) for i in itertools.count())
    h.run(T0 - timedelta(days=1), "done", model="A", labels=["bug"])  # before the window
    h.run(
        next(at), "done", model="A", labels=["bug"],
        stages=[("worktree", 1), ("agent", 10), ("push", 2)],
        calls=[call("A", 1000, 200)], quality=1.0, outcomes={"A": "ok"}, host=A,
    )  # fmt: skip
    h.run(  # host A failed it at first: the run moved to B
        next(at), "done", model="B", labels=["bug", "ui"],
        stages=[("worktree", 2), ("agent", 30)],
        calls=[call("A", 0, 0, A, "unavailable"), call("A", 1500, 300, B), call("B", 1200, 100, B)],
        quality=0.75, outcomes={"A": "failed", "B": "ok"}, host=B,
    )  # fmt: skip
    h.run(
        next(at), "failed", model="A", labels=["ui"], error_code="EDIT_APPLY_FAILED",
        stages=[("worktree", 3), ("agent", 20)],
        calls=[call("A", 800, 100)], quality=0.0, outcomes={"A": "failed"}, host=A,
    )  # fmt: skip
    h.run(
        next(at), "review", model="A", error_code="SECRET_DETECTED",
        calls=[call("A", 500, 100)], quality=1.0, outcomes={"A": "ok"}, host=A,
    )  # fmt: skip
    h.run(next(at), "requeued", labels=["bug"], error_code="OLLAMA_UNAVAILABLE")
    h.run(next(at), "running", labels=["bug"], stages=[("agent", None)])
    h.run(next(at), "done", model="C", labels=["docs"], stages=[("agent", 5)])  # command agent
    h.run(T0 + timedelta(days=7), "failed", model="A", error_code="CHECKS_FAILED")  # after it
    # pull requests: two merged (after 2 h and 4 h), one closed, one open, one before the window
    for number, opened, state, hours in [
        (1, 1, "merged", 2), (2, 2, "merged", 4), (3, 3, "closed", 1), (4, 4, "open", 0),
        (5, -24, "merged", 1),
    ]:  # fmt: skip
        at = T0 + timedelta(hours=opened)
        store.pull_opened(number, f"task-{number} - T.md", f"task-{number}", f"u/{number}", iso(at))
        if state != "open":
            store.pull_finished(number, state, iso(at + timedelta(hours=hours)))
    revision = h.run(T0 + timedelta(hours=5), "done")  # a revision of #1 (a command agent)
    store.mark_revision(revision, 1)


def test_collect_reports_exact_numbers_over_the_window(store: Store) -> None:
    build(store)

    report = stats.collect(store, since=T0, until=T0 + timedelta(days=7))

    assert report == {
        "window": {"since": "2025-03-01T09:00:00Z", "until": "2025-03-08T09:00:00Z"},
        "runs": 8,
        "outcomes": {"done": 4, "failed": 1, "requeued": 1, "review": 1, "running": 1},
        "successRate": 0.6667,
        "byModel": {
            "B": {"runs": 1, "ok": 1, "rate": 1.0},
            "C": {"runs": 1, "ok": 1, "rate": 1.0},
            "A": {"runs": 4, "ok": 2, "rate": 0.5},
        },
        "byLabel": {
            "bug": {"runs": 2, "done": 2, "rate": 1.0},
            "docs": {"runs": 1, "done": 1, "rate": 1.0},
            "ui": {"runs": 2, "done": 1, "rate": 0.5},
        },
        "byErrorCode": {"EDIT_APPLY_FAILED": 1, "OLLAMA_UNAVAILABLE": 1, "SECRET_DETECTED": 1},
        "stages": {
            "worktree": {"count": 3, "p50": 2.0, "p95": 2.9},
            "agent": {"count": 4, "p50": 15.0, "p95": 28.5},
            "push": {"count": 1, "p50": 2.0, "p95": 2.0},
        },
        "tokens": {"runs": 4, "mean": 1450.0, "p50": 1050.0, "p95": 2815.0},
        "firstTry": {"runs": 2, "count": 1, "rate": 0.5},
        "escalation": {"runs": 4, "count": 1, "rate": 0.25},
        "pullRequests": {
            "opened": 4,
            "open": 1,
            "merged": 2,
            "closed": 1,
            "revisions": 1,
            "hoursToMerge": {"p50": 3.0, "p95": 3.9},
        },
        "byHost": {
            A: {
                "runs": 4,
                "done": 1,
                "calls": 4,
                "failedCalls": 1,
                "tokens": 2700,
                "evalTokensPerS": 100.0,
            },
            B: {
                "runs": 1,
                "done": 1,
                "calls": 2,
                "failedCalls": 0,
                "tokens": 3100,
                "evalTokensPerS": 200.0,
            },
        },
    }
    assert json.loads(json.dumps(report)) == report


def test_rows_give_titled_tables_with_a_header_first(store: Store) -> None:
    build(store)

    tables = stats.rows(stats.collect(store, since=T0, until=T0 + timedelta(days=7)))

    assert list(tables) == [
        "Runs 2025-03-01T09:00:00Z .. 2025-03-08T09:00:00Z",
        "Success by model (each model tried)",
        "Success by label",
        "Error codes",
        "Stage durations (s)",
        "Tokens and rates",
        "Pull requests",
        "Ollama hosts",
    ]
    assert tables["Ollama hosts"] == [
        ["host", "runs", "done", "calls", "failed calls", "tokens", "eval tokens/s"],
        [A, "4", "1", "4", "1", "2700", "100"],
        [B, "1", "1", "2", "0", "3100", "200"],
    ]
    assert tables["Success by model (each model tried)"] == [
        ["model", "tried", "ok", "success"],
        ["B", "1", "1", "100.0%"],
        ["C", "1", "1", "100.0%"],
        ["A", "4", "2", "50.0%"],
    ]
    assert tables["Stage durations (s)"][2] == ["agent", "4", "15", "28.5"]
    assert tables["Tokens and rates"][1:3] == [
        ["tokens per run, mean", "4", "1,450"],
        ["tokens per run, p50", "4", "1,050"],
    ]
    assert all(isinstance(cell, str) for t in tables.values() for row in t for cell in row)


def test_an_empty_window_has_no_rates(store: Store) -> None:
    report = stats.collect(store, since=T0, until=T0 + timedelta(days=1))

    assert report["runs"] == 0 and report["successRate"] is None
    assert report["tokens"] == {"runs": 0, "mean": None, "p50": None, "p95": None}
    assert report["firstTry"] == {"runs": 0, "count": 0, "rate": None}
    tables = stats.rows(report)
    assert tables["Tokens and rates"][1] == ["tokens per run, mean", "0", "-"]
    assert tables["Error codes"] == [["code", "runs"]]


def test_labels_and_lesson_version_survive_reopening_the_store(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    s = Store(path)
    run_id = s.start_run("c", "t.md", "t", "T", iso(T0), {})
    s.set_labels(run_id, ["bug", "ui"])
    s.set_lesson_version(run_id, 3)
    s.close()

    s = Store(path)
    [run] = s.runs_started(iso(T0))
    s.close()
    assert (run["labels"], run["lesson_version"], run["model_outcomes"]) == (["bug", "ui"], 3, {})
