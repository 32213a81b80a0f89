"""The daemon as a real process: intake by watchdog, half-written files, signals, reload."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psutil
from conftest import PY, SIDE_CHANNEL, Daemon, Project, wait_until


def test_ticket_written_into_todo_is_picked_up_and_done(project: Project, daemons: list) -> None:
    daemons.append(Daemon(project))
    project.ticket("task-1 - Hello.md")
    wait_until(lambda: project.where() == {"done": ["task-1 - Hello.md"]}, what="task-1 done")
    assert "ticketd/task-1-hello" in project.remote_branches()


def test_ticket_moved_in_from_elsewhere_is_picked_up(project: Project, daemons: list) -> None:
    daemons.append(Daemon(project))
    outside = project.root / "drafts"
    outside.mkdir()
    project.ticket("task-2 - Moved.md", folder="../drafts")
    os.rename(outside / "task-2 - Moved.md", project.folder("todo") / "task-2 - Moved.md")
    wait_until(lambda: project.where() == {"done": ["task-2 - Moved.md"]}, what="task-2 done")


def test_half_written_file_waits_until_closed(project: Project, daemons: list) -> None:
    daemons.append(Daemon(project))
    path = project.folder("todo") / "task-3 - Slow.md"
    with path.open("w") as f:
        f.write("---\nid: task-3\ntitle: Slow\n")
        f.flush()
        # the daemon sees the file but must not take it while it is open for writing
        wait_until(lambda: "task-3" in _status(project), what="the daemon to list task-3")
        assert path.exists(), "claimed a file that was still being written"
        f.write("status: To Do\n---\n\n## Description\n\nWritten in two parts.\n")
    wait_until(lambda: project.where() == {"done": ["task-3 - Slow.md"]}, what="task-3 done")
    done = (project.folder("done") / "task-3 - Slow.md").read_text()
    assert "Written in two parts." in done


def _status(project: Project) -> str:
    from conftest import ticketd

    return ticketd("status", "--json", "--config", str(project.config_path)).stdout


def test_hidden_temp_and_non_markdown_files_are_ignored(project: Project, daemons: list) -> None:
    daemons.append(Daemon(project))
    todo = project.folder("todo")
    for name in (".task-5 - Hidden.md", "task-6 - Notes.txt", "task-7 - Swap.md~", ".#lock.md"):
        (todo / name).write_text("---\nid: x\ntitle: x\n---\n")
    project.ticket("task-8 - Real.md")
    wait_until(lambda: project.where() == {"done": ["task-8 - Real.md"]}, what="task-8 done")
    assert sorted(p.name for p in todo.iterdir() if p.name != ".gitkeep") == sorted(
        [".task-5 - Hidden.md", "task-6 - Notes.txt", "task-7 - Swap.md~", ".#lock.md"]
    )


def _hanging_agent(project: Project, marker: Path, grace_s: float = 0.5) -> None:
    agent = [
        PY,
        "-c",
        (
            "import time, pathlib\n"
            f"pathlib.Path({str(marker)!r}).write_text('started')\n"
            "time.sleep(600)\n"
        ),
    ]
    project.write_config(
        agent={"command": agent, "timeout_s": 600, "kill_grace_s": 1, **SIDE_CHANNEL},
        shutdown={"grace_s": grace_s},
    )


def test_sigterm_ends_the_agent_and_returns_the_ticket_to_todo(
    project: Project, daemons: list, tmp_path: Path
) -> None:
    marker = tmp_path / "agent-started"
    _hanging_agent(project, marker)
    daemons.append(d := Daemon(project))
    project.ticket("task-4 - Long.md")
    wait_until(marker.exists, what="the agent to start")
    agents = _agents()
    assert agents
    running = json.loads(_status(project))["running"]
    assert [(r["taskId"], r["stage"], r["ownerAlive"]) for r in running] == [
        ("task-4", "agent", True)
    ]

    d.signal(signal.SIGTERM)

    assert d.wait(timeout=30) == 0
    assert project.where() == {"todo": ["task-4 - Long.md"]}
    for agent in agents:
        assert not agent.is_running() or agent.status() == psutil.STATUS_ZOMBIE
    text = (project.folder("todo") / "task-4 - Long.md").read_text()
    assert "status: To Do" in text


def test_second_signal_stops_at_once(project: Project, daemons: list, tmp_path: Path) -> None:
    marker = tmp_path / "agent-started"
    _hanging_agent(project, marker, grace_s=300)
    daemons.append(d := Daemon(project))
    project.ticket("task-6 - Long.md")
    wait_until(marker.exists, what="the agent to start")
    d.signal(signal.SIGTERM)
    wait_until(lambda: "stopping: waiting up to 300" in d.text(), what="the graceful stop")
    assert d.proc.poll() is None  # still waiting for the ticket

    d.signal(signal.SIGTERM)

    assert d.wait(timeout=20) == 0
    assert project.where() == {"todo": ["task-6 - Long.md"]}
    assert _agents() == []


def _agents() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "time.sleep(600)" in " ".join(p.info["cmdline"] or []) and p.status() != "zombie":
                found.append(p)
        except psutil.Error:
            continue
    return found


def test_sighup_reloads_and_keeps_the_old_config_when_the_new_one_is_bad(
    project: Project, daemons: list
) -> None:
    daemons.append(d := Daemon(project))
    good = project.config_path.read_text()
    project.config_path.write_text(good + "\nbogus_key: 1\n")
    d.signal(signal.SIGHUP)
    wait_until(lambda: "config reload refused" in d.text(), what="the refusal")
    assert "bogus_key: unknown key" in d.text()
    # still working on the old config
    project.ticket("task-5 - After-reload.md")
    wait_until(lambda: project.where() == {"done": ["task-5 - After-reload.md"]}, what="task-5")
    project.config_path.write_text(good)
    d.signal(signal.SIGHUP)
    wait_until(lambda: "configuration reloaded" in d.text(), what="the reload")
