"""Per-ticket overhead: the daemon's whole path for a no-op ticket vs the bare git it needs.

Builds a throwaway project in a temporary directory (a real git repo, a bare remote, a
config.yaml with the default ``concurrency.max_tickets: 1`` and a no-op agent that writes one
file), then, in that one layout:

1. times empty ``python -m daemon run --once --config ...`` runs (startup + shutdown, and
   the time until the log says "watching"), median of three;
2. puts N tickets in todo/ and times one ``--once`` run end to end; per ticket is
   (that - the empty run) / N. The daemon's own per-stage durations are read from its
   history (``state_dir/history.sqlite3``, table ``stages``) and its claim-to-done time per
   ticket from table ``runs``;
3. runs, per ticket, the bare git commands the path needs, each via subprocess:
   ``git worktree add -B <branch> <path> main``, write a file, ``git add --all``,
   ``git commit``, ``git push --force origin HEAD:refs/heads/<branch>``,
   ``git worktree remove --force <path>``; and, separately, the no-op agent process alone.

Prints a table of figures (milliseconds); the difference between the daemon's per-ticket time
and the bare git is ticketd's overhead per ticket. Asserts nothing.

    python bench/overhead.py [--tickets 30] [--keep]
"""

from __future__ import annotations

import argparse
import math
import re
import sqlite3
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from project import NOOP_AGENT, PY, git, make_project, run_in_tempdir

BARE_STEPS = ("worktree add", "write file", "add", "commit", "push", "worktree remove")


def add_ticket(todo: Path, n: int) -> None:
    name = f"task-{n} - Bench-{n}.md"
    part = todo.parent / f".{name}.part"
    part.write_text(f"---\nid: task-{n}\ntitle: Bench {n}\nstatus: To Do\n---\n\nNo-op.\n")
    part.rename(todo / name)


