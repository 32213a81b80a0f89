"""The learning loop: what the run history teaches, applied only with evidence, undone when it
does not help.

Two things are learned from the runs that started in the last ``window_days``:

* **A chain per label.** The models tried on a label's tickets, ordered by observed success
  (``stats.model_results``: a model's try succeeds when its edits pass the checks), once at
  least two models have ``min_runs`` tries each. Only those models are ordered; the learned
  order stays until new evidence reorders it (the models it demotes are tried less, so a
  rolling window would otherwise forget them and flip the order back). ``models_by_label``
  merges it over the configured ``ollama.models_by_label``. An explicit ticket
  ``model``/``models`` always wins: ``pipeline.model_chain`` puts the ticket's own models
  before any label's, and callers must pass the learned mapping only as ``by_label``.
* **Prompt lessons.** A failure code that has a lesson in ``LESSONS`` and more than
  ``threshold`` of the window's failed runs (at least ``min_runs`` of them) joins the lessons.
  Each change of the set is a new *version*, whose text is the whole block appended to the
  builtin agent's system prompt; runs record the version they ran with
  (``Store.set_lesson_version``, 0 for none). A version whose judged runs succeed less than
  the judged runs of the ``window_days`` before it, by more than ``margin``, once both sides
  have ``min_runs`` runs, is rolled back: the newest version still active is in force again,
  and the codes only the rolled-back version taught are not proposed for ``window_days``.

``analyse`` reads and decides; ``apply`` writes the decisions (idempotently) and returns the
log lines it also keeps in the history; ``report`` is what ``ticketd insights`` shows and
``rows`` its tables. Everything is a function of the history and ``now``: no clock, no
threads, no output.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from daemon.failures import iso
from daemon.stats import JUDGED, model_success, rate
from daemon.store import Store

# code -> the lesson it teaches. Codes the model cannot help (CONTEXT_TOO_LARGE, outages,
# git and forge failures) have none. The order is the order in the prompt.
LESSONS: dict[str, str] = {
    "EDIT_APPLY_FAILED": (
        "Copy SEARCH lines exactly from the file, including indentation and blank lines."
    ),
    "EDIT_PARSE_FAILED": (
        "Give every change as a complete block: the file path on its own line, the opening "
        "fence, <<<<<<< SEARCH, =======, >>>>>>> REPLACE, then the closing fence."
    ),
    "CHECKS_FAILED": (
        "Run through the checks mentally before answering: imports, names, signatures, types "
        "and the tests that cover the code you change."
    ),
    "NO_CHANGES": (
        "Always change the files with SEARCH/REPLACE blocks; describing a change does not make it."
    ),
}
LESSONS_HEADER = "Lessons from earlier runs in this repository:"


@dataclass(frozen=True)
class Evidence:
    """A model's tries on a label's tickets in the window."""

    model: str
    runs: int
    ok: int

    @property
    def rate(self) -> float:
        return self.ok / self.runs

    def describe(self) -> str:
        return f"{self.model} {self.ok}/{self.runs}"


@dataclass(frozen=True)
class Chain:
    """The models of a label with enough evidence, best first."""

    label: str
    evidence: tuple[Evidence, ...]

    @property
    def models(self) -> list[str]:
        return [e.model for e in self.evidence]

    def as_json(self) -> dict[str, Any]:
        return {
            e.model: {"runs": e.runs, "ok": e.ok, "rate": rate(e.ok, e.runs)} for e in self.evidence
        }


@dataclass(frozen=True)
class Rates:
    """Judged runs and how many of them were done."""

    runs: int
    done: int

    @property
    def rate(self) -> float | None:
        return rate(self.done, self.runs)

    def as_json(self) -> dict[str, Any]:
        return {"runs": self.runs, "done": self.done, "rate": self.rate}


@dataclass(frozen=True)
class Check:
    """A lesson version's runs against the runs before it."""

    version: int
    before: Rates
    after: Rates
    worse: bool  # roll it back
    reason: str


@dataclass(frozen=True)
class Analysis:
    now: datetime
    window_days: int
    chains: tuple[Chain, ...]
    failed_runs: int  # failed runs in the window
    failures: Mapping[str, int]  # error code -> failed runs in the window
    checks: tuple[Check, ...]  # one per active lesson version
    lesson_codes: tuple[str, ...]  # the lesson set wanted once the rollbacks are done

    @property
    def rollbacks(self) -> list[Check]:
        return [c for c in self.checks if c.worse]


