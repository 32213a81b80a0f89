"""CLI speed: how long ``ticketd --help`` and ``ticketd status`` take, and their memory.

Builds a throwaway project (bench/project.py: a real git repo, a bare remote, a config.yaml)
and puts ``--tickets`` Backlog.md task files in todo/ (front matter id, title, status To Do,
labels, created_date; a description and acceptance criteria), written before the first run.
Then times, ``--runs`` times each after one warm-up run that is not counted, each a fresh
process started with cwd the tree this script lives in and PYTHONPATH dropped (so
bench/cli_speed.py of any checkout measures that checkout's daemon/):

  python -c pass                            the interpreter alone, for reference
  python -m daemon --help
  python -m daemon status --config ...      with the tickets in todo/ (every one read and
                                            listed as waiting), stdout to a file

Wall time is from the start of the process to its exit as this process sees it (polled
every millisecond); CPU (user + system) is the child's own, from ``os.wait4``; peak RSS is
the child's VmHWM (/proc/<pid>/status), read every millisecond while it runs, the last
reading at most a millisecond before it exits. (Not ``ru_maxrss``: a child started with
vfork, as subprocess does, inherits the parent's peak in it across exec.) Prints the median
and the minimum of each, the exit status and how many lines the command printed. Asserts
nothing.

    python bench/cli_speed.py [--tickets 1000] [--runs 10] [--keep]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from overhead import git_version
from project import PY, TREE, backlog_task, daemon_env, make_project, run_in_tempdir


def fill_todo(todo: Path, count: int) -> None:
    for n in range(1, count + 1):
        name, text = backlog_task(n, "To Do", random.Random(n), "2026-01-01 09:00")
        (todo / name).write_text(text)


def vm_hwm_mb(pid: int) -> float:
    """Peak resident set size of ``pid`` so far in MB (VmHWM); 0 once it has exited."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    found = [line.split()[1] for line in text.splitlines() if line.startswith("VmHWM:")]
    return int(found[0]) / 1024 if found else 0.0


def timed(argv: list[str]) -> tuple[float, float, float, int, int]:
    """One run of ``argv``: (wall s, CPU s, peak RSS MB, exit status, lines printed)."""
    with tempfile.TemporaryFile() as out:
        start = time.monotonic()
        proc = subprocess.Popen(
            argv, cwd=TREE, env=daemon_env(), stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        peak = 0.0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, vm_hwm_mb(proc.pid))
            time.sleep(0.001)
        wall = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        lines = out.read().count(b"\n")
    return wall, usage.ru_utime + usage.ru_stime, peak, proc.returncode, lines


def bench(root: Path, args: argparse.Namespace) -> None:
    config = make_project(root, max_tickets=1)
    fill_todo(root / "backlog" / "todo", args.tickets)
    commands = {
        "python -c pass": [PY, "-c", "pass"],
        "ticketd --help": [PY, "-m", "daemon", "--help"],
        f"ticketd status ({args.tickets:,} in todo/)": [
            PY, "-m", "daemon", "status", "--config", str(config),
        ],
    }  # fmt: skip
    print(f"method: each command once to warm up, then {args.runs} runs, each a fresh process"
          f" (cwd {TREE}); wall as seen from here, CPU from os.wait4, peak RSS from VmHWM; git"
          f" {git_version()}, {os.cpu_count()} cpus, python {sys.version.split()[0]}")  # fmt: skip
    head = ("wall p50", "wall min", "CPU p50", "CPU min", "RSS p50", "exit", "lines")
    print(f"  {'':<34}" + "".join(f"{h:>10}" for h in head))
    print(f"  {'':<34}" + "".join(f"{u:>10}" for u in ("ms", "ms", "ms", "ms", "MB", "", "")))
    for label, argv in commands.items():
        timed(argv)
        runs = [timed(argv) for _ in range(args.runs)]
        walls, cpus, rss = ([r[i] for r in runs] for i in range(3))
        cells = [
            f"{statistics.median(walls) * 1000:.0f}",
            f"{min(walls) * 1000:.0f}",
            f"{statistics.median(cpus) * 1000:.0f}",
            f"{min(cpus) * 1000:.0f}",
            f"{statistics.median(rss):.1f}",
            ",".join(sorted({str(r[3]) for r in runs})),
            f"{statistics.median(r[4] for r in runs):.0f}",
        ]
        print(f"  {label:<34}" + "".join(f"{c:>10}" for c in cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tickets", type=int, default=1000, help="tickets in todo/")
    ap.add_argument("--runs", type=int, default=10, help="timed runs of each command")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    run_in_tempdir("ticketd-cli-", args, lambda root: bench(root, args))


if __name__ == "__main__":
    main()
