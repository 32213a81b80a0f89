"""Faults met on real daemons that must degrade, never kill: a corrupt history, a flood of idle
connections, a wall clock that steps back."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import PY, Project, captured_log, ticketd, wait_until
from prometheus_client import CollectorRegistry
from test_retry import NOW, POLICY, record, write_failed
from test_server import get

from daemon import failures
from daemon.errors import HistoryUnavailable
from daemon.server import MAX_CONNECTIONS, Probes, Server
from daemon.store import Store

AT = "2026-11-22T10:00:00Z"
ASIDE = re.compile(r"history\.sqlite3\.corrupt-\d{8}T\d{6}Z")

# -- a corrupt history -----------------------------------------------------------------------


def real_history(path: Path, runs: int = 200) -> bytes:
    """The bytes of a history with ``runs`` finished runs (closed: no WAL left)."""
    store = Store(path)
    for i in range(runs):
        run = store.start_run(f"c{i}", f"task-{i} - X.md", f"task-{i}", "X", AT, {"pad": "x" * 500})
        store.finish_run(run, AT, "done", 1.0)
    store.close()
    data = path.read_bytes()
    path.unlink()
    return data


def damaged(kind: str, scratch: Path) -> bytes:
    if kind == "garbage":
        return random.Random(7).randbytes(20_000)
    if kind == "zeros":
        return bytes(16_384)
    data = real_history(scratch / "real.sqlite3")
    if kind == "truncated":
        return data[: len(data) // 2]
    page = 4096  # one b-tree page in the middle: only a check of the whole file finds it
    middle = len(data) // page // 2 * page
    return data[:middle] + random.Random(7).randbytes(page) + data[middle + page :]


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """The messages logged at WARNING and above while the test runs."""
    with captured_log("WARNING", "{message}") as found:
        yield found


@pytest.mark.parametrize("kind", ["garbage", "truncated", "zeros", "damaged page"])
def test_a_corrupt_history_is_moved_aside_and_a_fresh_one_started(
    tmp_path: Path, kind: str, logged: list[str]
) -> None:
    path = tmp_path / "state" / "history.sqlite3"
    path.parent.mkdir()
    bad = damaged(kind, tmp_path)
    path.write_bytes(bad)
    (path.parent / "history.sqlite3-wal").write_bytes(b"old wal")
    (path.parent / "history.sqlite3-shm").write_bytes(b"old shm")

    store = Store(path)
    try:
        aside = store.recovered_from
        assert aside is not None and aside.parent == path.parent and ASIDE.fullmatch(aside.name)
        assert aside.read_bytes() == bad
        assert (path.parent / f"{aside.name}-wal").read_bytes() == b"old wal"
        assert (path.parent / f"{aside.name}-shm").exists()  # an index SQLite rebuilds at will
        assert [m for m in logged if str(aside) in m and "moved it aside" in m], logged

        run = store.start_run("c1", "task-1 - Fresh.md", "task-1", "Fresh", AT, {})
        store.finish_run(run, AT, "done", 2.0)
        assert [r["ticket"] for r in store.recent()] == ["task-1 - Fresh.md"]
    finally:
        store.close()
    again = Store(path)  # the fresh history opens as it is
    assert again.recovered_from is None and len(again.recent()) == 1
    again.close()


def test_two_stores_opening_a_corrupt_history_at_once_move_it_aside_once(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    path.write_bytes(bytes(16_384))
    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda _: Store(path), range(4)))
    try:
        assert len([s for s in stores if s.recovered_from is not None]) == 1
        assert len([p for p in tmp_path.iterdir() if ASIDE.fullmatch(p.name)]) == 1
        stores[0].start_run("c1", "task-1 - Shared.md", "task-1", "Shared", AT, {})
        assert all("task-1 - Shared.md" in s.running() for s in stores)
    finally:
        for s in stores:
            s.close()


def test_a_sound_history_is_kept(tmp_path: Path, logged: list[str]) -> None:
    path = tmp_path / "history.sqlite3"
    path.write_bytes(real_history(path, runs=3))
    store = Store(path)
    assert store.recovered_from is None and len(store.recent()) == 3
    store.close()
    assert logged == [] and not [p for p in tmp_path.iterdir() if ASIDE.fullmatch(p.name)]


# Root reads any file; without these capabilities it meets permissions as anyone does.
DROP = "-dac_override,-dac_read_search"
AS_ANYONE = ["setpriv", f"--inh-caps={DROP}", f"--bounding-set={DROP}"] if os.geteuid() == 0 else []


@pytest.mark.skipif(AS_ANYONE != [] and not shutil.which("setpriv"), reason="needs setpriv")
def test_an_unreadable_history_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    path.write_bytes(real_history(path, runs=1))
    path.chmod(0)
    script = (
        "import sys; from pathlib import Path; from daemon.store import Store; "
        "s = Store(Path(sys.argv[1])); print(s.recovered_from.name, len(s.recent()))"
    )
    result = subprocess.run(
        [*AS_ANYONE, PY, "-c", script, str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    name, runs = result.stdout.split()
    assert ASIDE.fullmatch(name) and runs == "0" and "permission denied" in result.stderr
    tmp_path.chmod(0o500)  # and where nothing can be moved aside: a clear error
    try:
        result = subprocess.run(
            [*AS_ANYONE, PY, "-c", script, str(tmp_path / name)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        tmp_path.chmod(0o700)
    assert result.returncode == 1, result.stderr
    assert "HistoryUnavailable" in result.stderr and "no fresh history can" in result.stderr


def test_a_history_that_cannot_be_created_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where the state folder should be\n")
    with pytest.raises(HistoryUnavailable, match="cannot create its folder"):
        Store(tmp_path / "blocker" / "history.sqlite3")
    (tmp_path / "history.sqlite3").mkdir()  # not a file at all: nothing to move aside
    with pytest.raises(HistoryUnavailable, match="cannot open the history"):
        Store(tmp_path / "history.sqlite3")


def test_status_on_a_corrupt_history_works_and_moves_it_aside(project: Project) -> None:
    state = project.root / "state"
    state.mkdir()
    (state / "history.sqlite3").write_bytes(b"this is not a database\n" * 100)
    result = ticketd("status", "--json", "--config", str(project.config_path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["recent"] == []
    asides = [p.name for p in state.iterdir() if ASIDE.fullmatch(p.name)]
    assert len(asides) == 1 and asides[0] in result.stderr and "moved it aside" in result.stderr
    assert ticketd("status", "--config", str(project.config_path)).returncode == 0


# -- a flood of connections ------------------------------------------------------------------

# A server in a child process whose descriptors are limited to 256; it runs until stdin ends.
CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from prometheus_client import CollectorRegistry
from daemon.server import Probes, Server
ok = lambda: (200, {"ok": True})
server = Server("127.0.0.1", 0, Probes(ok, ok, ok, ok), CollectorRegistry())
server.start()
print(server.url, flush=True)
sys.stdin.read()
server.stop()
"""


