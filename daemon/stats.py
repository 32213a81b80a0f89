"""What ``ticketd stats`` reports: outcomes, success rates, stage durations, tokens and each
Ollama host's share over a window of the run history.

A run belongs to the window when it *started* in ``[since, until)``. Success rates count only
judged runs (done, failed, review): a requeued, interrupted or running run says nothing about
the ticket or its model. ``collect`` returns plain JSON (``--json``); ``rows`` turns it into
titled tables, header row first, for the CLI to draw. Nothing here prints.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from daemon.failures import iso
from daemon.store import Store

JUDGED = ("done", "failed", "review")


def collect(store: Store, *, since: datetime, until: datetime) -> dict[str, Any]:
    runs = store.runs_started(iso(since), iso(until))
    judged = [r for r in runs if r["outcome"] in JUDGED]
    outcomes = Counter(r["outcome"] for r in runs)
    by_stage: dict[str, list[float]] = {}
    for stage, seconds in store.stage_durations(iso(since), iso(until)):
        by_stage.setdefault(stage, []).append(seconds)
    tokens = [(r["prompt_tokens"] or 0) + (r["eval_tokens"] or 0) for r in runs if r["llm_calls"]]
    done_scored = [r for r in runs if r["outcome"] == "done" and r["quality"] is not None]
    with_outcomes = [r for r in runs if r["model_outcomes"]]
    return {
        "window": {"since": iso(since), "until": iso(until)},
        "runs": len(runs),
        "outcomes": dict(sorted(outcomes.items())),
        "successRate": rate(outcomes["done"], len(judged)),
        "byModel": model_success(judged),
        "byLabel": _by_label(judged),
        "byErrorCode": dict(
            sorted(
                Counter(r["error_code"] for r in runs if r["error_code"]).items(),
                key=lambda item: (-item[1], item[0]),
            )
        ),
        "stages": {
            stage: {
                "count": len(values),
                "p50": _round(percentile(values, 0.5)),
                "p95": _round(percentile(values, 0.95)),
            }
            for stage, values in by_stage.items()
        },
        "tokens": {
            "runs": len(tokens),
            "mean": _round(sum(tokens) / len(tokens)) if tokens else None,
            "p50": _round(percentile(tokens, 0.5)),
            "p95": _round(percentile(tokens, 0.95)),
        },
        "firstTry": _share(sum(r["quality"] == 1.0 for r in done_scored), len(done_scored)),
        "escalation": _share(
            sum(len(r["model_outcomes"]) > 1 for r in with_outcomes), len(with_outcomes)
        ),
        "pullRequests": _pulls(store, since, until),
        "byHost": {
            h["host"]: {
                "runs": h["runs"],
                "done": h["done"],
                "calls": h["calls"],
                "failedCalls": h["failed"],
                "tokens": h["prompt_tokens"] + h["eval_tokens"],
                "evalTokensPerS": _round(h["eval_tokens"] / h["seconds"]) if h["seconds"] else None,
            }
            for h in store.calls_by_host(iso(since), iso(until))
        },
    }


def _pulls(store: Store, since: datetime, until: datetime) -> dict[str, Any]:
    """Pull requests opened in the window: how they ended, revisions, hours to merge."""
    opened = [p for p in store.pulls() if iso(since) <= p["opened_at"] < iso(until)]
    hours = [
        (
            datetime.fromisoformat(p["finished_at"]) - datetime.fromisoformat(p["opened_at"])
        ).total_seconds()
        / 3600
        for p in opened
        if p["state"] == "merged" and p["finished_at"]
    ]
    states = Counter(p["state"] for p in opened)
    return {
        "opened": len(opened),
        "open": states["open"],
        "merged": states["merged"],
        "closed": states["closed"],
        "revisions": sum(p["revisions"] for p in opened),
        "hoursToMerge": {
            "p50": _round(percentile(hours, 0.5)),
            "p95": _round(percentile(hours, 0.95)),
        },
    }


def model_results(run: Mapping[str, Any]) -> dict[str, bool]:
    """Each model tried on this run and whether it succeeded.

    The builtin agent records each model's outcome: ``ok`` (its edits passed the checks) and
    ``failed`` count, ``not_found`` says nothing about the model. A run without per-model
    outcomes (the command agent) counts for its recorded model: done or not.
    """
    outcomes: Mapping[str, str] = run["model_outcomes"]
    if outcomes:
        return {m: o == "ok" for m, o in outcomes.items() if o in ("ok", "failed")}
    return {run["model"]: run["outcome"] == "done"} if run["model"] else {}


def model_success(runs: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{model: {runs, ok, rate}}`` over the models tried on ``runs`` (see ``model_results``),
    best first: by rate, then by tries, then by name."""
    tried: Counter[str] = Counter()
    ok: Counter[str] = Counter()
    for run in runs:
        for model, succeeded in model_results(run).items():
            tried[model] += 1
            ok[model] += succeeded
    best = sorted(tried, key=lambda m: (-ok[m] / tried[m], -tried[m], m))
    return {m: {"runs": tried[m], "ok": ok[m], "rate": rate(ok[m], tried[m])} for m in best}


