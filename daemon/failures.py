"""``failed/<name>.error.json``: what happened to a ticket and whether a retry can help.

The format is a contract (README, "The .error.json file"); ``build`` is the one place that
writes it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from daemon.errors import CODES
from daemon.files import atomic_write

BACKOFF_BASE_S = 300.0
BACKOFF_FACTOR = 2.0
BACKOFF_MAX_S = 6 * 3600.0


def error_path(ticket: Path) -> Path:
    """``failed/X.md`` -> ``failed/X.error.json``."""
    return ticket.with_name(ticket.name.removesuffix(".md") + ".error.json")


def next_retry_at(retry_count: int, now: datetime, rng: random.Random | None = None) -> datetime:
    """Exponential backoff with full jitter in its upper half: base * factor**n, capped."""
    delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * BACKOFF_FACTOR**retry_count)
    jitter = (rng or random.Random()).uniform(0.5, 1.0)  # noqa: S311 - jitter, not crypto
    return now + timedelta(seconds=delay * jitter)


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
        "nextRetryAt": iso(next_retry_at(retry_count, now)) if kind.retryable else None,
        "logFile": log_file,
        "attempts": list(attempts),
    }


def write(ticket_in_failed: Path, record: dict[str, Any]) -> Path:
    path = error_path(ticket_in_failed)
    atomic_write(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return path
