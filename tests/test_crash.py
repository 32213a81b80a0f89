"""Crash safety: kill -9 at any instant loses no ticket and leaves none in two folders;
two daemons on one backlog never run a ticket twice."""

from __future__ import annotations

import random
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
from conftest import PY, SIDE_CHANNEL, Daemon, Project, wait_until

from daemon import config as configuration
from daemon.supervisor import Supervisor

FOLDERS = ("todo", "in-progress", "review", "done", "failed")


def locations(project: Project, names: list[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {n: [] for n in names}
    for folder in FOLDERS:
        d = project.folder(folder)
        for path in d.iterdir() if d.is_dir() else ():
            if path.name in found:
                found[path.name].append(folder)
    return found


def agents_alive(tag: str) -> list[psutil.Process]:
    alive = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if tag in " ".join(p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.Error:
            continue
    return alive


def counting_agent(log: Path, tag: str, sleep: float) -> list[str]:
    """Appends the ticket id to ``log`` when it starts, sleeps, then changes a file."""
    return [
        PY,
        "-c",
        (
            f"# {tag}\n"
            "import os, sys, time, pathlib\n"
            f"fd = os.open({str(log)!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT)\n"
            "os.write(fd, (sys.argv[1] + '\\n').encode()); os.close(fd)\n"
            f"time.sleep({sleep})\n"
            "pathlib.Path(sys.argv[1] + '.txt').write_text('ok')\n"
        ),
        "{ticket_id}",
    ]


@pytest.mark.slow
def test_kill_9_at_many_points_loses_nothing(project: Project, tmp_path: Path) -> None:
    tag = f"crash-agent-{tmp_path.name}"
    project.write_config(
        agent={
            "command": counting_agent(tmp_path / "starts", tag, 0.3),
            "kill_grace_s": 0.5,
            **SIDE_CHANNEL,
        },
        concurrency={"max_tickets": 2},
    )
    names = [f"task-{i} - Crash-{i}.md" for i in range(1, 11)]
    for name in names:
        project.ticket(name)
    rng = random.Random(20261122)
    for kill in range(20):
        with (tmp_path / "daemon.out").open("ab") as out:
            proc = subprocess.Popen(
                [PY, "-m", "daemon", "run", "--config", str(project.config_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        with pytest.raises(subprocess.TimeoutExpired):  # it never exits by itself
            proc.wait(timeout=rng.uniform(0.05, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        where = locations(project, names)
        assert all(len(f) == 1 for f in where.values()), f"after kill {kill}: {where}"

    cfg = configuration.load(project.config_path)
    assert Supervisor(cfg, once=True, log_to_stderr=False).run() == 0

    assert locations(project, names) == {n: ["done"] for n in names}
    assert agents_alive(tag) == [], "an agent of a killed daemon is still running"
    leftovers = [p.name for p in (project.root / "state" / "worktrees").iterdir()]
    assert leftovers == []


def test_agent_of_a_killed_daemon_is_ended_and_the_attempt_counts(
    project: Project, tmp_path: Path
) -> None:
    tag = f"orphan-agent-{tmp_path.name}"
    first = tmp_path / "first-run"
    agent = [
        PY,
        "-c",
        (
            f"# {tag}\n"
            "import pathlib, sys, time\n"
            f"p = pathlib.Path({str(first)!r})\n"
            "if not p.exists():\n"
            "    p.write_text('x'); time.sleep(600)\n"
            "sys.exit('second run fails')\n"
        ),
    ]
    project.write_config(agent={"command": agent, "kill_grace_s": 0.5, **SIDE_CHANNEL})
    name = "task-1 - Orphan.md"
    project.ticket(name)
    d = Daemon(project)
    wait_until(first.exists, what="the agent to start")
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    orphans = agents_alive(tag)
    assert orphans, "the agent should outlive a kill -9 of its daemon"
    assert project.where() == {"in-progress": [name]}

    cfg = configuration.load(project.config_path)
    assert Supervisor(cfg, once=True, log_to_stderr=False).run() == 1

    assert agents_alive(tag) == []
    assert project.where() == {"failed": [name]}
    import json

    err = json.loads((project.folder("failed") / "task-1 - Orphan.error.json").read_text())
    assert [a["errorCode"] for a in err["attempts"]] == ["INTERRUPTED", "AGENT_FAILED"]
    assert err["retryCount"] == 1


@pytest.mark.slow
def test_two_daemons_on_one_backlog_never_run_a_ticket_twice(
    project: Project, daemons: list, tmp_path: Path
) -> None:
    starts = tmp_path / "starts"
    project.write_config(
        agent={"command": counting_agent(starts, "two-daemons", 0.1), **SIDE_CHANNEL},
        concurrency={"max_tickets": 2},
    )
    names = [f"task-{i} - Shared-{i}.md" for i in range(1, 13)]
    daemons.append(Daemon(project, name="a"))
    daemons.append(Daemon(project, name="b"))
    for name in names:
        project.ticket(name)
    wait_until(lambda: project.where() == {"done": sorted(names)}, timeout=90, what="all done")
    ran = starts.read_text().split()
    assert sorted(ran) == sorted(f"task-{i}" for i in range(1, 13))
