"""What ``ticketd status`` (and later ``/status``) reports: read from the folders, the
leases and the history, never from a running daemon's memory."""

from __future__ import annotations

import contextlib
import json
from datetime import datetime
from typing import Any

import psutil

from daemon import tickets
from daemon.backlog import FOLDERS, Backlog
from daemon.errors import InvalidTicket
from daemon.store import Store


def collect(backlog: Backlog, store: Store, now: datetime) -> dict[str, Any]:
    candidates, waiting = [], []
    for path in backlog.files("todo"):
        try:
            candidates.append(backlog.read(path))
        except InvalidTicket as e:
            waiting.append({"taskId": None, "file": path.name, "reason": f"invalid: {e.message}"})
    ready, blocked = backlog.plan(candidates)
    waiting += [{"taskId": t.id, "file": t.path.name, "reason": "ready"} for t in ready]
    waiting += [
        {"taskId": w.ticket.id, "file": w.ticket.path.name, "reason": w.reason} for w in blocked
    ]
    history = store.running()
    running = []
    for path in backlog.files("in-progress"):
        info: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            info = json.loads((backlog.leases / f"{path.name}.lock").read_bytes() or b"{}")
        row = history.get(path.name, {})
        claimed = _parse(info.get("claimedAt"))
        running.append(
            {
                "taskId": row.get("task_id") or tickets.id_from_filename(path),
                "file": path.name,
                "stage": info.get("stage") or row.get("stage"),
                "elapsedS": round((now - claimed).total_seconds(), 1) if claimed else None,
                "owner": f"{info['host']}:{info['pid']}" if "pid" in info else None,
                "ownerAlive": _alive(info),
            }
        )
    return {
        "counts": {f: len(backlog.files(f)) for f in FOLDERS},
        "waiting": waiting,
        "running": running,
        "recent": store.recent(10),
    }


def _parse(value: object) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value)) if value else None
    except ValueError:
        return None


def _alive(info: dict[str, Any]) -> bool | None:
    pid = info.get("pid")
    if not isinstance(pid, int):
        return None
    return psutil.pid_exists(pid)
