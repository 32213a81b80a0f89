"""Child processes the daemon owns.

Every child gets an argument list (never a shell), its own session and process group, a
timeout, and files for its output. To end one: SIGTERM to its group and to every
descendant (some leave the group), a bounded wait, then SIGKILL to whatever remains.

The daemon is its children's subreaper (``adopt_orphans``): a descendant that escapes its
group with ``setsid`` and is orphaned is re-parented to the daemon instead of init, and
``end_strays`` ends every child the daemon did not start itself. Every start goes through
``_spawn``, which records the child under the same lock ``end_strays`` holds, so a child
being started is never taken for a stray.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil

POLL_S = 0.05
TAIL_BYTES = 4000
KEPT_TAIL = 64 * 1024  # bytes of the newest output kept when output is cut (procs.run)
_PR_SET_DUMPABLE = 4
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37

_started: set[int] = set()  # pids this process started: mirrors the kernel's table of our children
_started_lock = threading.Lock()


@dataclass(frozen=True)
class Result:
    returncode: int | None
    timed_out: bool
    cancelled: bool
    duration_s: float
    out_of_memory: bool = False


@dataclass(frozen=True)
class Captured:
    returncode: int | None  # None: ended for its timeout or a cancel
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    cancelled: bool = False


def harden_self() -> None:
    """For the daemon, once at start: other processes of the same user may not read its
    memory or ``/proc/<pid>/environ`` (non-dumpable); orphaned descendants come back to it
    (subreaper); and as many file descriptors as the hard limit allows."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _spawn(argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
    with _started_lock:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(list(argv), start_new_session=True, **kwargs)  # type: ignore[call-overload]
        _started.add(proc.pid)
    return proc  # type: ignore[no-any-return]


def _forget(pid: int) -> None:
    with _started_lock:
        _started.discard(pid)


