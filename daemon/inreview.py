"""Tickets in review/ waiting on an open pull request, as their ``.review.json`` records say:
read by the pull-request watch (``daemon/pulls.py``), ``ticketd status`` and the dashboard,
with nothing else loaded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from daemon.backlog import Backlog


@dataclass(frozen=True)
class Open:
    """A ticket in review/ waiting on its pull request (read from its ``.review.json``)."""

    ticket: Path
    number: int
    url: str
    branch: str
    opened: str
    revisions: int = 0
    name: str = ""  # the ticket's key (``Backlog.key``)


def open_pulls(backlog: Backlog, *, tidy: bool = False) -> list[Open]:
    """Tickets in review/ waiting on an open pull request. With ``tidy``, a ``PR_OPEN``
    record whose ticket left review/ by hand (not to in-progress/, where a revision runs) is
    removed."""
    found = []
    for name, record in backlog.records("review"):
        try:
            data = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or data.get("reason") != "PR_OPEN":
            continue
        ticket = backlog.locate(name, "review")
        if ticket is None:
            if tidy and backlog.state_of(name) != "in-progress":
                record.unlink(missing_ok=True)
            continue
        try:
            found.append(
                Open(
                    ticket,
                    int(data["prNumber"]),
                    str(data["prUrl"]),
                    str(data["branch"]),
                    str(data.get("timestamp", "")),
                    int(data.get("revisions") or 0),
                    name,
                )
            )
        except (KeyError, TypeError, ValueError):
            continue
    return found
