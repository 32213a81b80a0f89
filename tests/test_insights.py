"""The learning loop on a real SQLite history: chains reorder only with evidence, lessons come
from frequent failure codes, a lesson that made things worse is rolled back."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from test_stats import T0, History

from daemon import insights, pipeline, tickets
from daemon.store import Store

DAY, HOUR = timedelta(days=1), timedelta(hours=1)
EDIT_LESSON = (
    "Lessons from earlier runs in this repository:\n"
    "- Copy SEARCH lines exactly from the file, including indentation and blank lines.\n"
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state" / "history.db")
    yield s
    s.close()


def learn(store: Store, now: datetime) -> list[str]:
    return insights.apply(store, insights.analyse(store, now=now), now)


def hours(start: datetime) -> Iterator[datetime]:
    at = start
    while True:
        at += HOUR
        yield at


def tried(h: History, at: datetime, label: str, model: str, ok: bool) -> None:
    """A builtin run of a ``label`` ticket on which ``model`` alone was tried."""
    h.run(
        at,
        "done" if ok else "failed",
        model=model,
        labels=[label],
        error_code=None if ok else "AGENT_FAILED",
        outcomes={model: "ok" if ok else "failed"},
    )


def test_a_label_chain_is_reordered_only_with_enough_evidence(store: Store) -> None:
    h, at = History(store), hours(T0)
    for _ in range(5):  # outside the window: no evidence
        tried(h, T0 - 20 * DAY, "bug", "B", ok=False)
    for ok in (True, True, False, False, False, False):
        tried(h, next(at), "bug", "A", ok)
    for _ in range(4):
        tried(h, next(at), "bug", "B", ok=True)
    for _ in range(5):  # another label's evidence
        tried(h, next(at), "ui", "B", ok=False)
    now = T0 + 10 * DAY

    assert insights.analyse(store, now=now).chains == ()
    assert learn(store, now) == []
    assert insights.chain_for_label(store, "bug") is None

    tried(h, next(at), "bug", "B", ok=True)  # B's fifth try on a bug ticket

    assert learn(store, now) == ["chain for label 'bug': B 5/5, A 2/6 ok; was the configured order"]
    assert learn(store, now) == []  # nothing new
    assert insights.chain_for_label(store, "bug") == ["B", "A"]
    by_label = insights.models_by_label(store, {"bug": ["A", "X"], "ui": ["U"]})
    assert by_label == {"bug": ["B", "A", "X"], "ui": ["U"]}

    # an explicit ticket model still comes first
    text = "---\nid: task-9\ntitle: Fix\nlabels: [bug]\nmodel: Z\n---\n\nFix it.\n"
    ticket = tickets.parse_text(text, Path("task-9 - Fix.md"))
    assert pipeline.model_chain(ticket, ("A", "C"), by_label) == ["Z", "B", "A", "X", "C"]

    # the window moves on: thinner evidence keeps the learned order
    later = now + 30 * DAY
    assert learn(store, later) == []
    assert insights.chain_for_label(store, "bug") == ["B", "A"]

    # new evidence reorders it again
    at = hours(later - 5 * DAY)
    for ok in (True, False, False, False, False):
        tried(h, next(at), "bug", "B", ok)
    for _ in range(5):
        tried(h, next(at), "bug", "A", ok=True)
    assert learn(store, later) == ["chain for label 'bug': A 5/5, B 1/5 ok; was B, A"]
    assert insights.report(store)["chains"] == {
        "bug": {
            "models": ["A", "B"],
            "evidence": {
                "A": {"runs": 5, "ok": 5, "rate": 1.0},
                "B": {"runs": 5, "ok": 1, "rate": 0.2},
            },
            "updatedAt": "2025-04-10T09:00:00Z",
        }
    }


def test_a_lesson_appears_when_edit_apply_failures_dominate(store: Store) -> None:
    h, at = History(store), hours(T0)
    for code in ("EDIT_APPLY_FAILED", "CONTEXT_TOO_LARGE") * 2:
        h.run(next(at), "failed", model="A", error_code=code, lesson=0)
    h.run(next(at), "done", model="A", lesson=0)
    now = T0 + DAY

    assert learn(store, now) == []  # four failed runs: too few to tell
    assert insights.in_force(store) == (0, "")

    for code in ("EDIT_APPLY_FAILED", "CONTEXT_TOO_LARGE"):
        h.run(next(at), "failed", model="A", error_code=code, lesson=0)

    assert learn(store, now) == [
        "lesson v1 in force (EDIT_APPLY_FAILED), replacing no lessons: "
        "EDIT_APPLY_FAILED in 3 of 6 failed runs"
    ]  # CONTEXT_TOO_LARGE is as frequent, but no lesson helps it
    assert learn(store, now) == []
    assert insights.current_lessons(store) == EDIT_LESSON
    assert insights.current_version(store) == 1
    assert insights.in_force(store) == (1, EDIT_LESSON)


def rates(runs: int, done: int, rate: float) -> dict[str, float]:
    return {"runs": runs, "done": done, "rate": rate}


def lessoned(store: Store) -> History:
    """Ten runs without lessons, half failed on EDIT_APPLY_FAILED; lesson v1 at T0 + 1 day."""
    h, at = History(store), hours(T0)
    for _ in range(5):
        h.run(next(at), "done", model="A", lesson=0)
        h.run(next(at), "failed", model="A", error_code="EDIT_APPLY_FAILED", lesson=0)
    assert learn(store, T0 + DAY)[0].startswith("lesson v1 in force")
    return h


def test_a_lesson_that_made_things_worse_is_rolled_back(store: Store) -> None:
    h, at = lessoned(store), hours(T0 + DAY)
    h.run(next(at), "done", model="A", lesson=1)
    for _ in range(3):
        h.run(next(at), "failed", model="A", error_code="EDIT_APPLY_FAILED", lesson=1)

    assert learn(store, T0 + 2 * DAY) == []  # four runs with v1: too few to judge

    h.run(next(at), "failed", model="A", error_code="EDIT_APPLY_FAILED", lesson=1)

    assert learn(store, T0 + 2 * DAY) == [
        "lesson v1 rolled back: 20% of 5 runs done with v1, against 50% of 10 in the 14 days before"
    ]
    assert insights.in_force(store) == (0, "")
    # the code still dominates, but its lesson is not proposed again within the window
    assert learn(store, T0 + 2 * DAY) == []
    [v1] = store.lessons()
    assert (v1["active"], v1["rolled_back_at"]) == (False, "2025-03-03T09:00:00Z")

    # once the window has passed, fresh failures bring it back as a new version
    at = hours(T0 + 17 * DAY)
    for _ in range(5):
        h.run(next(at), "failed", model="A", error_code="EDIT_APPLY_FAILED", lesson=0)
    assert learn(store, T0 + 18 * DAY) == [
        "lesson v2 in force (EDIT_APPLY_FAILED), replacing no lessons: "
        "EDIT_APPLY_FAILED in 5 of 5 failed runs"
    ]


def test_a_lesson_that_helped_stays_and_a_worse_successor_falls_back_to_it(store: Store) -> None:
    h, at = lessoned(store), hours(T0 + DAY)
    for outcome in ("done",) * 4 + ("failed",) * 3:
        code = "CHECKS_FAILED" if outcome == "failed" else None
        h.run(next(at), outcome, model="A", error_code=code, lesson=1)

    # v1 helped (4 of 7 against 5 of 10) and stays; CHECKS_FAILED now has 3 of 8 failures
    assert learn(store, T0 + 2 * DAY) == [
        "lesson v2 in force (EDIT_APPLY_FAILED, CHECKS_FAILED), replacing v1: "
        "CHECKS_FAILED in 3 of 8 failed runs"
    ]
    assert insights.current_lessons(store).count("\n- ") == 2

    at = hours(T0 + 2 * DAY)
    for _ in range(5):
        h.run(next(at), "failed", model="A", error_code="CHECKS_FAILED", lesson=2)

    assert learn(store, T0 + 3 * DAY) == [
        "lesson v2 rolled back: 0% of 5 runs done with v2, against 53% of 17 in the 14 days before"
    ]
    assert insights.in_force(store) == (1, EDIT_LESSON)
    assert learn(store, T0 + 3 * DAY) == []

    report = insights.report(store)
    assert report["lessonVersion"] == 1
    assert [(x["version"], x["status"], x["before"], x["after"]) for x in report["lessons"]] == [
        (1, "in force", rates(10, 5, 0.5), rates(7, 4, 0.5714)),
        (2, "rolled back", rates(17, 9, 0.5294), rates(5, 0, 0.0)),
    ]
    v2 = report["lessons"][1]
    assert v2["codes"] == ["EDIT_APPLY_FAILED", "CHECKS_FAILED"]
    assert (v2["rolledBackAt"], v2["reason"]) == (
        "2025-03-04T09:00:00Z",
        "0% of 5 runs done with v2, against 53% of 17 in the 14 days before",
    )
    assert [(e["at"], e["line"][:20]) for e in report["log"]] == [
        ("2025-03-02T09:00:00Z", "lesson v1 in force ("),
        ("2025-03-03T09:00:00Z", "lesson v2 in force ("),
        ("2025-03-04T09:00:00Z", "lesson v2 rolled bac"),
    ]

    tables = insights.rows(report)
    assert list(tables) == ["Learned chains by label", "Prompt lessons", "Changes"]
    assert tables["Prompt lessons"][0] == [
        "version", "status", "codes", "created", "before", "after", "note"
    ]  # fmt: skip
    assert tables["Prompt lessons"][1] == [
        "v1", "in force", "EDIT_APPLY_FAILED", "2025-03-02T09:00:00Z", "50% of 10", "57% of 7", ""
    ]  # fmt: skip
    assert tables["Prompt lessons"][2][:2] == ["v2", "rolled back"]
    assert tables["Changes"][3] == [
        "2025-03-04T09:00:00Z",
        "lesson v2 rolled back: 0% of 5 runs done with v2, against 53% of 17 in the 14 days before",
    ]
