"""Never down, never stuck: signals, cancels, deadlines, reloads and faults on real daemons.

Each test drives a real ``ticketd run`` process (or ``run --once``) the way an operator or a
fault would, and checks that every ticket ends in a clear state a person can read: back in
``todo/``, in ``failed/`` with its ``.error.json``, or where the person put it; nothing
pushed that should not be; the daemon still running (or exited within its grace).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import PY, SIDE_CHANNEL, Daemon, Project, fill, git, small_disk, ticketd, wait_until
from fake_ollama import FakeOllama

MODEL = "qwen2.5-coder:7b"
HANG = [PY, "-c", "import pathlib, time; pathlib.Path('started').write_text('x'); time.sleep(600)"]


def block(path: str, search: str, replace: str) -> str:
    return f"{path}\n```\n<<<<<<< SEARCH\n{search}=======\n{replace}>>>>>>> REPLACE\n```\n"


def builtin(project: Project, fake: FakeOllama, **sections: object) -> None:
    agent = {"kind": "builtin", "max_reflections": 0, **sections.pop("agent", {})}  # type: ignore[dict-item]
    project.write_config(
        agent=agent,
        ollama={
            "host": fake.url,
            "models": [MODEL],
            "retries": 0,
            "timeout_s": 120,
            "health_check": {"interval_s": 0.5, "timeout_s": 2},
        },
        **sections,
    )


def running_stage(project: Project) -> str | None:
    """The stage of the one running ticket, as ``ticketd status`` reports it."""
    out = ticketd("status", "--json", "--config", str(project.config_path)).stdout
    running = json.loads(out)["running"] if out else []
    return running[0]["stage"] if running else None


def error_json(project: Project, name: str) -> dict:
    return json.loads((project.folder("failed") / name.replace(".md", ".error.json")).read_text())


# -- stopping ----------------------------------------------------------------------------------


@pytest.mark.parametrize("signals", [1, 2])
def test_sigterm_during_a_model_call_requeues_pushes_nothing_and_exits_in_grace(
    project: Project, fake_ollama: FakeOllama, daemons: list, signals: int
) -> None:
    builtin(project, fake_ollama, shutdown={"grace_s": 1 if signals == 1 else 300})
    fake_ollama.hang(600, path="/api/chat")  # the model thinks for ten minutes
    daemons.append(d := Daemon(project))
    project.ticket("task-1 - Think.md", body="Edit README.md.")
    fake_ollama.wait_for_requests(1, path="/api/chat", timeout=30)

    start = time.monotonic()
    for _ in range(signals):
        d.signal(signal.SIGTERM)
        time.sleep(0.2)  # two separate signals, as an operator sends them
    assert d.wait(timeout=20) == 0
    took = time.monotonic() - start

    assert took < 10, f"took {took:.1f}s to stop"
    assert project.where() == {"todo": ["task-1 - Think.md"]}
    assert project.remote_branches() == ["main"]


def test_an_endless_answer_is_ended_by_the_agents_time_budget(
    project: Project, fake_ollama: FakeOllama
) -> None:
    builtin(project, fake_ollama, agent={"timeout_s": 2})
    fake_ollama.slow(0.05)
    fake_ollama.reply("la " * 100_000, chunks=100_000)  # ~80 minutes at this pace
    project.ticket("task-2 - Babble.md")
    start = time.monotonic()
    assert ticketd("run", "--once", "--config", str(project.config_path)).returncode == 1
    assert time.monotonic() - start < 30
    err = error_json(project, "task-2 - Babble.md")
    assert err["errorCode"] == "AGENT_TIMEOUT" and "agent.timeout_s (2s)" in err["error"]


# -- cancelling --------------------------------------------------------------------------------


def hanging_run(project: Project, daemons: list, name: str) -> Daemon:
    """A daemon whose agent for ticket ``name`` runs (and would for ten minutes)."""
    project.write_config(agent={"command": HANG, "timeout_s": 600})
    daemons.append(d := Daemon(project))
    project.ticket(name)
    wait_until(lambda: running_stage(project) == "agent", what="the agent to run")
    return d


@pytest.mark.parametrize("fail", [False, True])
def test_ticketd_cancel_ends_the_run_and_puts_the_ticket_back(
    project: Project, daemons: list, fail: bool
) -> None:
    name = "task-3 - Long.md"
    d = hanging_run(project, daemons, name)

    done = ticketd(
        "cancel", "task-3", *(["--fail"] if fail else []), "--config", str(project.config_path)
    )

    assert done.returncode == 0, done.stderr
    if fail:
        assert done.stdout.strip() == f"cancelled {name}; it is in failed/"
        assert project.where() == {"failed": [name]}
        assert error_json(project, name)["errorCode"] == "CANCELLED"
    else:  # back in todo/, where the daemon takes it again at once
        assert done.stdout.strip() in (
            f"cancelled {name}; it is in todo/",
            f"cancelled {name}; it went back to todo/ and was claimed again",
        )
        wait_until(lambda: "cancelled in stage agent: back to todo/" in d.text(), what="log")
    assert project.remote_branches() == ["main"]
    assert "cancel requested for" in d.text()
    unknown = ticketd("cancel", "task-99", "--config", str(project.config_path))
    assert unknown.returncode == 1 and "no running ticket task-99" in unknown.stderr


@pytest.mark.parametrize("how", ["moved", "deleted"])
def test_a_ticket_moved_away_by_hand_cancels_its_run_and_nothing_is_pushed(
    project: Project, daemons: list, how: str
) -> None:
    name = "task-4 - Moved.md"
    d = hanging_run(project, daemons, name)
    path = project.folder("in-progress") / name
    if how == "moved":
        path.rename(project.folder("review") / name)
    else:
        path.unlink()

    wait_until(lambda: "was moved or removed by hand" in d.text(), what="the run to end")
    wait_until(lambda: not list((project.backlog / ".leases").glob("*.lock")), what="release")
    assert project.where() == ({"review": [name]} if how == "moved" else {})
    assert project.remote_branches() == ["main"]
    project.write_config(agent={})  # the daemon carries on, with a quicker agent
    d.signal(signal.SIGHUP)
    wait_until(lambda: "configuration reloaded" in d.text(), what="the reload")
    project.ticket("task-5 - Next.md")
    wait_until(lambda: "task-5 - Next.md" in project.where().get("done", []), what="task-5")


def test_an_agent_that_deletes_its_own_ticket_file_ends_cleanly(project: Project) -> None:
    # Without a sandbox an agent can reach the backlog; with it, it cannot (test_contain).
    gone = [PY, "-c", "import os, sys; os.unlink(sys.argv[1]); open('f', 'w').write('x')"]
    project.write_config(agent={"command": [*gone, "{ticket_file}"], **SIDE_CHANNEL})
    project.ticket("task-6 - Self.md")
    project.ticket("task-7 - Other.md")
    result = ticketd("run", "--once", "--config", str(project.config_path))
    assert result.returncode == 0, result.stderr
    assert project.where() == {}
    assert project.remote_branches() == ["main"]
    assert not list((project.backlog / ".leases").glob("*.lock"))


# -- reload ------------------------------------------------------------------------------------


def test_sighup_rebuilds_every_part(
    project: Project, fake_ollama: FakeOllama, daemons: list, tmp_path: Path
) -> None:
    project.write_config(ollama={"host": fake_ollama.url, "models": [MODEL], "retries": 0})
    daemons.append(d := Daemon(project))
    project.ticket("task-1 - Before.md")
    wait_until(lambda: project.where() == {"done": ["task-1 - Before.md"]}, what="task-1")

    # turn the review on (it needs the Ollama client and monitor the daemon did not have),
    # the HTTP server on, and a new agent
    other = [PY, "-c", "import pathlib; pathlib.Path('other.txt').write_text('other')"]
    data = yaml.safe_load(project.config_path.read_text())
    data["agent"]["command"] = other
    data["review"] = {"enabled": True}
    data["server"] = {"enabled": True, "port": 0}
    data["concurrency"] = {"max_tickets": 3}  # restart-only: said so, kept
    project.config_path.write_text(yaml.safe_dump(data))
    verdict = {"verdict": "approve", "summary": "fine", "issues": []}
    fake_ollama.reply(json.dumps(verdict))
    d.signal(signal.SIGHUP)
    wait_until(lambda: "configuration reloaded" in d.text(), what="the reload")
    assert "changes to concurrency apply after a restart" in d.text()
    wait_until(lambda: "serving /health" in d.text(), what="the server")

    project.ticket("task-2 - After.md")
    wait_until(lambda: "task-2 - After.md" in project.where().get("done", []), what="task-2")
    assert git(project.remote, "show", "ticketd/task-2-after:other.txt") == "other"
    assert len(fake_ollama.requests_to("/api/chat")) == 1  # the review ran
    assert "INTERNAL_ERROR" not in d.text()


# -- one branch per ticket file ----------------------------------------------------------------


def test_two_tickets_on_one_branch_never_overwrite_each_other(project: Project) -> None:
    agent = [PY, "-c", "import pathlib, sys; pathlib.Path('who').write_text(sys.argv[1])"]
    project.write_config(
        agent={"command": [*agent, "{ticket_file}"]}, concurrency={"max_tickets": 2}
    )
    project.ticket("task-1 - Same.md", title="Same", body="Alpha beta gamma.")
    project.ticket("task-1 - Same again.md", id="task-1", title="Same", body="Delta epsilon.")

    assert ticketd("run", "--once", "--config", str(project.config_path)).returncode == 1

    where = project.where()
    assert len(where["done"]) == 1 and len(where["failed"]) == 1
    [first], [second] = where["done"], where["failed"]
    err = error_json(project, second)
    assert err["errorCode"] == "BRANCH_TAKEN" and first in err["error"]
    pushed = git(project.remote, "show", "ticketd/task-1-same:who")
    assert pushed.endswith(first)


# -- faults ------------------------------------------------------------------------------------


def test_a_corrupt_history_is_moved_aside_and_work_goes_on(project: Project) -> None:
    state = project.root / "state"
    state.mkdir()
    (state / "history.sqlite3").write_bytes(b"this is not a database" * 100)
    project.ticket("task-1 - Go.md")

    result = ticketd("run", "--once", "--config", str(project.config_path))

    assert result.returncode == 0, result.stderr
    assert project.where() == {"done": ["task-1 - Go.md"]}
    aside = list(state.glob("history.sqlite3.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")
    log = (project.root / "logs" / "ticketd.log").read_text()
    assert "moved aside" in log and aside[0].name in log


def test_a_worker_crash_is_recorded_on_the_ticket_and_the_daemon_goes_on(
    project: Project,
) -> None:
    (project.root / "state").mkdir()
    (project.root / "state" / "prompts").write_text("a file where a folder should be")
    project.ticket("task-1 - Crash.md")
    result = ticketd("run", "--once", "--config", str(project.config_path))
    assert result.returncode == 1
    err = error_json(project, "task-1 - Crash.md")
    assert err["errorCode"] == "INTERNAL_ERROR"
    assert err["error"].startswith("internal error in stage agent: FileExistsError")
    assert not list((project.backlog / ".leases").glob("*.lock"))


def test_a_full_disk_at_claim_time_undoes_the_claim_and_waits(
    project: Project, daemons: list
) -> None:
    for folder in ("todo", "in-progress", "review", "done", "failed", ".leases"):
        (project.backlog / folder).mkdir(parents=True, exist_ok=True)
    with small_disk(project.backlog):
        for folder in ("todo", "in-progress", "review", "done", "failed", ".leases"):
            (project.backlog / folder).mkdir()
        name = "task-1 - Full.md"
        project.ticket(name)
        filler = fill(project.backlog)
        try:
            daemons.append(d := Daemon(project))
            wait_until(lambda: "No space left on device" in d.text(), what="the full disk")
            assert project.where() == {"todo": [name]}
            filler.unlink()
            wait_until(lambda: project.where() == {"done": [name]}, timeout=60, what="done")
            assert "crashed" not in d.text()
        finally:
            for d in daemons:
                d.stop()


def test_the_file_zoo_goes_to_failed_and_the_good_ticket_runs(project: Project) -> None:
    todo = project.folder("todo")
    todo.mkdir(parents=True)
    zoo = {
        "task-20 - Nested.md": "---\nid: task-20\ntitle: " + "[" * 500 + "\n---\n",
        "task-21 - Bomb.md": "---\n"
        + "a: &a [x,x,x,x,x,x,x,x,x]\n"
        + "".join(
            f"{c}: &{c} [{','.join(['*' + p] * 9)}]\n"
            for p, c in zip("abcdefg", "bcdefgh", strict=True)
        )
        + "title: *h\n---\n",
        "task-22 - Empty.md": "",
        f"task-23 - {'x' * 80}.md": f"---\nid: {'i' * 308}\ntitle: Long id\n---\n",
    }
    for name, text in zoo.items():
        (todo / name).write_text(text)
    (todo / "task-24 - Folder.md").mkdir()
    os.mkfifo(todo / "task-25 - Fifo.md")
    (todo / "task-26 - Zero.md").symlink_to("/dev/zero")
    (todo / "task-27 - Passwd.md").symlink_to("/etc/passwd")
    project.ticket("task-1 - Good.md")

    result = ticketd("run", "--once", "--config", str(project.config_path), timeout=120)

    assert result.returncode == 1
    where = project.where()
    assert where["done"] == ["task-1 - Good.md"]
    failed = sorted(p.name for p in project.folder("failed").iterdir() if p.suffix == ".md")
    assert len(failed) == 8 and "todo" not in where
    for name in failed:
        assert error_json(project, name)["errorCode"] == "INVALID_TICKET"
    passwd = Path("/etc/passwd").read_text().splitlines()[0]
    assert passwd not in git(project.remote, "log", "-p", "--all")
    # the retry job and a person's retry-failed look at them without hanging or crashing
    retry = ticketd("retry-failed", "--json", "--config", str(project.config_path), timeout=60)
    assert retry.returncode == 0, retry.stderr
    rows = json.loads(retry.stdout)["tickets"]
    assert len(rows) == 8 and not any(r["eligible"] for r in rows)


def test_idle_connections_do_not_take_the_daemon_down(project: Project, daemons: list) -> None:
    import socket

    project.write_config(server={"enabled": True, "port": 0})
    daemons.append(d := Daemon(project))
    wait_until(lambda: "serving /health" in d.text(), what="the server")
    url = d.text().split("serving /health, /ready, /health/ollama, /status, /metrics on ")[1]
    host, port = url.split()[0].removeprefix("http://").split(":")
    import resource
    import urllib.request

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    held = []
    try:
        for _ in range(1100):  # idle: they never send a request
            held.append(socket.create_connection((host, int(port)), timeout=5))
        answer = urllib.request.urlopen(f"http://{host}:{port}/health", timeout=10)
        assert answer.status == 200
        assert psutil.Process(d.proc.pid).num_fds() < 300  # bounded, not one per client
    finally:
        for s in held:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    project.ticket("task-1 - Alive.md")
    wait_until(lambda: project.where() == {"done": ["task-1 - Alive.md"]}, what="still working")
    assert d.proc.poll() is None


def test_after_the_clock_steps_back_a_day_retries_go_on(project: Project) -> None:
    import threading
    from datetime import UTC, datetime, timedelta

    from daemon import config as configuration
    from daemon.supervisor import Supervisor

    offset = [timedelta(0)]

    def clock() -> datetime:  # the wall clock, which a person or NTP may step
        return datetime.now(UTC) + offset[0]

    project.write_config(retry={"check_interval_s": 3600})  # the job runs once an hour
    sup = Supervisor(configuration.load(project.config_path), clock=clock, log_to_stderr=False)
    thread = threading.Thread(target=sup.run)
    thread.start()
    try:
        job = wait_until(lambda: sup._scheduler.get_job("retry-failed"), what="the retry job")
        wait_until(
            lambda: job.next_run_time > datetime.now(UTC) + timedelta(minutes=50),
            what="its first run at start",
        )
        # a ticket failed a minute ago, due now; then the clock steps back a day
        name = "task-1 - Again.md"
        project.ticket(name, folder="failed")
        failed_at = clock() - timedelta(minutes=1)
        record = {
            "taskId": "task-1",
            "file": name,
            "timestamp": failed_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "errorCode": "AGENT_FAILED",
            "retryable": True,
            "retryCount": 0,
            "nextRetryAt": failed_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        (project.folder("failed") / "task-1 - Again.error.json").write_text(json.dumps(record))
        offset[0] = timedelta(days=-1)
        sup.wake.set()
        wait_until(lambda: project.where() == {"done": [name]}, what="the retry after the step")
    finally:
        sup.signals = 1
        sup.wake.set()
        thread.join(timeout=30)
    log = (project.root / "logs" / "ticketd.log").read_text()
    assert "the wall clock stepped by -86400s" in log


def test_a_crash_of_the_run_loop_is_in_the_log_and_exits_for_a_restart(project: Project) -> None:
    from datetime import UTC, datetime

    from daemon import config as configuration
    from daemon.supervisor import Supervisor

    calls = [0]

    def failing_clock() -> datetime:  # a fault deep in the loop, as a bug would be
        calls[0] += 1
        if calls[0] > 3:
            raise RuntimeError("the clock broke")
        return datetime.now(UTC)

    sup = Supervisor(
        configuration.load(project.config_path), clock=failing_clock, log_to_stderr=False
    )
    assert sup.run() == 70
    log = (project.root / "logs" / "ticketd.log").read_text()
    assert "the run loop crashed: RuntimeError: the clock broke" in log
    assert "Traceback (most recent call last)" in log