def analyse(
    store: Store,
    *,
    now: datetime,
    window_days: int = 14,
    min_runs: int = 5,
    threshold: float = 0.3,
    margin: float = 0.1,
) -> Analysis:
    window = timedelta(days=window_days)
    since = iso(now - window)
    runs = store.runs_started(since, iso(now))
    judged = [r for r in runs if r["outcome"] in JUDGED]

    chains = []
    for label in sorted({label for r in judged for label in r["labels"]}):
        tried = model_success(r for r in judged if label in r["labels"])
        evidence = tuple(
            Evidence(m, v["runs"], v["ok"]) for m, v in tried.items() if v["runs"] >= min_runs
        )
        if len(evidence) >= 2:
            chains.append(Chain(label, evidence))

    failed = [r for r in runs if r["outcome"] == "failed"]
    failures = Counter(r["error_code"] for r in failed if r["error_code"])

    lessons = store.lessons()
    checks = tuple(
        _check(store, lesson, window, min_runs, margin, until=iso(now))
        for lesson in lessons
        if lesson["active"]
    )
    rolled = {c.version for c in checks if c.worse}
    still = [x for x in lessons if x["active"] and x["version"] not in rolled]
    current = set(still[-1]["codes"]) if still else set()
    blocked = {
        code
        for x in lessons
        if x["version"] in rolled or (not x["active"] and x["rolled_back_at"] >= since)
        for code in x["codes"]
    } - current
    frequent = {
        code
        for code, n in failures.items()
        if len(failed) >= min_runs and n / len(failed) > threshold
    }
    wanted = tuple(c for c in LESSONS if c in current or (c in frequent and c not in blocked))
    return Analysis(now, window_days, tuple(chains), len(failed), failures, checks, wanted)


def apply(store: Store, analysis: Analysis, now: datetime) -> list[str]:
    """Write what ``analysis`` decided; the log lines of what changed (also kept in the
    history). Applying the same analysis twice changes nothing the second time."""
    at = iso(now)
    log: list[str] = []
    active = {x["version"] for x in store.lessons() if x["active"]}
    for check in analysis.rollbacks:
        if check.version in active:
            store.roll_back_lesson(check.version, at, check.reason)
            log.append(f"lesson v{check.version} rolled back: {check.reason}")
    lesson = _latest_active(store)
    version, codes = (lesson["version"], lesson["codes"]) if lesson else (0, [])
    if analysis.lesson_codes and list(analysis.lesson_codes) != codes:
        text = lesson_text(analysis.lesson_codes)
        new = store.add_lesson(at, text, analysis.lesson_codes)
        why = [
            f"{c} in {analysis.failures.get(c, 0)} of {analysis.failed_runs} failed runs"
            for c in analysis.lesson_codes
            if c not in codes
        ]
        replaced = f"v{version}" if version else "no lessons"
        log.append(
            f"lesson v{new} in force ({', '.join(analysis.lesson_codes)}), replacing {replaced}: "
            f"{'; '.join(why) or 'the lesson table changed'}"
        )
    stored = store.label_chains()
    for chain in analysis.chains:
        before = stored.get(chain.label, {}).get("models")
        store.set_label_chain(chain.label, chain.models, chain.as_json(), at)
        if before != chain.models:
            was = ", ".join(before) if before else "the configured order"
            log.append(
                f"chain for label {chain.label!r}: "
                f"{', '.join(e.describe() for e in chain.evidence)} ok; was {was}"
            )
    if log:
        store.log_insights(at, log)
    return log


def lesson_text(codes: Sequence[str]) -> str:
    """The block for these codes, to append after a blank line to the system prompt."""
    return LESSONS_HEADER + "\n" + "".join(f"- {LESSONS[c]}\n" for c in codes if c in LESSONS)


def in_force(store: Store) -> tuple[int, str]:
    """The lesson version in force and its text; ``(0, "")`` when there are none. Read both
    at once when starting a run: the text goes into the prompt, the version into
    ``Store.set_lesson_version``."""
    lesson = _latest_active(store)
    return (lesson["version"], lesson["text"]) if lesson else (0, "")


def current_lessons(store: Store) -> str:
    """The text to append to the builtin agent's system prompt; empty when none."""
    return in_force(store)[1]


