"""LLM code review of a change: the diff, the ticket and its acceptance criteria go to
``ollama.review_model``, which answers JSON constrained by a schema (Ollama's ``format``).

A diff too large for the context is reviewed file by file within the budget and the
answers are merged. An answer that is not valid JSON for the schema is asked for once more,
then handled per ``review.on_error``. The severity policy decides whether the change is
blocked: CRITICAL issues block with ``block_on_critical``; ``strictness: high`` blocks on
HIGH issues too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from daemon.errors import TicketdError
from daemon.llm.client import Call, estimate_tokens
from daemon.llm.pool import Route
from daemon.runctx import RunContext

SEVERITIES = ("CRITICAL", "HIGH", "MEDIUM", "LOW")
CATEGORIES = ("security", "bugs", "performance", "style")
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "verdict": {"type": "string", "enum": ["approve", "request_changes"]},
        "summary": {"type": "string"},
        "issues": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "severity": {"type": "string", "enum": list(SEVERITIES)},
                    "category": {"type": "string", "enum": list(CATEGORIES)},
                    "file": {"type": "string"},
                    "line": {"type": "integer"},
                    "description": {"type": "string"},
                },
                "required": ["severity", "category", "file", "line", "description"],
            },
        },
    },
    "required": ["verdict", "summary", "issues"],
}

SYSTEM = """\
You review code changes made for a ticket. Judge only the diff, against the ticket and its
acceptance criteria. Report real problems, each with its severity (CRITICAL: a security hole
or data loss; HIGH: a bug that breaks the feature; MEDIUM: a bug in an edge case or a clear
performance problem; LOW: style), category, file, line in the new file, and a one-sentence
description. Answer with JSON only: {"verdict": "approve" | "request_changes", "summary":
"...", "issues": [...]}. Approve when nothing is CRITICAL or HIGH.
"""


@dataclass(frozen=True)
class Issue:
    severity: str
    category: str
    file: str
    line: int
    description: str


@dataclass
class Review:
    verdict: str = "approve"
    summary: str = ""
    issues: list[Issue] = field(default_factory=list)
    blocked: bool = False
    skipped: str | None = None  # why no review was made (on_error: allow)
    calls: list[Call] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "summary": self.summary,
            "blocked": self.blocked,
            "skipped": self.skipped,
            "issues": [vars(i) for i in self.issues],
        }


@dataclass(frozen=True)
class Policy:
    strictness: str = "normal"  # low | normal | high
    check_for: tuple[str, ...] = CATEGORIES
    block_on_critical: bool = True
    on_error: str = "fail"  # fail | allow


def blocks(issue: Issue, policy: Policy) -> bool:
    if issue.severity == "CRITICAL":
        return policy.block_on_critical
    return issue.severity == "HIGH" and policy.strictness == "high"


def review(
    llm: Route,
    model: str,
    task: str,
    diffs: Mapping[str, str],
    policy: Policy,
    *,
    num_ctx: int,
    num_predict: int,
    log: Callable[[str], None] = lambda message: None,
    ctx: RunContext | None = None,
) -> Review:
    """Review ``diffs`` (file -> unified diff of that file) for the ticket ``task``."""
    result = Review()
    budget = num_ctx - num_predict - estimate_tokens(SYSTEM + task) - 300
    for chunk in _chunks(diffs, budget):
        answer = _ask(llm, model, task, chunk, policy, result, log, ctx)
        if answer is None:
            return result
        result.summary = "\n".join(s for s in (result.summary, answer["summary"]) if s)
        for raw in answer["issues"]:
            issue = Issue(
                raw["severity"], raw["category"], raw["file"], int(raw["line"]), raw["description"]
            )
            if issue.category in policy.check_for:
                result.issues.append(issue)
        if answer["verdict"] == "request_changes":
            result.verdict = "request_changes"
    result.blocked = any(blocks(i, policy) for i in result.issues)
    return result


def _ask(
    llm: Route,
    model: str,
    task: str,
    diff: str,
    policy: Policy,
    result: Review,
    log: Callable[[str], None],
    ctx: RunContext | None,
) -> dict[str, Any] | None:
    focus = ", ".join(policy.check_for)
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"{task}\n## Look for: {focus}\n\n## The diff\n\n{diff}"},
    ]
    problem = ""
    for _ in range(2):  # one more try when the answer is not valid
        reply = llm.chat(model, messages, format=SCHEMA, on_call=result.calls.append, ctx=ctx)
        try:
            return _validate(json.loads(reply.content))
        except (ValueError, KeyError, TypeError) as e:
            problem = str(e)
            log(f"review answer was not valid JSON for the schema: {problem}")
    if policy.on_error == "allow":
        result.skipped = f"the review model gave no valid answer ({problem})"
        return None
    raise TicketdError(
        f"the review model gave no valid answer twice: {problem}", code="REVIEW_FAILED"
    )


def _validate(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict) or data.get("verdict") not in ("approve", "request_changes"):
        raise ValueError("verdict must be approve or request_changes")
    if not isinstance(data.get("summary"), str) or not isinstance(data.get("issues"), list):
        raise ValueError("summary must be a string and issues a list")
    for issue in data["issues"]:
        if issue.get("severity") not in SEVERITIES or issue.get("category") not in CATEGORIES:
            raise ValueError(f"bad severity or category in {issue!r:.200}")
        int(issue["line"])
        str(issue["file"]), str(issue["description"])
    return data


def _chunks(diffs: Mapping[str, str], budget: int) -> list[str]:
    """The diff whole when it fits, else groups of whole files; a file larger than the
    budget alone is cut to it (the reviewer is told)."""
    chunks: list[str] = []
    current = ""
    for name, diff in diffs.items():
        if estimate_tokens(diff) > budget:
            diff = diff[: budget * 3] + f"\n[... the rest of the diff of {name} is not shown]\n"
        if current and estimate_tokens(current + diff) > budget:
            chunks.append(current)
            current = ""
        current += diff
    return [*chunks, current] if current else chunks


def split_diff(diff: str) -> dict[str, str]:
    """A ``git diff`` split into per-file diffs, by the file's new (b/) path."""
    files: dict[str, str] = {}
    for part in re.split(r"(?m)^(?=diff --git )", diff):
        if part.startswith("diff --git "):
            files[part.split("\n", 1)[0].rsplit(" b/", 1)[-1]] = part
    return files


def summary_lines(result: Review) -> Sequence[str]:
    """Markdown lines for a pull request body."""
    if result.skipped:
        return [f"Review skipped: {result.skipped}"]
    lines = [f"**Review:** {result.verdict}. {result.summary}".strip()]
    lines += [
        f"- **{i.severity}** ({i.category}) `{i.file}:{i.line}`: {i.description}"
        for i in result.issues
    ]
    return lines
