"""Scale: pickup and claim-to-done as done/ grows, with a long history, beside bare git.

Shows the curve at 0 (an empty backlog), 100, 1,000 and 10,000 tickets already in done/, with
10,000 runs in the history at every size; ticketd and bare git interleaved (A B A B) in one
run; CPU time beside wall time; the daemon's memory.

Method. One throwaway project (bench/project.py: a real git repo, a bare remote, a
config.yaml with ``concurrency.max_tickets: 1``, a no-op agent that writes one file, intake
and everything else at their defaults). Before the sizes, the history
(``state_dir/history.sqlite3``) gets ``--runs`` finished runs through the daemon's own
``Store``, each recorded as daemon/runner.py records a run (``start_run`` with the config
snapshot, labels, seven stages started and ended, its calls, ``finish_run`` done), spread over
the last 90 days. Then, for each size of ``--sizes``, in order:

1. done/ (or todo/, with ``--folder todo``: tickets that all wait for ``task-0``, which never
   comes, so the daemon lists and plans them at every intake and claims none) is made to
   hold exactly that many Backlog.md task files ``task-1`` .. ``task-<size>``
   (front matter id, title, status Done or To Do, labels, created_date; a description and acceptance
   criteria inside Backlog.md's section markers, drawn from a vocabulary of thousands of
   words), the tickets the bench ran at the size before taken out. Each has an mtime in the
   last 20 days, inside the duplicate window: the daemon's duplicate check (a Jaccard
   comparison of word sets against todo/, in-progress/ and recently done tickets) compares
   every new ticket with all of them, and none of them is a duplicate.
2. A daemon is started, ``python -m daemon run --config ...`` with cwd the tree this script
   lives in and PYTHONPATH dropped (so bench/scale.py of any checkout benchmarks that
   checkout's daemon/), and timed until it logs "watching". After ``--idle`` seconds with
   nothing to do its RSS and the CPU it used meanwhile are read (psutil).
3. One warm-up round, reported on its own as "cold" (the first claim after a start reads
   every ticket in done/), then ``--rounds`` rounds of A, B and C:
   A  a new ticket (its own words) is written outside the backlog and renamed into todo/
      (t0 just before the rename). A watchdog Observer in the bench, recursive on backlog/
      like the daemon's own (see bench/pickup_latency.py), timestamps the todo/ event (raw
      watchdog latency), the arrival in in-progress/ (pickup) and the arrival in done/
      (drop-to-done: the daemon's wall time per ticket, as a user sees it). Claim-to-done is
      the run's ``duration_s`` in the history (the daemon's own clock from the claim to the
      move to done/). The next drop waits until in-progress/ is empty and the daemon has no
      child process left.
   B  the bare git commands of one ticket's path, each via subprocess (bench/overhead.py's
      ``bare_git``: worktree add, write a file, add, commit, push, worktree remove), and the
      no-op agent process on its own; CPU is this process's RUSAGE_CHILDREN delta over both.
   C  the claim's own file operations, once, in this process on the same filesystem, outside
      the daemon's backlog (so that they meet the disk as A did, round by round): "raw" (open
      and flock a lease file, check its inode, rename the ticket todo/ -> in-progress/ and
      fsync the folder, write the lease's JSON, rewrite the ticket's status atomically:
      read, temp file, fsync, rename, fsync the folder) and daemon/backlog.py's
      ``Backlog.claim`` itself (the same, with its parsing and front-matter editing).
   The daemon's CPU per ticket is its user + system time, its reaped children's included
   (psutil ``cpu_times``), from one drop to the next: one A, and the B during which it idles.
   Its RSS is sampled after every A; peak RSS is its VmHWM (/proc/<pid>/status) after the
   rounds, start-up and the cold claim included.
4. SIGTERM; its exit status and any output line not INFO/SUCCESS/DEBUG are printed.

Prints one table, a column per size: p50 unless said, milliseconds unless said, and each
figure's ratio to the first size's in brackets. "ticketd / bare" is drop-to-done over bare
git + the agent process (the daemon runs that agent too), then over bare git alone, and the
same for CPU. Asserts nothing.

    python bench/scale.py [--sizes 0,100,1000,10000] [--folder done|todo] [--runs 10000]
                          [--rounds 30] [--idle 2] [--deadline 60] [--keep]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
from overhead import bare_git, git_version, problems
from pickup_latency import FirstSeen, percentile, tickets_in
from project import PY, TREE, backlog_task, daemon_env, make_project, run_in_tempdir, stop
from watchdog.observers import Observer

sys.path.insert(0, str(TREE))  # this tree's daemon/, as the daemon the bench starts
from daemon import config as configuration
from daemon.backlog import Backlog
from daemon.board import folder_statuses
from daemon.failures import iso
from daemon.files import fsync_dir
from daemon.store import Store

STAGES = ("worktree", "agent", "changes", "paths", "secrets", "commit", "push")
BENCH_IDS = 1_000_000  # the bench's own tickets are task-1000001 on, past any seeded id
DAY = 86400.0


def done_task(n: int) -> tuple[str, str]:
    """Seeded ticket ``task-<n>`` as it sits in done/: (file name, text)."""
    rng = random.Random(n)
    created = datetime(2025, 1, 1) + timedelta(minutes=37 * n)
    return backlog_task(n, "Done", rng, created.strftime("%Y-%m-%d %H:%M"))


def waiting_task(n: int) -> tuple[str, str]:
    """Seeded ticket ``task-<n>`` as it waits in todo/ for ``task-0``, which never comes."""
    rng = random.Random(n)
    created = datetime(2025, 1, 1) + timedelta(minutes=37 * n)
    name, text = backlog_task(n, "To Do", rng, created.strftime("%Y-%m-%d %H:%M"))
    return name, text.replace("dependencies: []", "dependencies:\n  - task-0", 1)


def title_of(name: str) -> str:
    return name.removesuffix(".md").split(" - ", 1)[1].replace("-", " ")


def seed_history(db: Path, runs: int, snapshot: dict[str, object]) -> None:
    """``runs`` done runs of task-1 .. task-<runs>, each recorded through ``Store`` as
    daemon/runner.py records one, started over the last 90 days."""
    rng = random.Random(0)
    now = datetime.now(UTC)
    db.parent.mkdir(parents=True, exist_ok=True)
    store = Store(db)
    try:
        for n in range(1, runs + 1):
            name = done_task(n)[0]
            at = now - timedelta(days=90 * (runs - n) / runs)
            branch = f"ticketd/task-{n}-{title_of(name).lower().replace(' ', '-')}"
            run_id = store.start_run(
                uuid.uuid4().hex, name, f"task-{n}", title_of(name), iso(at), snapshot,
                branch=branch,
            )  # fmt: skip
            store.set_labels(run_id, rng.sample(("backend", "cli", "docs", "tests"), 1))
            total = 0.0
            for stage in STAGES:
                took = rng.uniform(0.005, 0.05)
                store.start_stage(run_id, stage, iso(at + timedelta(seconds=total)))
                store.end_stage(run_id, stage, took, "ok")
                total += took
            store.record_calls(run_id, [], quality=None, outcomes={})
            end = at + timedelta(seconds=total)
            store.finish_run(run_id, iso(end), "done", total + 0.003, branch=branch)
    finally:
        store.close()


def fill(folder: Path, size: int, tasks: list[tuple[str, str]]) -> None:
    """``folder`` holds exactly the seeded task-1 .. task-<size>, each with an mtime in the
    last 20 days (inside the duplicate window)."""
    wanted = {name: text for name, text in tasks[:size]}
    for name in os.listdir(folder):
        if name not in wanted:
            (folder / name).unlink()
    present = set(os.listdir(folder))
    rng = random.Random(size)
    now = time.time()
    for name, text in wanted.items():
        path = folder / name
        if name not in present:
            path.write_text(text)
        when = now - rng.uniform(0, 20 * DAY)
        os.utime(path, (when, when))


def raw_claim(base: Path, name: str, text: str) -> float:
    """Seconds for one claim's file operations done directly (see the module's doc)."""
    todo, running = base / "todo", base / "in-progress"
    (todo / name).write_text(text)
    lock = base / ".leases" / f"{name}.lock"
    start = time.perf_counter()
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert os.fstat(fd).st_ino == os.stat(lock).st_ino
    os.rename(todo / name, running / name)
    fsync_dir(running)
    info = {"ticket": name, "pid": os.getpid(), "claimId": uuid.uuid4().hex, "stage": "claimed"}
    data = json.dumps(info, sort_keys=True).encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))
    path = running / name
    new = path.read_text().replace("status: To Do", "status: In Progress", 1)
    tmp = running / f".{name}.tmp-bench"
    with tmp.open("w") as f:
        f.write(new)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(running)
    took = time.perf_counter() - start
    lock.unlink()
    os.close(fd)
    path.unlink()
    return took


def daemon_claim(backlog: Backlog, name: str, text: str) -> float:
    """Seconds for one ``Backlog.claim`` of daemon/backlog.py, in this process."""
    (backlog.folder("todo") / name).write_text(text)
    start = time.perf_counter()
    lease = backlog.claim(name, datetime.now(UTC), uuid.uuid4().hex)
    took = time.perf_counter() - start
    assert lease is not None
    backlog.release(lease)
    lease.path.unlink()
    return took


class ClaimOps:
    """The claim's own file operations, raw and through ``Backlog.claim``, in this process on
    the daemon's filesystem, outside its backlog."""

    def __init__(self, root: Path, statuses: dict[str, str]) -> None:
        self.raw, self.ours = root / "claim-raw", Backlog(root / "claim-daemon", statuses)
        for folder in ("todo", "in-progress", ".leases"):
            (self.raw / folder).mkdir(parents=True, exist_ok=True)
        self.ours.ensure()

    def once(self, i: int) -> dict[str, float]:
        rng = random.Random(BENCH_IDS * 2 + i)
        name, text = backlog_task(BENCH_IDS - 1 - i, "To Do", rng, "2026-01-01 09:00")
        return {
            "raw claim": raw_claim(self.raw, name, text),
            "daemon claim": daemon_claim(self.ours, name, text),
        }


