"""``failed/<name>.error.json``: what happened to a ticket and whether a retry can help
(under ``<state_dir>/board/failed/`` in the Backlog.md layout: ``Backlog.record``).

The format is a contract (README, "The .error.json file"); ``build`` is the one place that
writes it. The retry rules are pure functions of the record, the ticket's content and ``now``:
``eligibility`` for one ticket, ``plan`` for a folder.

The record's times are wall-clock times. When the clock steps back after a failure, a ticket
seems to have failed in the future and its ``nextRetryAt`` may lie further ahead than any
backoff; neither may block a retry (else retries stop for as long as the step), so either
makes the ticket due at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.backlog import Backlog
from daemon.errors import CODES, InvalidTicket
from daemon.files import atomic_write
from daemon.tickets import id_from_filename, read_bytes

if TYPE_CHECKING:
    from daemon.config import RetryConfig


@dataclass(frozen=True)
class Backoff:
    base_s: float = 300.0
    factor: float = 2.0
    max_s: float = 6 * 3600.0

    def delay(self, retry_count: int) -> float:
        """The longest wait before retry number ``retry_count + 1``: base * factor**n, capped."""
        return min(self.max_s, self.base_s * self.factor ** min(retry_count, 64))


def next_retry_at(
    retry_count: int, now: datetime, backoff: Backoff = Backoff(), rng: random.Random | None = None
) -> datetime:
    """Exponential backoff with jitter in the upper half of each delay."""
    jitter = (rng or random.Random()).uniform(0.5, 1.0)  # noqa: S311 - jitter, not crypto
    return now + timedelta(seconds=backoff.delay(retry_count) * jitter)


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def build(
    *,
    task_id: str,
    file: str,
    now: datetime,
    stage: str,
    code: str,
    message: str,
    model: str | None,
    models_tried: Sequence[str],
    model_outcomes: dict[str, str],
    log_file: str,
    attempts: Sequence[dict[str, Any]],
    agent_log: str | None = None,
    content_sha256: str = "",
    backoff: Backoff = Backoff(),
) -> dict[str, Any]:
    """The ``.error.json`` record. ``attempts`` holds every unsuccessful run, this one last."""
    kind = CODES.get(code, CODES["INTERNAL_ERROR"])
    retry_count = max(0, len(attempts) - 1)
    return {
        "taskId": task_id,
        "file": file,
        "timestamp": iso(now),
        "stage": stage,
        "errorCode": code,
        "errorType": "transient" if kind.transient else "permanent",
        "error": " ".join(message.split())[:500],
        "retryable": kind.retryable,
        "retryCount": retry_count,
        "model": model,
        "modelsTried": list(models_tried),
        "modelOutcomes": dict(model_outcomes),
        "nextRetryAt": iso(next_retry_at(retry_count, now, backoff)) if kind.retryable else None,
        "logFile": log_file,
        "agentLog": agent_log,
        "attempts": list(attempts),
        "contentSha256": content_sha256,
    }


def write(path: Path, record: dict[str, Any]) -> Path:
    atomic_write(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return path


# -- retries ---------------------------------------------------------------------------------


# How far ahead of ``now`` a record's times may lie before they can only mean that the clock
# stepped back: seconds lost to rounding and to a clock that was slewed.
CLOCK_SLACK = timedelta(minutes=1)


@dataclass(frozen=True)
class Policy:
    max_retries: int = 3
    max_age_days: float = 7
    backoff: Backoff = Backoff()


def policy_from(retry: RetryConfig, *, max_age_days: float | None = None) -> Policy:
    """The policy ``retry.*`` describes (``max_age_days`` overrides its age limit)."""
    b = retry.backoff
    return Policy(
        retry.max_retries,
        retry.max_age_days if max_age_days is None else max_age_days,
        Backoff(b.base_s, b.factor, b.max_s),
    )


@dataclass(frozen=True)
class Decision:
    task_id: str
    file: str
    eligible: bool
    reason: str
    action: str = "none"
    exhausted: bool = False  # past a limit for good: mark it not retryable


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_sha256(path: Path) -> str:
    """The SHA-256 of a ticket file; "" when it is no readable ticket file (a link, a FIFO,
    a folder, gone): such a file never counts as edited."""
    try:
        return sha256(read_bytes(path))
    except (InvalidTicket, OSError):
        return ""


def read(path: Path) -> dict[str, Any] | None:
    """An ``.error.json``, or None when missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _parse(value: object) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def eligibility(
    record: dict[str, Any] | None,
    content_sha256: str,
    now: datetime,
    policy: Policy,
    *,
    force: bool = False,
) -> tuple[bool, str, bool]:
    """May this failed ticket go back to ``todo/`` at ``now``? Returns (eligible, why,
    exhausted). A ticket a person edited since it failed is always eligible; ``force``
    ignores the backoff, the retry limit and the age, never an unchanged INVALID_TICKET."""
    if record is None:
        return (
            (True, "no .error.json; forced", False)
            if force
            else (False, "no readable .error.json beside it; use --force", False)
        )
    code = str(record.get("errorCode", "?"))
    if record.get("contentSha256") and record["contentSha256"] != content_sha256:
        return True, "edited since it failed", False
    if code == "INVALID_TICKET":
        return False, "INVALID_TICKET: fix the file first", False
    if force:
        return True, "forced", False
    if not record.get("retryable", False):
        note = record.get("retryNote") or f"{code} is permanent"
        return False, f"{note}: edit the ticket or use --force", False
    count = int(record.get("retryCount") or 0)
    if count >= policy.max_retries:
        return False, f"retry limit reached ({count} of {policy.max_retries})", True
    failed_at = _parse(record.get("timestamp"))
    if failed_at is not None and failed_at > now + CLOCK_SLACK:
        return (
            True,
            f"due: it failed in the future ({iso(failed_at)}); the clock stepped back",
            False,
        )
    if failed_at is not None and now - failed_at > timedelta(days=policy.max_age_days):
        return False, f"failed more than {policy.max_age_days:g} days ago", True
    due = _parse(record.get("nextRetryAt"))
    longest = policy.backoff.max_s + CLOCK_SLACK.total_seconds()
    if due is not None and (due - now).total_seconds() > longest:
        return (
            True,
            f"due: nextRetryAt {iso(due)} is beyond the longest backoff; the clock stepped back",
            False,
        )
    if due is not None and now < due:
        return False, f"backing off until {iso(due)}", False
    return True, "due", False