def ok() -> tuple[int, dict[str, Any]]:
    return 200, {"ok": True}


@pytest.fixture
def server_factory() -> Iterator[Any]:
    started: list[Server] = []

    def start(**kwargs: Any) -> Server:
        probes = kwargs.pop("probes", Probes(ok, ok, ok, ok))
        server = Server("127.0.0.1", 0, probes, CollectorRegistry(), **kwargs)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def closed_by_peer(sock: socket.socket) -> bool:
    """Has the other end closed (or reset) this connection? Waits at most 10 s."""
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_idle_connections_cannot_exhaust_the_servers_descriptors() -> None:
    with subprocess.Popen(
        [PY, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdin is not None and child.stdout is not None
        try:
            url = child.stdout.readline().strip()
            assert url.startswith("http://"), "the server did not start"
            idle: list[socket.socket] = []
            try:
                for _ in range(400):
                    idle.append(socket.create_connection(address(url), timeout=10))
                assert get(url + "/health") == (200, '{"ok": true}')  # within get's 10 s timeout
                assert child.poll() is None
                proc = psutil.Process(child.pid)
                wait_until(
                    lambda: proc.num_threads() <= MAX_CONNECTIONS + 4,
                    what="at most one thread per connection",
                )
                assert proc.num_fds() < 256
            finally:
                for sock in idle:
                    sock.close()
            assert get(url + "/metrics")[0] == 200 and child.poll() is None
        finally:
            child.stdin.close()
            child.wait(timeout=30)
    assert child.returncode == 0


def test_an_idle_connection_is_closed_after_the_read_timeout(server_factory: Any) -> None:
    server = server_factory(read_timeout_s=0.3)
    with socket.create_connection(address(server.url), timeout=10) as sock:
        assert closed_by_peer(sock)
    with socket.create_connection(address(server.url), timeout=10) as sock:  # slow, then silent
        sock.sendall(b"GET /health HTTP/1.0\r\n")
        assert closed_by_peer(sock)
    assert get(server.url + "/health")[0] == 200


def test_at_the_limit_the_oldest_idle_connection_makes_room(server_factory: Any) -> None:
    server = server_factory(max_connections=2)
    with (
        socket.create_connection(address(server.url), timeout=10) as oldest,
        socket.create_connection(address(server.url), timeout=10) as newer,
    ):
        assert get(server.url + "/health")[0] == 200
        assert closed_by_peer(oldest)
        newer.sendall(b"GET /ready HTTP/1.0\r\n\r\n")
        newer.settimeout(10)
        assert newer.recv(100).startswith(b"HTTP/1.0 200")


def test_when_every_connection_is_answered_a_new_one_gets_503(server_factory: Any) -> None:
    release, inside = threading.Event(), threading.Semaphore(0)

    def slow() -> tuple[int, dict[str, Any]]:
        inside.release()
        release.wait(30)
        return ok()

    server = server_factory(max_connections=2, probes=Probes(slow, ok, ok, ok))
    with ThreadPoolExecutor(2) as pool:
        try:
            answers = [pool.submit(get, server.url + "/health") for _ in range(2)]
            for _ in range(2):
                assert inside.acquire(timeout=10), "the probes were not called"
            assert get(server.url + "/ready") == (503, '{"error": "busy"}')
        finally:
            release.set()
        assert [a.result(timeout=10)[0] for a in answers] == [200, 200]
    assert get(server.url + "/ready")[0] == 200


# -- a clock that steps back -----------------------------------------------------------------


def test_a_retry_due_a_day_ahead_means_the_clock_stepped_back() -> None:
    ahead = record(due_in=timedelta(days=1))
    ok, why, exhausted = failures.eligibility(ahead, "abc", NOW, POLICY)
    assert ok and not exhausted and "clock stepped back" in why
    soon = record(due_in=timedelta(minutes=10))
    assert failures.eligibility(soon, "abc", NOW, POLICY)[:2] == (
        False,
        f"backing off until {failures.iso(NOW + timedelta(minutes=10))}",
    )
    longest = record(failed_ago=timedelta(0), due_in=timedelta(seconds=POLICY.backoff.max_s))
    assert failures.eligibility(longest, "abc", NOW, POLICY)[0] is False


def test_a_failure_in_the_future_never_blocks_a_retry() -> None:
    future = record(failed_ago=-timedelta(days=1), due_in=timedelta(minutes=10))
    ok, why, _ = failures.eligibility(future, "abc", NOW, POLICY)
    assert ok and "failed in the future" in why
    # the limits still hold
    spent = record(retry_count=3, failed_ago=-timedelta(days=1))
    assert failures.eligibility(spent, "abc", NOW, POLICY)[0] is False


def test_retry_failed_after_the_clock_stepped_back_a_day(project: Project) -> None:
    failed_at = datetime.now(UTC) + timedelta(days=1)  # written before the step
    stepped = {
        **record(),
        "timestamp": failures.iso(failed_at),
        "nextRetryAt": failures.iso(failed_at + timedelta(minutes=10)),
    }
    write_failed(project, "task-1 - Stepped.md", stepped)
    result = ticketd("retry-failed", "--json", "--config", str(project.config_path))
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)["tickets"][0]
    assert row["action"] == "retried" and "clock stepped back" in row["reason"]
    assert project.where() == {"todo": ["task-1 - Stepped.md"]}
