"""Pickup latency: how long from a ticket landing in todo/ until the daemon has claimed it.

Builds a throwaway project in a temporary directory (a real git repo, a bare remote, a
config.yaml), starts a real daemon (``python -m daemon run --config ...``) with
``concurrency.max_tickets: 4`` and a no-op agent that writes one file, and watches the
backlog with a watchdog Observer of its own. Tickets are dropped one at a time: each is
written to a hidden file outside the backlog and renamed into todo/ (t0 = time.monotonic()
just before the rename). The bench then waits, up to a deadline, for its observer to see

  event: the todo/ event for that file, from a recursive watch on backlog/ set up like the
         daemon's own (raw watchdog latency as the daemon sees it, t_event - t0)
  claim: the file appear in in-progress/ (event-to-claim as a user sees it, t_claim - t0)

and only then drops the next. Both are seen through a recursive watch on backlog/, where
the daemon's renames (todo/ -> in-progress/ -> done/) are paired moves: watchdog holds an
unpaired "moved out" event back for 0.5 s and queues everything after it in that watch
behind it, which would delay a watch on todo/ or in-progress/ alone. A ticket is dropped
only when in-progress/ holds fewer than max_tickets tickets, so the figures are pickup with
a free worker, not queueing. Prints figures; asserts nothing.

    python bench/pickup_latency.py [--tickets 300] [--deadline 10] [--gap 0] [--keep]

``--gap S`` pauses S seconds after each claim (try 0.6 to see pickup when tickets arrive
spaced out rather than back to back).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from project import PY, make_project, run_in_tempdir, stop
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

MAX_TICKETS = 4


def ticket_text(n: int) -> str:
    return f"---\nid: task-{n}\ntitle: Bench {n}\nstatus: To Do\n---\n\n## Description\n\nNo-op.\n"


class FirstSeen(FileSystemEventHandler):
    """Records in ``seen`` when each file name is first created in, or moved into, ``folder``."""

    def __init__(self, folder: Path, seen: dict[str, float], cond: threading.Condition) -> None:
        self.folder, self.seen, self.cond = str(folder), seen, cond

    def on_any_event(self, event: FileSystemEvent) -> None:
        now = time.monotonic()
        if event.is_directory or event.event_type not in ("created", "moved"):
            return
        target = os.fsdecode(getattr(event, "dest_path", "") or event.src_path)
        if os.path.dirname(target) == self.folder:
            with self.cond:
                self.seen.setdefault(os.path.basename(target), now)
                self.cond.notify_all()


def tickets_in(folder: Path) -> list[str]:
    return [n for n in os.listdir(folder) if n.endswith(".md") and not n.startswith(".")]


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(len(ordered) * p / 100) - 1)]


def print_table(series: dict[str, list[float]], missed: dict[str, int]) -> None:
    print(f"{'':>8} " + " ".join(f"{name:>10}" for name in series))
    print(f"{'count':>8} " + " ".join(f"{len(v):>10}" for v in series.values()))
    for label, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100)):
        cells = [
            f"{percentile(v, p) * 1000:>10.2f}" if v else f"{'-':>10}" for v in series.values()
        ]
        print(f"{label + ' ms':>8} " + " ".join(cells))
    print(f"{'missed':>8} " + " ".join(f"{missed[name]:>10}" for name in series))


def problems(log: str) -> list[str]:
    """Lines of the daemon's output other than its INFO/SUCCESS/DEBUG log lines."""
    ok = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|SUCCESS|DEBUG) ")
    return [line for line in log.splitlines() if line.strip() and not ok.match(line)]


def bench(root: Path, args: argparse.Namespace) -> None:
    config = make_project(root, max_tickets=MAX_TICKETS)
    backlog = root / "backlog"
    todo, in_progress = backlog / "todo", backlog / "in-progress"
    staging = root / "staging"  # same filesystem as todo/, outside the backlog
    staging.mkdir()
    out_path = root / "daemon.out"

    with out_path.open("wb") as out:
        daemon = subprocess.Popen(
            [PY, "-m", "daemon", "run", "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    started = time.monotonic()
    while "watching" not in out_path.read_text(errors="replace"):
        if daemon.poll() is not None or time.monotonic() - started > 60:
            sys.exit("daemon did not start:\n" + out_path.read_text(errors="replace"))
        time.sleep(0.01)

    cond = threading.Condition()
    seen: dict[str, dict[str, float]] = {"event": {}, "claim": {}}
    # watchdog 7.1 logs "queue_events() called when the thread is inactive" on a normal stop
    logging.getLogger("watchdog.observers.inotify").setLevel(logging.CRITICAL)
    observer = Observer()
    observer.schedule(FirstSeen(todo, seen["event"], cond), str(backlog), recursive=True)
    observer.schedule(FirstSeen(in_progress, seen["claim"], cond), str(backlog), recursive=True)
    observer.start()

    t0s: dict[str, float] = {}
    began = time.monotonic()
    try:
        for n in range(1, args.tickets + 1):
            busy_until = time.monotonic() + 60  # wait for a free worker
            while len(tickets_in(in_progress)) >= MAX_TICKETS and time.monotonic() < busy_until:
                time.sleep(0.002)
            name = f"task-{n} - Bench-{n}.md"
            part = staging / f".{name}.part"
            part.write_text(ticket_text(n))
            t0s[name] = time.monotonic()
            os.rename(part, todo / name)
            with cond:
                cond.wait_for(
                    lambda name=name: all(name in s for s in seen.values()), args.deadline
                )
            time.sleep(args.gap)
        elapsed = time.monotonic() - began
        settle_until = time.monotonic() + 120  # let the last runs finish before stopping
        while time.monotonic() < settle_until and (tickets_in(todo) or tickets_in(in_progress)):
            time.sleep(0.05)
    finally:
        observer.stop()
        observer.join()
        code = stop(daemon)

    series: dict[str, list[float]] = {}
    missed: dict[str, int] = {}
    for key, times in seen.items():
        lat = [times[name] - t0 for name, t0 in t0s.items() if name in times]
        series[key] = [x for x in lat if x <= args.deadline]
        missed[key] = len(t0s) - len(series[key])

    print(
        f"method: {args.tickets} tickets renamed into todo/ one at a time, each after the last"
        f" was claimed and while in-progress/ < {MAX_TICKETS}, gap {args.gap:g}s; a watchdog"
        f" Observer in the bench timestamps the todo/ event and the arrival in in-progress/"
        f" (daemon: max_tickets {MAX_TICKETS}, no-op agent, intake defaults; deadline"
        f" {args.deadline:g}s per ticket)"
    )
    print(
        f"event = t_event - t0 (raw watchdog latency); claim = t_claim - t0 (event-to-claim);"
        f" drops took {elapsed:.1f}s"
    )
    print_table(series, missed)
    where = {f: len(tickets_in(backlog / f)) for f in ("todo", "in-progress", "done", "failed")}
    print("tickets at the end: " + ", ".join(f"{f} {c}" for f, c in where.items()))
    bad = problems(out_path.read_text(errors="replace"))
    print(f"daemon: exit status {code} after SIGTERM; {len(bad)} other line(s) in its output")
    for line in bad[:10]:
        print("  " + line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tickets", type=int, default=300)
    ap.add_argument("--deadline", type=float, default=10.0, help="seconds to wait per ticket")
    ap.add_argument("--gap", type=float, default=0.0, help="seconds to pause after each claim")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    run_in_tempdir("ticketd-pickup-", args, lambda root: bench(root, args))


if __name__ == "__main__":
    main()