def rate(part: int, whole: int) -> float | None:
    """``part / whole`` to four places; None for no data."""
    return round(part / whole, 4) if whole else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1), interpolating linearly between the closest ranks (numpy's
    default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _by_label(judged: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    runs: Counter[str] = Counter()
    done: Counter[str] = Counter()
    for run in judged:
        for label in run["labels"]:
            runs[label] += 1
            done[label] += run["outcome"] == "done"
    return {
        label: {"runs": n, "done": done[label], "rate": rate(done[label], n)}
        for label, n in sorted(runs.items())
    }


def _share(count: int, runs: int) -> dict[str, Any]:
    return {"runs": runs, "count": count, "rate": rate(count, runs)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def rows(report: Mapping[str, Any]) -> dict[str, list[list[str]]]:
    """The report as tables: title -> rows, the header row first; every cell a string."""
    w = report["window"]
    outcomes = report["outcomes"]
    tables: dict[str, list[list[str]]] = {
        f"Runs {w['since']} .. {w['until']}": [
            ["outcome", "runs"],
            *([o, str(n)] for o, n in outcomes.items()),
            ["total", str(report["runs"])],
            ["success rate", _pct(report["successRate"])],
        ],
        "Success by model (each model tried)": [
            ["model", "tried", "ok", "success"],
            *(
                [m, str(v["runs"]), str(v["ok"]), _pct(v["rate"])]
                for m, v in report["byModel"].items()
            ),
        ],
        "Success by label": [
            ["label", "runs", "done", "success"],
            *(
                [label, str(v["runs"]), str(v["done"]), _pct(v["rate"])]
                for label, v in report["byLabel"].items()
            ),
        ],
        "Error codes": [
            ["code", "runs"],
            *([code, str(n)] for code, n in report["byErrorCode"].items()),
        ],
        "Stage durations (s)": [
            ["stage", "count", "p50", "p95"],
            *(
                [s, str(v["count"]), _num(v["p50"]), _num(v["p95"])]
                for s, v in report["stages"].items()
            ),
        ],
    }
    t, first, esc = report["tokens"], report["firstTry"], report["escalation"]
    tables["Tokens and rates"] = [
        ["measure", "runs", "value"],
        ["tokens per run, mean", str(t["runs"]), _num(t["mean"])],
        ["tokens per run, p50", str(t["runs"]), _num(t["p50"])],
        ["tokens per run, p95", str(t["runs"]), _num(t["p95"])],
        ["first try (done runs)", str(first["runs"]), _pct(first["rate"])],
        ["escalated to another model", str(esc["runs"]), _pct(esc["rate"])],
    ]
    pr = report["pullRequests"]
    tables["Pull requests"] = [
        ["measure", "value"],
        *([name, str(pr[name])] for name in ("opened", "open", "merged", "closed", "revisions")),
        ["hours to merge, p50", _num(pr["hoursToMerge"]["p50"])],
        ["hours to merge, p95", _num(pr["hoursToMerge"]["p95"])],
    ]
    tables["Ollama hosts"] = [
        ["host", "runs", "done", "calls", "failed calls", "tokens", "eval tokens/s"],
        *(
            [
                host,
                str(v["runs"]),
                str(v["done"]),
                str(v["calls"]),
                str(v["failedCalls"]),
                str(v["tokens"]),
                _num(v["evalTokensPerS"]),
            ]
            for host, v in report["byHost"].items()
        ),
    ]
    return tables


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}".rstrip("0").rstrip(".")