def end_strays(grace_s: float) -> int:
    """End the daemon's children it did not start: descendants of finished runs that
    escaped their group and were orphaned to it. Reaps their zombies. Returns how many.
    Nothing to do in a process that is not a subreaper (``harden_self``): its orphans go to
    init, and its children are its own business."""
    flag = ctypes.c_int(0)
    ctypes.CDLL(None, use_errno=True).prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0)
    if not flag.value:
        return 0
    with _started_lock:
        try:
            children = psutil.Process().children()
        except psutil.Error:
            return 0
        strays = [c for c in children if c.pid not in _started]
    ended = 0
    for proc in strays:
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE:
                ended += terminate([proc, *proc.children(recursive=True)], grace_s)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(proc.pid, os.WNOHANG)
    return ended


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
    filter: Callable[[str], str] | None = None,
    max_output: int = 0,
) -> Result:
    """Run ``argv`` to completion, its stdout and stderr appended to ``output`` (through
    ``filter``, a chunk of whole lines at a time, when given; at most ``max_output`` bytes
    of it when given, the rest read and dropped with a note of how much).

    Ends the whole process tree when ``timeout_s`` passes, ``cancel`` is set, or (with
    ``max_memory_mb``) the tree's resident memory grows past it (checked each second). Raises
    ``FileNotFoundError``/``PermissionError`` when the program cannot be started.
    """
    start = time.monotonic()
    output.parent.mkdir(parents=True, exist_ok=True)
    exited = threading.Event()
    pump: threading.Thread | None = None
    if filter is None and not max_output:
        with output.open("ab") as out:
            proc = _spawn(argv, cwd=cwd, env=_env(env), stdout=out, stderr=subprocess.STDOUT)
    else:
        proc = _spawn(
            argv, cwd=cwd, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert proc.stdout is not None
        pump = threading.Thread(
            target=_pump,
            args=(proc.stdout.fileno(), output, filter or str, exited, max_output),
            name="agent-output",
            daemon=True,
        )
        pump.start()
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
        _forget(proc.pid)
        exited.set()
        if pump is not None:
            pump.join()
            assert proc.stdout is not None
            proc.stdout.close()


def _pump(
    fd: int, output: Path, filter: Callable[[str], str], done: threading.Event, limit: int
) -> None:
    """Copy a child's output into ``output``, whole lines at a time through ``filter``. With
    ``limit``, keep its first ``limit`` bytes and its last lines (``KEPT_TAIL`` bytes): what
    comes between is dropped with a note of how much. Stops at end of file, or once ``done``
    is set and nothing more comes (a stray process may hold the pipe open)."""
    pending, kept, dropped = b"", 0, 0
    tail = b""  # the newest output past the limit

    def write(data: bytes) -> None:
        out.write(filter(data.decode("utf-8", "replace")).encode())
        out.flush()

    def take(data: bytes) -> None:
        nonlocal kept, dropped, tail
        if not limit or (not tail and kept + len(data) <= limit):  # once past it, all is tail
            kept += len(data)
            write(data)
            return
        tail += data
        if len(tail) > KEPT_TAIL:
            cut = tail.find(b"\n", len(tail) - KEPT_TAIL) + 1 or len(tail) - KEPT_TAIL
            dropped, tail = dropped + cut, tail[cut:]

    with output.open("ab") as out:
        while True:
            ready, _, _ = select.select([fd], [], [], 0.2)
            chunk = os.read(fd, 65536) if ready else b""
            if not chunk and (ready or done.is_set()):
                break
            pending += chunk
            cut = pending.rfind(b"\n") + 1
            if cut == 0 and len(pending) < 1 << 20:
                continue
            cut = cut or len(pending)
            take(pending[:cut])
            pending = pending[cut:]
        take(pending)
        if dropped:
            out.write(f"\n[ticketd: {dropped} bytes of output not kept]\n".encode())
        if tail:
            write(tail)


def capture(
    argv: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float,
    cancel: threading.Event | None = None,
    input: bytes | None = None,
    grace_s: float = 2.0,
) -> Captured:
    """Run a short command to completion and return its exit status and output; ended (its
    whole tree) when ``timeout_s`` passes or ``cancel`` is set. Raises ``OSError`` when it
    cannot be started."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = _spawn(
            argv,
            cwd=cwd,
            env=_env(env),
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
        try:
            if input is not None:
                assert proc.stdin is not None
                with contextlib.suppress(BrokenPipeError), proc.stdin:
                    proc.stdin.write(input)
            deadline = time.monotonic() + timeout_s
            code: int | None = None
            while code is None:
                try:
                    code = proc.wait(timeout=max(0.0, min(POLL_S, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    cancelled = cancel is not None and cancel.is_set()
                    if cancelled or time.monotonic() >= deadline:
                        end_tree(proc.pid, grace_s)
                        proc.wait()
                        return Captured(None, _read(out), _read(err), not cancelled, cancelled)
        finally:
            if proc.returncode is None:
                end_tree(proc.pid, grace_s=0)
                proc.wait()
            _forget(proc.pid)
        return Captured(code, _read(out), _read(err))


def _read(f: IO[bytes]) -> bytes:
    f.seek(0)
    return f.read()


def _env(env: Mapping[str, str] | None) -> dict[str, str] | None:
    return dict(env) if env is not None else None


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


def find_program(name: str, path: str | None, cwd: Path) -> str | None:
    """Where program ``name`` is on ``path`` (a name with a "/" is taken relative to
    ``cwd``; an absolute one as it is); None when it is not there."""
    if "/" in name:
        candidate = cwd / name
        return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None
    return shutil.which(name, path=path if path is not None else os.defpath)


def tail(path: Path, limit: int = TAIL_BYTES, *, start: int = 0) -> str:
    """The last ``limit`` bytes of a file (from offset ``start`` on) as text; empty when
    missing."""
    try:
        with path.open("rb") as f:
            f.seek(max(start, f.seek(0, os.SEEK_END) - limit))
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
