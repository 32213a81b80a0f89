"""A whole ticket run, in process, with ``--once``: real git, a bare remote, real agents."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import PY, SIDE_CHANNEL, Project, git, ticketd

from daemon import config as configuration
from daemon.gitcmd import Git, resolve_remote
from daemon.repo import Repo
from daemon.supervisor import Supervisor


def run_once(project: Project) -> int:
    cfg = configuration.load(project.config_path)
    return Supervisor(cfg, once=True, log_to_stderr=False).run()


def error_json(project: Project, name: str) -> dict:
    path = project.folder("failed") / name.replace(".md", ".error.json")
    return json.loads(path.read_text())


def frontmatter(path: Path) -> dict:
    return yaml.safe_load(path.read_text().split("---\n")[1])


def test_ticket_becomes_a_pushed_branch_and_moves_to_done(project: Project) -> None:
    name = "task-1 - Add-greeting.md"
    project.ticket(name, labels=["x"], custom_key="kept")
    original_body = (project.folder("todo") / name).read_text().split("---\n", 2)[2]

    assert run_once(project) == 0

    assert project.where() == {"done": [name]}
    branch = "ticketd/task-1-add-greeting"
    assert branch in project.remote_branches()
    assert git(project.remote, "show", f"{branch}:task-1.txt") == "done by agent"
    message = git(project.remote, "log", "-1", "--format=%B", branch)
    assert message.splitlines()[0] == "Add greeting"
    assert "Ticket: task-1" in message
    done = project.folder("done") / name
    fm = frontmatter(done)
    assert fm["status"] == "Done"
    assert fm["references"] == [branch]
    assert fm["custom_key"] == "kept" and fm["labels"] == ["x"]
    assert done.read_text().split("---\n", 2)[2] == original_body
    # the worktree is gone and the per-ticket log tells every stage
    assert not any((project.root / "state" / "worktrees").iterdir())
    log = (project.root / "logs" / "tasks" / "task-1.log").read_text()
    for stage in ("worktree", "agent", "commit", "push"):
        assert f"stage {stage} done in" in log
    # ticketd's own repository keeps no ref for a delivered ticket, and tidies itself
    work = project.root / "state" / "git" / "work.git"
    assert git(work, "for-each-ref", "refs/ticketd/") == ""
    Repo(
        work.parent,
        resolve_remote(Git({}, timeout_s=60), project.repo, "origin"),
        Git({}, timeout_s=60),
    ).maintain()


def test_failing_agent_goes_to_failed_with_error_json(project: Project) -> None:
    agent = [PY, "-c", "import sys; print('working'); sys.exit('model refused: bad prompt')"]
    project.write_config(agent={"command": agent})
    name = "task-7 - Break.md"
    project.ticket(name)

    assert run_once(project) == 1

    assert project.where() == {"failed": [name]}
    err = error_json(project, name)
    assert set(err) == {
        "taskId",
        "file",
        "timestamp",
        "stage",
        "errorCode",
        "errorType",
        "error",
        "retryable",
        "retryCount",
        "model",
        "modelsTried",
        "agentLog",
        "modelOutcomes",
        "contentSha256",
        "nextRetryAt",
        "logFile",
        "attempts",
    }
    assert err["taskId"] == "task-7" and err["file"] == name
    assert err["stage"] == "agent" and err["errorCode"] == "AGENT_FAILED"
    assert "model refused: bad prompt" in err["error"]
    assert "task-7.agent.log" in err["error"] and err["agentLog"].endswith("task-7.agent.log")
    assert err["model"] is None and err["modelsTried"] == []  # this agent uses no model
    assert err["retryable"] is True and err["errorType"] == "permanent"
    assert err["retryCount"] == 0 and len(err["attempts"]) == 1
    assert err["attempts"][0]["errorCode"] == "AGENT_FAILED"
    assert frontmatter(project.folder("failed") / name)["status"] == "Failed"
    assert project.remote_branches() == ["main"]

    # a person moves it back; it fails again: the count and the attempts grow
    (project.folder("failed") / name).rename(project.folder("todo") / name)
    assert run_once(project) == 1
    err = error_json(project, name)
    assert err["retryCount"] == 1 and len(err["attempts"]) == 2


def test_agent_that_changes_nothing_is_no_changes(project: Project) -> None:
    project.write_config(agent={"command": [PY, "-c", "pass"]})
    project.ticket("task-2 - Nothing.md")
    assert run_once(project) == 1
    err = error_json(project, "task-2 - Nothing.md")
    assert (err["errorCode"], err["stage"]) == ("NO_CHANGES", "changes")


def test_agent_timeout_ends_the_whole_process_tree(project: Project, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # the agent starts a grandchild that ignores SIGTERM, then hangs
    agent = [
        PY,
        "-c",
        (
            "import os, signal, subprocess, sys, time\n"
            "c = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)'])\n"
            f"open({str(pids)!r}, 'w').write('%d %d' % (os.getpid(), c.pid))\n"
            "time.sleep(300)\n"
        ),
    ]
    project.write_config(
        agent={"command": agent, "timeout_s": 1.5, "kill_grace_s": 0.5, **SIDE_CHANNEL}
    )
    project.ticket("task-3 - Hang.md")

    assert run_once(project) == 1

    err = error_json(project, "task-3 - Hang.md")
    assert err["errorCode"] == "AGENT_TIMEOUT" and err["errorType"] == "transient"
    for pid in map(int, pids.read_text().split()):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_missing_agent_program_holds_the_queue_and_names_it(project: Project) -> None:
    """An agent that is not installed would fail every ticket: they wait in todo/ instead,
    and `run --once` exits 1 saying which program is missing."""
    project.write_config(agent={"command": ["no-such-agent-program", "{prompt_file}"]})
    project.ticket("task-4 - X.md")
    result = ticketd("run", "--once", "--config", str(project.config_path), timeout=60)
    assert result.returncode == 1
    said = "holding the queue: the agent program 'no-such-agent-program' is not on"
    assert said in result.stderr
    assert "waiting: task-4" in result.stderr
    assert project.where() == {"todo": ["task-4 - X.md"]}


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"---\nid: task-9\ntitle: [unclosed\nstatus: To Do\n---\nbody\n", "line 4"),
        (b"---\nid: task-9\ntitle: ok\n---\n\nfine\n\xff\xfe broken\n", "line 7"),
        (b"\x00\x01\x02binary", "binary"),
        (b"---\nid: task-9\n" + b"x" * (1024 * 1024 + 10), "1 MiB"),
    ],
    ids=["broken-yaml", "not-utf8", "binary", "too-big"],
)
def test_unreadable_ticket_fails_as_invalid_and_the_daemon_carries_on(
    project: Project, content: bytes, problem: str
) -> None:
    (project.folder("todo")).mkdir(parents=True, exist_ok=True)
    (project.folder("todo") / "task-9 - Bad.md").write_bytes(content)
    project.ticket("task-10 - Good.md")

    assert run_once(project) == 1

    assert project.where() == {"done": ["task-10 - Good.md"], "failed": ["task-9 - Bad.md"]}
    assert (project.folder("failed") / "task-9 - Bad.md").read_bytes() == content
    err = error_json(project, "task-9 - Bad.md")
    assert err["errorCode"] == "INVALID_TICKET" and err["retryable"] is False
    assert problem in err["error"]


def test_priority_then_id_order_and_dependencies(project: Project, tmp_path: Path) -> None:
    order = tmp_path / "order"
    agent = [
        PY,
        "-c",
        (
            "import sys, pathlib\n"
            f"open({str(order)!r}, 'a').write(sys.argv[1] + '\\n')\n"
            "pathlib.Path('f.txt').write_text(sys.argv[1])\n"
        ),
        "{ticket_id}",
    ]
    project.write_config(agent={"command": agent, **SIDE_CHANNEL})
    project.ticket("task-10 - Low.md", priority="low")
    project.ticket("task-2 - Medium.md", priority="medium")
    project.ticket("task-11 - High.md", priority="high")
    project.ticket("task-3 - Plain.md")
    project.ticket("task-1 - Needs-five.md", priority="high", dependencies=["task-5"])
    project.ticket("task-5 - Needed.md", priority="low")
    project.ticket("task-20 - Needs-missing.md", dependencies=["task-99"])

    assert run_once(project) == 0

    # high, then medium/unset by id, then low by id; task-1 (high) runs as soon as task-5 is done
    assert order.read_text().split() == [
        "task-11",
        "task-2",
        "task-3",
        "task-5",
        "task-1",
        "task-10",
    ]
    assert project.where()["todo"] == ["task-20 - Needs-missing.md"]


def test_status_json_says_what_waits_for_what(project: Project) -> None:
    from conftest import ticketd

    project.ticket("task-1 - A.md", dependencies=["task-2"])
    project.ticket("task-2 - B.md", dependencies=["task-3"])
    result = ticketd("status", "--json", "--config", str(project.config_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    reasons = {w["taskId"]: w["reason"] for w in report["waiting"]}
    assert reasons == {
        "task-1": "waits for task-2 (todo)",
        "task-2": "waits for task-3 (not found)",
    }
    assert report["counts"]["todo"] == 2


def test_agent_files_matching_exclude_are_never_committed(project: Project) -> None:
    agent = [PY, "-c", (
        "import pathlib\n"
        "pathlib.Path('.aider.chat.history.md').write_text('chat')\n"
        "pathlib.Path('feature.py').write_text('x = 1\\n')\n"
    )]  # fmt: skip
    project.write_config(agent={"command": agent})
    project.ticket("task-1 - Feature.md")
    assert run_once(project) == 0
    files = git(project.remote, "ls-tree", "-r", "--name-only", "ticketd/task-1-feature").split()
    assert sorted(files) == ["README.md", "feature.py"]

    only_chat = [PY, "-c", "import pathlib; pathlib.Path('.aider.x').write_text('chat')"]
    project.write_config(agent={"command": only_chat})
    project.ticket("task-2 - Chat-only.md")
    assert run_once(project) == 1
    assert error_json(project, "task-2 - Chat-only.md")["errorCode"] == "NO_CHANGES"


def test_push_retries_a_transient_failure(project: Project, tmp_path: Path) -> None:
    # The remote is reached over ssh (the user's GIT_SSH_COMMAND, which ticketd's git keeps);
    # its first push hangs up as a flaky network would, then it works.
    flag = tmp_path / "failed-once"
    ssh = tmp_path / "flaky-ssh"
    ssh.write_text(
        "#!/bin/sh\n"
        "shift\n"  # the host; the rest is the command git asks the remote to run
        f'case "$*" in *receive-pack*) if [ ! -e "{flag}" ]; then touch "{flag}"; '
        'echo "Connection reset by peer" >&2; exit 255; fi;; esac\n'
        'exec sh -c "$*"\n'
    )
    ssh.chmod(0o755)
    project.write_config(repo={"push_retries": 2, "remote": f"ssh://localhost{project.remote}"})
    project.ticket("task-1 - Flaky.md")
    os.environ["GIT_SSH_COMMAND"] = str(ssh)
    try:
        assert run_once(project) == 0
    finally:
        del os.environ["GIT_SSH_COMMAND"]

    assert flag.exists()
    assert "ticketd/task-1-flaky" in project.remote_branches()


def test_a_remote_setting_in_the_users_repository_runs_nothing(
    project: Project, tmp_path: Path
) -> None:
    # An executable setting of the repository (receivepack, as an agent could plant it) is
    # not ticketd's: its git never runs it.
    marker = tmp_path / "ran"
    wrapper = tmp_path / "receive-pack"
    wrapper.write_text(f'#!/bin/sh\ntouch "{marker}"\nexec git-receive-pack "$@"\n')
    wrapper.chmod(0o755)
    git(project.repo, "config", "remote.origin.receivepack", str(wrapper))
    git(project.repo, "config", "remote.origin.uploadpack", str(wrapper))
    project.ticket("task-1 - Plain.md")
    assert run_once(project) == 0
    assert not marker.exists()
    assert "ticketd/task-1-plain" in project.remote_branches()


def test_push_rejected_is_push_failed_without_retry(project: Project, tmp_path: Path) -> None:
    hook = project.remote / "hooks" / "pre-receive"
    count = tmp_path / "pushes"
    hook.write_text(f'#!/bin/sh\necho x >> "{count}"\necho "branch is protected" >&2\nexit 1\n')
    hook.chmod(0o755)
    project.write_config(repo={"push_retries": 3})
    project.ticket("task-1 - Rejected.md")

    assert run_once(project) == 1

    err = error_json(project, "task-1 - Rejected.md")
    assert (err["errorCode"], err["stage"]) == ("PUSH_FAILED", "push")
    assert "pre-receive hook declined" in err["error"]
    assert len(count.read_text().split()) == 1


def test_crlf_ticket_stays_crlf_and_its_body_byte_for_byte(project: Project) -> None:
    text = (
        "---\r\nid: task-1\r\ntitle: Windows ticket\r\nstatus: To Do\r\nowner: me\r\n---\r\n"
        "\r\n## Description\r\n\r\nÜnïcödé body, trailing spaces   \r\n"
    )
    project.folder("todo").mkdir(parents=True, exist_ok=True)
    (project.folder("todo") / "task-1 - Windows.md").write_bytes(text.encode())
    assert run_once(project) == 0
    raw = (project.folder("done") / "task-1 - Windows.md").read_bytes().decode()
    head, body = raw.split("---\r\n", 2)[1:]
    assert body == text.split("---\r\n", 2)[2]
    assert "\n" not in head.replace("\r\n", "")
    assert "status: Done\r\n" in head and "owner: me\r\n" in head


def test_the_token_reaches_no_log_no_error_json_and_not_the_agent(project: Project) -> None:
    import os

    token = "ghp_Zx8TestTokenValue0123456789abcdefABCD"
    # the agent does not get the token; this one prints what it got and a leaked copy
    agent = [PY, "-c", (
        "import os, sys\n"
        "print('env has token:', 'GITHUB_TOKEN' in os.environ)\n"
        f"sys.exit('leaked {token} and https://bot:{token}@example.invalid/r.git')\n"
    )]  # fmt: skip
    project.write_config(agent={"command": agent}, logging={"json": True, "level": "DEBUG"})
    project.ticket("task-1 - Leak.md")
    os.environ["GITHUB_TOKEN"] = token
    try:
        assert run_once(project) == 1
    finally:
        del os.environ["GITHUB_TOKEN"]

    err = error_json(project, "task-1 - Leak.md")
    assert "leaked *** and https://***@example.invalid/r.git" in err["error"]
    written = [
        p
        for p in project.root.rglob("*")
        if p.is_file() and ".git" not in p.parts and p != project.config_path
    ]
    assert written
    for path in written:
        assert token not in path.read_text(errors="replace"), path
    agent_log = (project.root / "logs" / "tasks" / "task-1.agent.log").read_text()
    assert "env has token: False" in agent_log
    for line in (project.root / "logs" / "ticketd.log").read_text().splitlines():
        json.loads(line)
