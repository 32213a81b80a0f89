"""What ``ticketd status`` (and later ``/status``) reports: read from the folders, the
leases and the history, never from a running daemon's memory.

The folders change while they are read (a daemon claims and moves tickets): a ticket or a
lease that moves away or vanishes meanwhile is left out, and a file that is no ticket is
reported as invalid, never an error."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from daemon import inreview, tickets
from daemon.backlog import FOLDERS, Backlog
from daemon.config import OllamaHost
from daemon.errors import InvalidTicket
from daemon.store import Store


def collect(
    backlog: Backlog, store: Store, now: datetime, hosts: Sequence[OllamaHost] = ()
) -> dict[str, Any]:
    """The report; ``hosts``: the Ollama hosts, each shown with the tickets running on it."""
    candidates, invalid = backlog.briefs()
    waiting: list[dict[str, Any]] = [
        {"taskId": None, "file": path.name, "reason": f"invalid: {why}"}
        for path, why in (invalid | backlog.problems()).items()
    ]
    ready, blocked = backlog.plan(candidates)
    waiting += [{"taskId": t.id, "file": t.path.name, "reason": "ready"} for t in ready]
    waiting += [
        {"taskId": w.ticket.id, "file": w.ticket.path.name, "reason": w.reason} for w in blocked
    ]
    history = store.running()
    running = []
    for path in backlog.files("in-progress"):
        name = backlog.key(path)
        info = _lease(backlog, name)
        if not os.path.lexists(path):
            continue  # finished since the listing
        row = history.get(name, {})
        claimed = _parse(info.get("claimedAt"))
        running.append(
            {
                "taskId": row.get("task_id") or tickets.id_from_filename(path),
                "file": path.name,
                "stage": info.get("stage") or row.get("stage"),
                "ollamaHost": info.get("ollamaHost"),
                "model": info.get("model"),
                "elapsedS": round((now - claimed).total_seconds(), 1) if claimed else None,
                "owner": f"{info.get('host')}:{info['pid']}" if "pid" in info else None,
                "ownerAlive": _alive(info),
            }
        )
    return {
        "layout": backlog.layout,
        "counts": {f: backlog.count(f) for f in FOLDERS},
        "waiting": waiting,
        "running": running,
        "inReview": [
            {
                "taskId": tickets.id_from_filename(o.ticket),
                "file": o.ticket.name,
                "pr": o.number,
                "url": o.url,
                "since": o.opened,
                "revisions": o.revisions,
            }
            for o in inreview.open_pulls(backlog)
        ],
        "recent": store.recent(10),
        "ollamaHosts": [
            {
                "host": h.url,
                "weight": h.weight,
                "maxTickets": h.max_tickets,
                "tickets": sum(r["ollamaHost"] == h.url for r in running),
            }
            for h in hosts
        ],
    }


def _lease(backlog: Backlog, name: str) -> dict[str, Any]:
    """What the lease of ``in-progress/<name>`` records; {} when it is gone or unreadable."""
    try:
        info = json.loads(tickets.read_bytes(backlog.lock_path(name)) or b"{}")
    except (FileNotFoundError, ValueError, InvalidTicket):  # gone, or not (yet) a lease
        return {}
    return info if isinstance(info, dict) else {}


def _parse(value: object) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(str(value)) if value else None
    except ValueError:
        return None
    return parsed if parsed is not None and parsed.tzinfo is not None else None


def _alive(info: dict[str, Any]) -> bool | None:
    pid = info.get("pid")
    if not isinstance(pid, int) or not 0 < pid < 2**31:
        return None
    import psutil  # only here: a status with nothing running does without it

    return bool(psutil.pid_exists(pid))
