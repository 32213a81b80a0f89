"""Child processes the daemon owns.

Every child gets an argument list (never a shell), its own session and process group, a
timeout, and files for its output. To end one: SIGTERM to its group and to every
descendant (some leave the group), a bounded wait, then SIGKILL to whatever remains.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

POLL_S = 0.05
TAIL_BYTES = 4000


@dataclass(frozen=True)
class Result:
    returncode: int | None
    timed_out: bool
    cancelled: bool
    duration_s: float
    out_of_memory: bool = False


def run(
    argv: Sequence[str],
    *,
    cwd: Path,
    timeout_s: float,
    output: Path,
    env: Mapping[str, str] | None = None,
    grace_s: float = 5.0,
    cancel: threading.Event | None = None,
    on_start: Callable[[int], None] | None = None,
    max_memory_mb: float = 0,
) -> Result:
    """Run ``argv`` to completion, its stdout and stderr appended to ``output``.

    Ends the whole process tree when ``timeout_s`` passes, ``cancel`` is set, or (with
    ``max_memory_mb``) the tree's resident memory grows past it (checked each second). Raises
    ``FileNotFoundError``/``PermissionError`` when the program cannot be started.
    """
    start = time.monotonic()
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("ab") as out:
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        if on_start is not None:
            on_start(proc.pid)
        deadline = start + timeout_s
        next_memory_check = start
        while True:
            try:
                code = proc.wait(timeout=max(0.0, min(POLL_S, deadline - time.monotonic())))
                terminate(group_members(proc.pid), grace_s)  # what it left behind
                return Result(code, False, False, time.monotonic() - start)
            except subprocess.TimeoutExpired:
                pass
            cancelled = cancel is not None and cancel.is_set()
            now = time.monotonic()
            oom = False
            if max_memory_mb and now >= next_memory_check:
                next_memory_check = now + 1.0
                oom = tree_memory_mb(proc.pid) > max_memory_mb
            if cancelled or oom or now >= deadline:
                end_tree(proc.pid, grace_s)
                proc.wait()
                timed_out = not cancelled and not oom
                return Result(None, timed_out, cancelled, time.monotonic() - start, oom)
    finally:
        if proc.returncode is None:  # an exception (StopNow) got us here: leave no orphan
            end_tree(proc.pid, grace_s=0)
            proc.wait()


def end_tree(pid: int, grace_s: float) -> int:
    """End the process ``pid`` leads: its group and all its descendants. Returns how many."""
    try:
        leader = psutil.Process(pid)
        procs = [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    procs += group_members(pid)
    return terminate(procs, grace_s)


def tree_memory_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MiB."""
    try:
        leader = psutil.Process(pid)
        procs = [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total / (1024 * 1024)


def group_members(pgid: int, marker: tuple[str, str] | None = None) -> list[psutil.Process]:
    """Live processes in process group ``pgid``; with ``marker``, only those whose
    environment holds that (name, value) pair, so a reused group id is never hit."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) != pgid:
                continue
            if marker is not None and proc.environ().get(marker[0]) != marker[1]:
                continue
            found.append(proc)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return found


def terminate(procs: Iterable[psutil.Process], grace_s: float) -> int:
    """SIGTERM each process, wait up to ``grace_s``, SIGKILL the survivors."""
    unique = {p.pid: p for p in procs}.values()
    for proc in unique:
        _signal(proc, signal.SIGTERM)
    _, alive = psutil.wait_procs(list(unique), timeout=grace_s)
    for proc in alive:
        _signal(proc, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=5)
    return len(unique)


def _signal(proc: psutil.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(psutil.Error):
        proc.send_signal(sig)


def tail(path: Path, limit: int = TAIL_BYTES) -> str:
    """The last ``limit`` bytes of a file as text (empty when missing)."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def with_env(name: str, prefix: str) -> list[psutil.Process]:
    """Live processes whose environment variable ``name`` starts with ``prefix``: the agents
    a dead daemon left behind carry the lease they ran under."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(name, "").startswith(prefix):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def resources_short(min_free_memory_mb: float, max_load: float) -> str:
    """Why not to start more work now (memory or load past the guards; 0 turns one off)."""
    if min_free_memory_mb:
        free = psutil.virtual_memory().available / (1024 * 1024)
        if free < min_free_memory_mb:
            limit = f"concurrency.min_free_memory_mb ({min_free_memory_mb:g})"
            return f"{free:.0f} MiB free, under {limit}"
    if max_load:
        load = os.getloadavg()[0]
        if load > max_load:
            return f"load {load:.2f}, over concurrency.max_load ({max_load:g})"
    return ""
