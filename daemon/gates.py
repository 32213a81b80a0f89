"""The gates between a finished agent and the outside world, and the pull request text.

A gate that wants a person raises ``Held``: the ticket goes to ``review/`` with a
``.review.json`` saying why (or to ``failed/``, per configuration). Nothing is committed or
pushed before the gates have passed. The gates: sensitive paths (CI workflows, git's own
files, hooks, submodules, links out of the repository), secrets, and the LLM review.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from daemon import repo, review, tickets
from daemon.agent.command import ticket_sections
from daemon.errors import TicketdError


class Held(TicketdError):
    """The change must not go out as it is; ``folder`` is where the ticket goes."""

    def __init__(self, message: str, *, code: str, folder: str, details: dict[str, Any]) -> None:
        super().__init__(message, code=code)
        self.folder = folder
        self.details = details


def scan_secrets(
    diff: str, *, baseline: Path | None, on_finding: str, known: Iterable[str] = ()
) -> None:
    """Stop the run when the change adds a secret; only redacted values leave this function.

    ``known`` are the daemon's own secret values: they and their encodings (base64, hex) are
    findings too (``ticketd-known-secret``), which the baseline cannot excuse."""
    from daemon import secrets  # its ~200 compiled rules cost start-up time: load on first use

    ignored = secrets.load_baseline(baseline) if baseline is not None else set()
    found = [
        f
        for f in secrets.scan_added(diff, known=known)
        if f.rule == secrets.KNOWN_RULE or f.fingerprint not in ignored
    ]
    if not found:
        return
    listed = "; ".join(f"{f.file}:{f.line} {f.rule} ({f.redacted})" for f in found[:10])
    raise Held(
        f"the change adds {len(found)} secret(s): {listed}",
        code="SECRET_DETECTED",
        folder="review" if on_finding == "review" else "failed",
        details={
            "findings": [
                {"file": f.file, "line": f.line, "rule": f.rule, "redacted": f.redacted}
                for f in found
            ]
        },
    )


def check_review(result: review.Review, on_block: str) -> bool:
    """True when the pull request must be a draft; raises ``Held`` when it must not open."""
    if not result.blocked:
        return False
    if on_block == "draft_pr":
        return True
    worst = [i for i in result.issues if review.blocks(i, review.Policy(strictness="high"))]
    raise Held(
        f"the review blocks the change: {len(worst)} serious issue(s)"
        + (f", first: {worst[0].file}:{worst[0].line} {worst[0].description}" if worst else ""),
        code="REVIEW_BLOCKED",
        folder="review",
        details={"review": result.as_json()},
    )


def pr_body(
    ticket: tickets.Ticket,
    *,
    diffstat: str,
    checks: Sequence[str],
    result: review.Review | None,
    model: str | None,
    tokens: tuple[int, int, int] | None,
) -> str:
    """Description, acceptance criteria, what changed, checks, review, model and tokens."""
    parts = [f"Ticket **{ticket.id}**: {ticket.title}", ""]
    parts += ticket_sections(ticket, plan_and_notes=False)
    parts += ["## What changed", "", "```", diffstat.strip() or "(no files)", "```", ""]
    parts += ["## Checks", ""]
    parts += [f"- {c}" for c in checks] or ["- none configured"]
    parts.append("")
    if result is not None:
        parts += ["## Review", "", *review.summary_lines(result), ""]
    used = f"Model: `{model}`" if model else "No model (a command agent)"
    if tokens is not None:
        used += f"; {tokens[0]} LLM calls, {tokens[1]} prompt + {tokens[2]} eval tokens"
    parts += ["---", f"Opened by ticketd. {used}.", ""]
    return "\n".join(parts)


def sensitive(path: str, patterns: Sequence[str]) -> bool:
    """Whether ``path`` matches one of ``patterns`` (fnmatch; ``*`` crosses folders): a
    pattern without ``/`` is matched against the file name at any depth."""
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(path if "/" in p else name, p) for p in patterns)


def check_paths(entries: Sequence[repo.Entry], patterns: Sequence[str]) -> None:
    """Hold a change that touches what needs a person (``repo.sensitive_paths``), adds a
    submodule, or adds a symbolic link that leads out of the repository."""
    why = []
    for e in entries:
        if sensitive(e.path, patterns):
            why.append((e.path, "matches repo.sensitive_paths"))
        elif e.new_mode == repo.GITLINK:
            why.append((e.path, "a submodule (gitlink)"))
        elif e.link is not None and _leaves(e.path, e.link):
            why.append((e.path, f"a symbolic link to {e.link!r}, outside the repository"))
    if not why:
        return
    listed = "; ".join(f"{path} ({reason})" for path, reason in why[:10])
    raise Held(
        f"the change touches {len(why)} sensitive path(s): {listed}",
        code="SENSITIVE_PATH",
        folder="review",
        details={"paths": [{"path": path, "reason": reason} for path, reason in why]},
    )


def _leaves(path: str, target: str) -> bool:
    """Whether a link at ``path`` pointing to ``target`` resolves outside the repository."""
    if target.startswith("/"):
        return True
    depth = path.count("/")
    for part in target.split("/"):
        depth += -1 if part == ".." else 0 if part in ("", ".") else 1
        if depth < 0:
            return True
    return False