def cpu_s(proc: psutil.Process) -> float:
    """User + system seconds of ``proc`` and its reaped children."""
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def vm_hwm_mb(pid: int) -> float:
    """Peak resident set size of ``pid`` in MB (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return math.nan


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def wait_until(test: Callable[[], bool], deadline_s: float, step: float = 0.002) -> bool:
    until = time.monotonic() + deadline_s
    while not test():
        if time.monotonic() > until:
            return False
        time.sleep(step)
    return True


class Size:
    """One size's daemon, its rounds and what they measured."""

    def __init__(self, root: Path, config: Path, args: argparse.Namespace, ops: ClaimOps) -> None:
        self.root, self.config, self.args, self.ops = root, config, args, ops
        self.backlog = root / "backlog"
        self.staging = root / "staging"
        self.staging.mkdir(exist_ok=True)
        self.figures: dict[str, list[float]] = {}
        self.lost: list[str] = []  # tickets that did not reach done/ in time, or not done
        self.cond = threading.Condition()
        self.seen: dict[str, dict[str, float]] = {"event": {}, "claim": {}, "done": {}}

    def add(self, key: str, value: float) -> None:
        self.figures.setdefault(key, []).append(value)

    def stat(self, key: str, how: str) -> float:
        return stat(self.figures.get(key, []), how)

    def start(self, out_path: Path) -> tuple[subprocess.Popen[bytes], float]:
        """The daemon, and seconds until it said "watching"."""
        with out_path.open("wb") as out:
            daemon = subprocess.Popen(
                [PY, "-m", "daemon", "run", "--config", str(self.config)], cwd=TREE,
                env=daemon_env(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        started = time.monotonic()
        while "watching" not in out_path.read_text(errors="replace"):
            if daemon.poll() is not None or time.monotonic() - started > 120:
                sys.exit("daemon did not start:\n" + out_path.read_text(errors="replace"))
            time.sleep(0.005)
        return daemon, time.monotonic() - started

    def ticket_a(self, n: int, proc: psutil.Process, store: Store) -> dict[str, float] | None:
        """Drop ticket ``task-<n>`` and wait until it is done: its figures, or None."""
        deadline = self.args.deadline
        running = self.backlog / "in-progress"
        idle = wait_until(lambda: not tickets_in(running) and not proc.children(), deadline)
        if not idle:
            self.lost.append(f"task-{n}: the daemon was still busy before the drop")
        name, text = backlog_task(n, "To Do", random.Random(n), "2026-01-01 09:00")
        part = self.staging / f".{name}.part"
        part.write_text(text)
        t0 = time.monotonic()
        os.rename(part, self.backlog / "todo" / name)
        with self.cond:
            arrived = self.cond.wait_for(lambda: name in self.seen["done"], deadline)
        if not arrived:
            self.lost.append(f"task-{n}: not in done/ after {deadline:g}s")
            return None
        run: dict[str, Any] = {}

        def finished() -> bool:
            runs = store.runs_of(name)
            run.update(runs[-1] if runs else {})
            return run.get("outcome") not in (None, "running")

        if not wait_until(finished, deadline, 0.005) or run["outcome"] != "done":
            self.lost.append(f"task-{n}: run {run.get('outcome')} in the history")
            return None
        return {
            "event": self.seen["event"].get(name, math.nan) - t0,
            "pickup": self.seen["claim"].get(name, math.nan) - t0,
            "drop to done": self.seen["done"][name] - t0,
            "claim to done": float(run["duration_s"]),
        }

    def ticket_b(self, n: int) -> dict[str, float]:
        before = children_cpu_s()
        times = bare_git(self.root / "repo", self.root, n)
        cpu = children_cpu_s() - before
        return {"bare git": times["bare total"], "agent alone": times["agent process alone"],
                "bare cpu": cpu}  # fmt: skip

    def run(self, size: int, next_id: Callable[[], int]) -> str:
        """Start a daemon, idle, a cold round, the rounds, stop; returns its report line."""
        args = self.args
        out_path = self.root / f"daemon-{size}.out"
        daemon, startup = self.start(out_path)
        proc = psutil.Process(daemon.pid)
        self.add("startup", startup)
        cpu0 = cpu_s(proc)
        time.sleep(args.idle)
        self.add("idle cpu", (cpu_s(proc) - cpu0) / args.idle)
        self.add("idle rss", proc.memory_info().rss / 2**20)

        logging.getLogger("watchdog.observers.inotify").setLevel(logging.CRITICAL)
        observer = Observer()
        for key, folder in (("event", "todo"), ("claim", "in-progress"), ("done", "done")):
            handler = FirstSeen(self.backlog / folder, self.seen[key], self.cond)
            observer.schedule(handler, str(self.backlog), recursive=True)
        observer.start()
        store = Store(self.root / "state" / "history.sqlite3")
        try:
            for i in range(args.rounds + 1):
                n = next_id()
                cpu0 = cpu_s(proc)
                a = self.ticket_a(n, proc, store)
                self.add("rss", proc.memory_info().rss / 2**20)
                b = self.ticket_b(n)
                cpu = cpu_s(proc) - cpu0
                c = self.ops.once(n)
                if a is None:
                    continue
                prefix = "cold " if i == 0 else ""
                for key, value in (*a.items(), *b.items(), *c.items(), ("cpu", cpu)):
                    self.add(prefix + key, value)
            self.add("peak rss", vm_hwm_mb(daemon.pid))
        finally:
            store.close()
            observer.stop()
            observer.join()
            code = stop(daemon)
        bad = problems(out_path.read_text(errors="replace"))
        lines = [f"  size {size}: daemon exit status {code} after SIGTERM; {len(self.lost)}"
                 f" ticket(s) lost; {len(bad)} other line(s) in its output"]  # fmt: skip
        lines += [f"    {x}" for x in self.lost[:5] + bad[:5]]
        return "\n".join(lines)


# (label, figure, statistic, scale): statistic p50, p90, mean, max or first
ROWS: list[tuple[str, str, str, float]] = [
    ("start-up until 'watching', ms", "startup", "first", 1000),
    ("idle RSS, MB", "idle rss", "first", 1),
    ("idle CPU, ms per s", "idle cpu", "first", 1000),
    ("cold: pickup of the first ticket, ms", "cold pickup", "first", 1000),
    ("cold: its claim to done, ms", "cold claim to done", "first", 1000),
    ("cold: its daemon CPU, ms", "cold cpu", "first", 1000),
    ("raw watchdog event p50, ms", "event", "p50", 1000),
    ("claim file ops, raw p50, ms", "raw claim", "p50", 1000),
    ("claim file ops, Backlog.claim p50, ms", "daemon claim", "p50", 1000),
    ("pickup p50, ms", "pickup", "p50", 1000),
    ("pickup p90, ms", "pickup", "p90", 1000),
    ("claim to done p50 (history), ms", "claim to done", "p50", 1000),
    ("claim to done p90 (history), ms", "claim to done", "p90", 1000),
    ("drop to done p50 (daemon wall), ms", "drop to done", "p50", 1000),
    ("daemon CPU per ticket, mean, ms", "cpu", "mean", 1000),
    ("bare git wall p50, ms", "bare git", "p50", 1000),
    ("no-op agent process alone p50, ms", "agent alone", "p50", 1000),
    ("bare git + agent CPU, mean, ms", "bare cpu", "mean", 1000),
    ("RSS after a ticket, max, MB", "rss", "max", 1),
    ("peak RSS (VmHWM), MB", "peak rss", "first", 1),
]
# (label, numerator, denominator figures): ratios of p50s (of means for CPU)
RATIOS: list[tuple[str, tuple[str, str], tuple[tuple[str, str], ...]]] = [
    ("pickup / (event + raw claim ops)", ("pickup", "p50"),
     (("event", "p50"), ("raw claim", "p50"))),
    ("ticketd / bare, wall (git + agent)", ("drop to done", "p50"),
     (("bare git", "p50"), ("agent alone", "p50"))),
    ("ticketd / bare, wall (git alone)", ("drop to done", "p50"), (("bare git", "p50"),)),
    ("ticketd / bare, CPU (git + agent)", ("cpu", "mean"), (("bare cpu", "mean"),)),
]  # fmt: skip


def stat(values: list[float], how: str) -> float:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan
    if how == "p50":
        return statistics.median(values)
    if how == "p90":
        return percentile(values, 90)
    if how == "mean":
        return statistics.fmean(values)
    if how == "max":
        return max(values)
    return values[0]


def cells(values: list[float], unit: str = "") -> list[str]:
    """Each value, and its ratio to the first in brackets."""
    base = values[0] if values else math.nan
    out = []
    for i, v in enumerate(values):
        text = f"{v:.2f}{unit}" if unit else f"{v:.1f}"
        if i and base and not math.isnan(base) and not math.isnan(v):
            text += f" ({v / base:.2f}x)"
        out.append(text)
    return out


def print_table(folder: str, counts: list[int], results: list[Size]) -> None:
    def line(label: str, row: list[str]) -> None:
        print(f"  {label:<38}" + "".join(f"{c:>19}" for c in row))

    line(f"tickets in {folder}/", [f"{d:,}" for d in counts])
    for label, key, how, scale in ROWS:
        line(label, cells([r.stat(key, how) * scale for r in results]))
    for label, (key, how), under in RATIOS:
        values = [r.stat(key, how) / sum(r.stat(k, h) for k, h in under) for r in results]
        line(label, cells(values, "x"))


def bench(root: Path, args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    config = make_project(root, max_tickets=1)
    cfg = configuration.load(config)
    began = time.monotonic()
    seeded_task = done_task if args.folder == "done" else waiting_task
    tasks = [seeded_task(n) for n in range(1, max(sizes, default=0) + 1)]
    seed_history(root / "state" / "history.sqlite3", args.runs, cfg.snapshot())
    seeded = time.monotonic() - began
    ids = iter(range(BENCH_IDS, BENCH_IDS * 2))

    results, counts = [], []
    folder = root / "backlog" / args.folder
    for size in sizes:
        t = time.monotonic()
        fill(folder, size, tasks)
        filled = time.monotonic() - t
        counts.append(len(tickets_in(folder)))
        result = Size(root, config, args, ClaimOps(root, folder_statuses(cfg)))
        report = result.run(size, lambda: next(ids))
        results.append(result)
        print(f"size {size}: {args.folder}/ filled in {filled:.1f}s; daemon output in"
              f" daemon-{size}.out",
              flush=True)  # fmt: skip
        print(report, flush=True)

    store = Store(root / "state" / "history.sqlite3")
    runs_now = len(store.runs_started("0"))
    store.close()
    waits = ", each waiting for task-0, which never comes" if args.folder == "todo" else ""
    print(f"method: sizes {args.sizes} tickets in {args.folder}/ (Backlog.md task files, mtimes"
          f" in the duplicate window{waits}), {args.runs:,} runs seeded in the history in"
          f" {seeded:.1f}s"
          f" ({runs_now:,} at the end); per size one daemon (max_tickets 1, no-op agent,"
          f" defaults), a cold round then {args.rounds} rounds of A (a ticket dropped into"
          f" todo/ until done/) B (bare git + the agent process); git {git_version()},"
          f" {os.cpu_count()} cpus, python {sys.version.split()[0]}, daemon from"
          f" {TREE}")  # fmt: skip
    print("figures p50 unless said; in brackets: ratio to the first size")
    print_table(args.folder, counts, results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0,100,1000,10000", help="seeded tickets, in order")
    ap.add_argument("--folder", choices=("done", "todo"), default="done",
                    help="where the seeded tickets sit: done/, or todo/ waiting for a"
                    " ticket that never comes")  # fmt: skip
    ap.add_argument("--runs", type=int, default=10_000, help="runs seeded in the history")
    ap.add_argument("--rounds", type=int, default=30, help="A, B, C rounds per size")
    ap.add_argument("--idle", type=float, default=2.0, help="seconds idle before the idle RSS")
    ap.add_argument("--deadline", type=float, default=60.0, help="seconds to wait per ticket")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    run_in_tempdir("ticketd-scale-", args, lambda root: bench(root, args))


if __name__ == "__main__":
    main()