def run_once(config: Path) -> tuple[float, float, int, str]:
    """One ``run --once``: (seconds until "watching", seconds in all, exit status, output)."""
    start = time.monotonic()
    proc = subprocess.Popen(
        [PY, "-m", "daemon", "run", "--once", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    watching, lines = math.nan, []
    for line in proc.stdout:
        if math.isnan(watching) and "watching" in line:
            watching = time.monotonic() - start
        lines.append(line)
    code = proc.wait()
    return watching, time.monotonic() - start, code, "".join(lines)


def bare_git(repo: Path, root: Path, n: int) -> dict[str, float]:
    """The git commands of one ticket's path, each timed; plus the no-op agent on its own."""
    times: dict[str, float] = {}
    branch, path = f"bench/bare-{n}", root / "bare-worktrees" / f"task-{n}"

    def step(label: str, *args: str, cwd: Path = repo) -> None:
        t = time.monotonic()
        git(cwd, *args)
        times[label] = time.monotonic() - t

    step("worktree add", "worktree", "add", "--quiet", "-B", branch, str(path), "main")
    t = time.monotonic()
    (path / "x.txt").write_text("x")
    times["write file"] = time.monotonic() - t
    step("add", "add", "--all", cwd=path)
    step("commit", "commit", "--quiet", "-m", f"Bench {n}", cwd=path)
    step("push", "push", "--quiet", "--force", "origin", f"HEAD:refs/heads/{branch}", cwd=path)
    t = time.monotonic()
    subprocess.run(NOOP_AGENT, cwd=path, check=True, timeout=60)  # not part of the bare total
    agent = time.monotonic() - t
    step("worktree remove", "worktree", "remove", "--force", str(path))
    times["bare total"] = sum(times.values())
    times["agent process alone"] = agent
    return times


def history(db: Path) -> tuple[dict[str, list[float]], list[float], dict[str, int]]:
    """Per-stage durations, claim-to-done durations and outcome counts from the daemon's db."""
    con = sqlite3.connect(db)
    try:
        stages: dict[str, list[float]] = defaultdict(list)
        for stage, took in con.execute("SELECT stage, duration_s FROM stages ORDER BY rowid"):
            stages[stage].append(took if took is not None else math.nan)
        runs = [r[0] for r in con.execute("SELECT duration_s FROM runs WHERE outcome = 'done'")]
        outcomes = dict(con.execute("SELECT outcome, count(*) FROM runs GROUP BY outcome"))
    finally:
        con.close()
    return stages, runs, outcomes


def row(label: str, values: list[float]) -> None:
    """Mean and p50 in milliseconds."""
    mean, p50 = statistics.fmean(values) * 1000, statistics.median(values) * 1000
    print(f"  {label:<36} {mean:>9.1f} {p50:>9.1f}")


def problems(log: str) -> list[str]:
    """Lines of the daemon's output other than its INFO/SUCCESS/DEBUG log lines."""
    ok = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|SUCCESS|DEBUG) ")
    return [line for line in log.splitlines() if line.strip() and not ok.match(line)]


def bench(root: Path, n: int) -> None:
    config = make_project(root, max_tickets=1)
    empty = [run_once(config) for _ in range(3)]  # also creates the backlog folders and the db
    watching = statistics.median(e[0] for e in empty)
    empty_s = statistics.median(e[1] for e in empty)

    todo = root / "backlog" / "todo"
    for i in range(1, n + 1):
        add_ticket(todo, i)
    _, full_s, code, output = run_once(config)
    stages, runs, outcomes = history(root / "state" / "history.sqlite3")

    bare: dict[str, list[float]] = defaultdict(list)
    for i in range(1, n + 1):
        for label, took in bare_git(root / "repo", root, i).items():
            bare[label].append(took)

    per_ticket = (full_s - empty_s) / n
    bare_mean = statistics.fmean(bare["bare total"])
    agent_mean = statistics.fmean(bare["agent process alone"])
    print(f"method: {n} no-op tickets, one `run --once` (max_tickets 1) timed end to end, minus"
          f" an empty `run --once`; bare git = the same path's git commands via subprocess, in"
          f" the same repo, {n} times; git {git_version()}, {sys.platform}, python"
          f" {sys.version.split()[0]}")  # fmt: skip
    print(f"  {'per ticket (ms)':<36} {'mean':>9} {'p50':>9}")
    print(f"  {'daemon, (once run - empty run) / N':<36} {per_ticket * 1000:>9.1f} {'':>9}")
    if runs:
        row("daemon, claim to done (runs table)", runs)
    for stage, values in stages.items():
        row(f"  stage {stage}", values)
    if runs and stages:
        rest = statistics.fmean(runs) - sum(statistics.fmean(v) for v in stages.values())
        print(f"  {'  outside stages (remove, moves, db)':<36} {rest * 1000:>9.1f}")
    for label in ("bare total", *(f"  {s}" for s in BARE_STEPS), "agent process alone"):
        row(label, bare[label.strip()])
    overhead = per_ticket - bare_mean
    print(f"  {'overhead = daemon - bare git':<36} {overhead * 1000:>9.1f}")
    print(f"  {'  of which the agent process':<36} {agent_mean * 1000:>9.1f}")
    print(f"  {'  the rest (ticketd itself)':<36} {(overhead - agent_mean) * 1000:>9.1f}")
    print(f"daemon startup: {watching * 1000:.0f} ms until it logs 'watching'; empty --once run"
          f" {empty_s * 1000:.0f} ms in all (medians of 3); the {n}-ticket run took"
          f" {full_s:.2f} s")  # fmt: skip
    bad = [f"[{n}-ticket run] {line}" for line in problems(output)]
    bad += [f"[empty run {i}] {line}" for i, e in enumerate(empty, 1) for line in problems(e[3])]
    print(f"daemon: exit status {code}; runs by outcome {outcomes};"
          f" {len(bad)} other line(s) in its output")  # fmt: skip
    for line in bad[:10]:
        print("  " + line)


def git_version() -> str:
    out = subprocess.run(["git", "--version"], capture_output=True, text=True, check=True).stdout
    return out.split()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tickets", type=int, default=30)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    run_in_tempdir("ticketd-overhead-", args, lambda root: bench(root, args.tickets))


if __name__ == "__main__":
    main()