def current_version(store: Store) -> int:
    return in_force(store)[0]


def chain_for_label(store: Store, label: str) -> list[str] | None:
    """The label's learned order, best first (only models with evidence); None if none."""
    chain = store.label_chains().get(label)
    return list(chain["models"]) if chain else None


def models_by_label(store: Store, configured: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """``configured`` (``ollama.models_by_label``) with each learned order in front of the
    label's configured models; pass it as ``pipeline.model_chain``'s ``by_label``."""
    learned = {label: c["models"] for label, c in store.label_chains().items()}
    return {
        label: list(dict.fromkeys([*learned.get(label, ()), *configured.get(label, ())]))
        for label in sorted({*configured, *learned})
    }


def report(store: Store, *, window_days: int = 14, limit: int = 50) -> dict[str, Any]:
    """What ``ticketd insights`` shows: the learned chains with their evidence, each lesson
    version with its status and success before and after, and the latest changes."""
    version, _ = in_force(store)
    lessons = []
    for x in store.lessons():
        check = _check(store, x, timedelta(days=window_days), 0, 0.0, until=None)
        if not x["active"]:
            status = "rolled back"
        else:
            status = "in force" if x["version"] == version else "superseded"
        lessons.append(
            {
                "version": x["version"],
                "status": status,
                "createdAt": x["created_at"],
                "codes": x["codes"],
                "text": x["text"],
                "before": check.before.as_json(),
                "after": check.after.as_json(),
                "rolledBackAt": x["rolled_back_at"],
                "reason": x["reason"],
            }
        )
    return {
        "chains": {
            label: {"models": c["models"], "evidence": c["evidence"], "updatedAt": c["updated_at"]}
            for label, c in store.label_chains().items()
        },
        "lessonVersion": version,
        "lessons": lessons,
        "log": store.insight_log(limit),
    }


def rows(report: Mapping[str, Any]) -> dict[str, list[list[str]]]:
    """The report as tables: title -> rows, the header row first; every cell a string."""
    chains = [["label", "order", "evidence (ok/tried)", "updated"]]
    for label, c in report["chains"].items():
        evidence = ", ".join(f"{m} {e['ok']}/{e['runs']}" for m, e in c["evidence"].items())
        chains.append([label, " > ".join(c["models"]), evidence, c["updatedAt"]])
    lessons = [["version", "status", "codes", "created", "before", "after", "note"]]
    for x in report["lessons"]:
        lessons.append(
            [
                f"v{x['version']}",
                x["status"],
                ", ".join(x["codes"]),
                x["createdAt"],
                _rates(x["before"]),
                _rates(x["after"]),
                f"{x['rolledBackAt']}: {x['reason']}" if x["rolledBackAt"] else "",
            ]
        )
    changes = [["at", "change"], *([e["at"], e["line"]] for e in report["log"])]
    return {"Learned chains by label": chains, "Prompt lessons": lessons, "Changes": changes}


def _rates(r: Mapping[str, Any]) -> str:
    return "-" if r["rate"] is None else f"{r['rate']:.0%} of {r['runs']}"


def _tally(runs: Iterable[Mapping[str, Any]]) -> Rates:
    judged = [r["outcome"] for r in runs if r["outcome"] in JUDGED]
    return Rates(len(judged), judged.count("done"))


def _latest_active(store: Store) -> dict[str, Any] | None:
    active = [x for x in store.lessons() if x["active"]]
    return active[-1] if active else None


def _check(
    store: Store,
    lesson: Mapping[str, Any],
    window: timedelta,
    min_runs: int,
    margin: float,
    *,
    until: str | None,
) -> Check:
    """Judged runs with this version against those started in the window before it."""
    version, created = lesson["version"], lesson["created_at"]
    start = iso(datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ") - window)
    before = _tally(store.runs_started(start, created))
    after = _tally(r for r in store.runs_started(created, until) if r["lesson_version"] == version)
    if min(before.runs, after.runs) < max(min_runs, 1):
        return Check(version, before, after, False, "too few runs to compare")
    assert before.rate is not None and after.rate is not None
    worse = after.rate < before.rate - margin
    return Check(
        version,
        before,
        after,
        worse,
        f"{after.rate:.0%} of {after.runs} runs done with v{version}, against "
        f"{before.rate:.0%} of {before.runs} in the {window.days} days before",
    )
