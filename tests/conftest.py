"""Shared fixtures: a real git repository with a bare remote, a backlog, a config.

Agents in these tests are small Python programs run through ``agent.command`` exactly as a
user's aider would be.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest
import yaml
from fake_github import fake_github  # noqa: F401  (the fixture)
from fake_ollama import fake_ollama  # noqa: F401  (the fixture)

if TYPE_CHECKING:
    from daemon.supervisor import Supervisor

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PY = sys.executable

# An agent that writes <ticket id>.txt into the worktree.
WRITE_AGENT = [
    PY,
    "-c",
    "import sys, pathlib; pathlib.Path(sys.argv[1] + '.txt').write_text('done by agent\\n')",
    "{ticket_id}",
]


# For tests whose agent or checks leave a note outside their checkout (the test's side
# channel: a file of starts, a marker): the sandbox would hide it. Tests of the sandbox
# itself are in test_sandbox.py and test_contain.py.
SIDE_CHANNEL = {"sandbox": "off"}


# The real Backlog.md CLI, pinned; installed from npm into the virtualenv on first use.
BACKLOG_MD = "backlog.md@1.52.0"


@pytest.fixture(scope="session")
def backlog_cli() -> Path:
    """The ``backlog`` program of Backlog.md, installed with npm when it is not there yet
    (a fresh checkout's first test run). Without npm the tests that need it skip saying so,
    except in CI, where that is a failure."""
    home = Path(sys.prefix) / BACKLOG_MD.replace("@", "-")
    program = home / "node_modules" / ".bin" / "backlog"
    if program.exists():
        return program
    npm = shutil.which("npm")
    if npm is None:
        why = "npm is not installed: the tests that drive the real Backlog.md CLI need it"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    done = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--prefix", str(home), BACKLOG_MD],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0 or not program.exists():
        pytest.fail(f"npm install {BACKLOG_MD} failed:\n{done.stdout}\n{done.stderr}")
    return program


@contextlib.contextmanager
def small_disk(folder: Path) -> Iterator[None]:
    """A 256 KiB tmpfs mounted on ``folder`` (to fill it up), unmounted after; skips where
    that cannot be done (it needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write into ``folder`` until its file system is full; returns the file to remove."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as f, pytest.raises(OSError):
        while True:
            f.write(b"\0" * 4096)
    return filler


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True, timeout=60
    ).stdout.strip()


@dataclass
class Project:
    root: Path
    repo: Path
    remote: Path
    config_path: Path

    @property
    def backlog(self) -> Path:
        return self.root / "backlog"

    def folder(self, name: str) -> Path:
        return self.backlog / name

    def write_config(self, **sections: Any) -> Path:
        data: dict[str, Any] = {
            "repo": {"path": "repo", "push_retries": 0},
            "backlog": {"dir": "backlog"},
            "state_dir": "state",
            "logging": {"dir": "logs", "level": "DEBUG"},
            "agent": {"command": WRITE_AGENT, "timeout_s": 30, "kill_grace_s": 1},
            "intake": {"reconcile_interval_s": 5, "settle_s": 0.2},
            "shutdown": {"grace_s": 5},
        }
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        self.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        return self.config_path

    def ticket(self, name: str, *, folder: str = "todo", body: str = "", **fm: Any) -> Path:
        """Write a Backlog.md ticket; ``name`` like 'task-1 - Do-it.md'."""
        fm.setdefault("id", name.split(" - ")[0])
        fm.setdefault("title", name.split(" - ", 1)[-1].removesuffix(".md").replace("-", " "))
        fm.setdefault("status", "To Do")
        text = "---\n" + yaml.safe_dump(fm, sort_keys=False) + "---\n\n## Description\n\n"
        text += (body or f"Do {fm['title']}.") + "\n"
        path = self.folder(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{name}.part"
        tmp.write_text(text)
        tmp.rename(path)
        return path

    def where(self) -> dict[str, list[str]]:
        """Ticket files by folder."""
        found: dict[str, list[str]] = {}
        for folder in ("todo", "in-progress", "review", "done", "failed"):
            d = self.folder(folder)
            names = (
                sorted(p.name for p in d.glob("*.md") if not p.name.startswith("."))
                if d.is_dir()
                else []
            )
            if names:
                found[folder] = names
        return found

    def remote_branches(self) -> list[str]:
        out = git(self.remote, "for-each-ref", "--format=%(refname:short)", "refs/heads/")
        return sorted(out.split())


@pytest.fixture
def project(tmp_path: Path) -> Project:
    repo, remote = tmp_path / "repo", tmp_path / "remote.git"
    git(tmp_path, "init", "--quiet", "--bare", "-b", "main", str(remote))
    git(tmp_path, "init", "--quiet", "-b", "main", str(repo))
    git(repo, "config", "user.email", "test@example.invalid")
    git(repo, "config", "user.name", "Test")
    (repo / "README.md").write_text("hello\n")
    git(repo, "add", ".")
    git(repo, "commit", "--quiet", "-m", "initial")
    git(repo, "remote", "add", "origin", str(remote))
    git(repo, "push", "--quiet", "origin", "main")
    p = Project(root=tmp_path, repo=repo, remote=remote, config_path=tmp_path / "config.yaml")
    p.write_config()
    return p


def ticketd(
    *args: str, cwd: Path | None = None, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed CLI exactly as a user would."""
    return subprocess.run(
        [PY, "-m", "daemon", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves a thread or a child process behind."""
    threads = set(threading.enumerate())
    yield
    me = psutil.Process()
    children = [c for c in me.children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE]
    for c in children:
        c.kill()
    extra = [t for t in threading.enumerate() if t not in threads and t.is_alive()]
    for t in extra:
        t.join(timeout=5)
    extra = [t for t in extra if t.is_alive()]
    assert not children, f"child processes left running: {children}"
    assert not extra, f"threads left running: {extra}"


def wait_until(predicate: Any, timeout: float = 30, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class Daemon:
    """A real ``ticketd run`` process."""

    def __init__(self, project: Project, *args: str, name: str = "daemon") -> None:
        self.project = project
        self.output = project.root / f"{name}.out"
        with self.output.open("wb") as out:
            self.proc = subprocess.Popen(
                [PY, "-m", "daemon", "run", "--config", str(project.config_path), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_until(
            lambda: "watching" in self.text() or self.proc.poll() is not None,
            what="the daemon to start",
        )
        assert self.proc.poll() is None, self.text()

    def text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.stop()


class Running:
    """A real supervisor on a thread, stopped (as by SIGTERM) at the end."""

    def __init__(self, project: Project) -> None:
        from daemon import config as configuration
        from daemon.supervisor import Supervisor

        cfg = configuration.load(project.config_path)
        self.supervisor = Supervisor(cfg, log_to_stderr=False)
        self.thread = threading.Thread(target=self.supervisor.run)

    def __enter__(self) -> Supervisor:
        self.thread.start()
        return self.supervisor

    def __exit__(self, *exc: object) -> None:
        self.supervisor.signals = 1
        self.supervisor.wake.set()
        self.thread.join(timeout=30)


@contextlib.contextmanager
def captured_log(level: str, fmt: str) -> Iterator[list[str]]:
    """Every line logged at ``level`` and above while the block runs, formatted by ``fmt``."""
    from loguru import logger

    found: list[str] = []
    sink = logger.add(lambda m: found.append(str(m)), level=level, format=fmt)
    try:
        yield found
    finally:
        logger.remove(sink)


@contextlib.contextmanager
def notified_daemon(
    project: Project, folder: Path, **env: str
) -> Iterator[tuple[subprocess.Popen[bytes], socket.socket]]:
    """A real ``ticketd run`` whose sd_notify messages arrive on the socket yielded with it
    (as systemd's would), its output in ``folder/daemon.out``; killed if still running."""
    address = str(folder / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(30)
    with (folder / "daemon.out").open("wb") as out:
        proc = subprocess.Popen(
            [PY, "-m", "daemon", "run", "--config", str(project.config_path)],
            env={**os.environ, "NOTIFY_SOCKET": address, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        yield proc, sock
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