def plan(
    backlog: Backlog,
    now: datetime,
    policy: Policy,
    *,
    force: bool = False,
    task_id: str | None = None,
) -> list[tuple[Path, Decision]]:
    """A decision for each failed ticket file (only ``task_id``'s when given)."""
    decisions = []
    for path in backlog.files("failed"):
        record = read(backlog.record("failed", backlog.key(path)))
        tid = str(record.get("taskId")) if record else id_from_filename(path)
        if task_id is not None and tid.lower() != task_id.lower():
            continue
        if not os.path.lexists(path):
            continue  # moved meanwhile
        content = content_sha256(path)
        ok, why, exhausted = eligibility(record, content, now, policy, force=force)
        decisions.append((path, Decision(tid, path.name, ok, why, exhausted=exhausted)))
    return decisions


def mark_exhausted(path: Path, reason: str) -> None:
    """Past a limit: the ticket stays in failed/, its ``.error.json`` (``path``) says it for
    good."""
    record = read(path)
    if record is not None and record.get("retryable"):
        record.update(retryable=False, nextRetryAt=None, retryNote=reason)
        write(path, record)


def apply(
    backlog: Backlog, decisions: Sequence[tuple[Path, Decision]], now: datetime, *, dry_run: bool
) -> list[Decision]:
    """Move the eligible tickets back to ``todo/`` (their ``.error.json`` goes; the attempts
    stay in the history) and mark the exhausted ones not retryable. Returns what was done."""
    done = []
    for path, d in decisions:
        record = backlog.record("failed", backlog.key(path))
        action = "none"
        if d.eligible:
            action = "would retry" if dry_run else "retried"
            if not dry_run:
                try:
                    backlog.move(path, "todo", now)
                except FileNotFoundError:
                    action = "gone"
                else:
                    record.unlink(missing_ok=True)
        elif d.exhausted:
            action = "would mark not retryable" if dry_run else "marked not retryable"
            if not dry_run:
                mark_exhausted(record, d.reason)
        done.append(dataclasses.replace(d, action=action))
    return done
