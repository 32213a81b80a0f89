"""Every agent gets the Ollama guarantees: a command agent that uses a model (here one that
talks to Ollama the way aider does) walks the chain of models, reflects on failing checks,
waits out an outage instead of failing, and leaves honest records. Ollama is the fake; the
daemon, git, the agent and its sandbox are real."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from conftest import PY, Project, Running, git, ticketd, wait_until
from fake_ollama import FakeOllama

from daemon import config as configuration
from daemon.agent.command import LOG_LIMIT
from daemon.procs import KEPT_TAIL
from daemon.store import Store
from daemon.supervisor import Supervisor

# Passed as source (python -c): the sandbox shows the agent its checkout, not this folder.
# Braces doubled: agent.command fills {placeholders}.
SOURCE = (Path(__file__).with_name("agents") / "ollama_agent.py").read_text()
AGENT = SOURCE.replace("{", "{{").replace("}", "}}")
AIDER_LIKE = [PY, "-c", AGENT, "--model", "ollama_chat/{model}", "--message-file", "{prompt_file}"]
MODEL, SMALL = "qwen2.5-coder:7b", "qwen2.5-coder:1.5b"


def configure(project: Project, fake: FakeOllama, models: list[str], **sections: Any) -> None:
    agent = {"command": AIDER_LIKE, "max_reflections": 1, **sections.pop("agent", {})}
    ollama = {
        "host": fake.url,
        "models": models,
        "retries": 0,
        "health_check": {"interval_s": 60, "timeout_s": 2},
        "circuit_breaker": {"failure_threshold": 1, "reset_timeout_s": 0.3},
        **sections.pop("ollama", {}),
    }
    project.write_config(agent=agent, ollama=ollama, **sections)


def writes(path: str, text: str) -> str:
    """The fake agent's answer format: write ``text`` to ``path``."""
    return f"FILE {path}\n{text}END\n"


def run_once(project: Project) -> int:
    cfg = configuration.load(project.config_path)
    return Supervisor(cfg, once=True, log_to_stderr=False).run()


def error_json(project: Project, name: str) -> dict[str, Any]:
    path = project.folder("failed") / name.replace(".md", ".error.json")
    return dict(json.loads(path.read_text()))


def agent_log(project: Project, task_id: str) -> str:
    return (project.root / "logs" / "tasks" / f"{task_id}.agent.log").read_text()


def last_run(project: Project) -> dict[str, Any]:
    store = Store(project.root / "state" / "history.sqlite3")
    try:
        return store.runs_started("0")[-1]
    finally:
        store.close()


def prompts(fake: FakeOllama) -> list[str]:
    return [r.messages[-1]["content"] for r in fake.requests_to("/api/chat")]


def daemon_log(project: Project) -> str:
    path = project.root / "logs" / "ticketd.log"
    return path.read_text() if path.exists() else ""


def test_ollama_down_at_start_the_ticket_waits_then_runs_when_it_returns(
    project: Project, fake_ollama: FakeOllama
) -> None:
    """With Ollama stopped, a dropped ticket waits in todo/ (no agent runs, nothing fails);
    when Ollama answers again the ticket runs by itself."""
    configure(project, fake_ollama, [MODEL])
    fake_ollama.stop()
    name = "task-1 - Greet.md"
    with Running(project):
        project.ticket(name)
        said = f"Ollama at {fake_ollama.url} is unavailable; waiting: task-1"
        wait_until(lambda: said in daemon_log(project), what="the daemon to say it waits")
        assert project.where() == {"todo": [name]}
        assert not (project.root / "logs" / "tasks" / "task-1.agent.log").exists()

        fake_ollama.reply(writes("greet.txt", "hello\n"))
        fake_ollama.start()
        wait_until(lambda: project.where() == {"done": [name]}, what="the ticket done")
    assert git(project.remote, "show", "ticketd/task-1-greet:greet.txt") == "hello"


def test_ollama_gone_mid_run_sends_the_ticket_back_instead_of_failing_it(
    project: Project, fake_ollama: FakeOllama
) -> None:
    """The agent, like aider, exits 0 having changed nothing when Ollama vanishes under it.
    ticketd asks Ollama before blaming the ticket: the ticket goes back to todo/, and runs
    again once Ollama is back."""
    configure(project, fake_ollama, [MODEL])
    name = "task-2 - Outage.md"
    fake_ollama.hang(30, path="/api/chat")
    with Running(project) as supervisor:
        project.ticket(name)
        fake_ollama.wait_for_requests(1, path="/api/chat", timeout=30)
        fake_ollama.stop()  # the connection drops: the agent prints an error and exits 0
        wait_until(lambda: project.where() == {"todo": [name]}, what="the ticket back in todo/")
        assert supervisor.pool is not None and not supervisor.pool.available
        assert not list(project.folder("failed").glob("*"))

        fake_ollama.reply(writes("back.txt", "back\n"))
        fake_ollama.start()
        wait_until(lambda: project.where() == {"done": [name]}, what="done after the outage")
    assert git(project.remote, "show", "ticketd/task-2-outage:back.txt") == "back"
    log = agent_log(project, "task-2")
    assert log.count(f"· model {MODEL} ·") == 2 and "APIConnectionError" in log


def test_a_failing_first_model_hands_over_to_the_second(
    project: Project, fake_ollama: FakeOllama
) -> None:
    """The first model's run fails; the second model runs on a clean checkout, told what
    failed, and its change is pushed. Both models are on record."""
    fake_ollama.models.append(SMALL)
    configure(project, fake_ollama, [MODEL, SMALL])
    garbage = "EXIT 3\n\x1b[31mTraceback: the model answered garbage\x1b[0m\n\n----\n"
    fake_ollama.reply(garbage, model=MODEL)
    fake_ollama.reply(writes("done.txt", "by the second model\n"), model=SMALL)
    name = "task-3 - Handover.md"
    project.ticket(name)

    assert run_once(project) == 0

    branch = "ticketd/task-3-handover"
    files = git(project.remote, "ls-tree", "--name-only", branch).split()
    assert files == ["README.md", "done.txt"]
    assert git(project.remote, "show", f"{branch}:done.txt") == "by the second model"
    second = prompts(fake_ollama)[1]
    assert "the model answered garbage" in second and "status 3" in second
    run = last_run(project)
    assert run["model"] == SMALL and run["outcome"] == "done"
    assert run["model_outcomes"] == {MODEL: "failed", SMALL: "ok"}
    log = agent_log(project, "task-3")
    assert "attempt 1 · model qwen2.5-coder:7b ·" in log
    assert "attempt 2 · model qwen2.5-coder:1.5b ·" in log


def test_a_model_not_pulled_hands_over_and_none_pulled_is_model_not_found(
    project: Project, fake_ollama: FakeOllama
) -> None:
    """A model missing from the server is skipped for the next; when no model of the chain
    is there, the ticket fails MODEL_NOT_FOUND with the `ollama pull` command."""
    configure(project, fake_ollama, ["missing:1b", MODEL])
    fake_ollama.reply(writes("ok.txt", "ok\n"), model=MODEL)
    project.ticket("task-4 - Skip.md")
    assert run_once(project) == 0
    assert last_run(project)["model_outcomes"] == {"missing:1b": "not_found", MODEL: "ok"}

    configure(project, fake_ollama, ["missing:1b"])
    name = "task-5 - Nothing.md"
    project.ticket(name)
    assert run_once(project) == 1
    err = error_json(project, name)
    assert err["errorCode"] == "MODEL_NOT_FOUND" and err["retryable"] is False
    assert "`ollama pull missing:1b`" in err["error"]
    assert err["modelsTried"] == ["missing:1b"]
    assert err["modelOutcomes"] == {"missing:1b": "not_found"}


def test_failing_checks_go_back_to_the_agent_with_their_output(
    project: Project, fake_ollama: FakeOllama
) -> None:
    """Checks that fail are shown to the same agent and model, which tries again on its own
    work; the fixed change is pushed."""
    check = [
        PY,
        "-c",
        "import sys; t = open('greet.txt').read(); "
        "sys.exit(f'GREETING WRONG: {t!r}' if t != 'hello\\n' else 0)",
    ]
    configure(project, fake_ollama, [MODEL], checks=[{"name": "greeting", "run": check}])

    def answer(body: dict[str, Any]) -> str:
        prompt = body["messages"][-1]["content"]
        return writes("greet.txt", "hello\n" if "GREETING WRONG" in prompt else "helo\n")

    fake_ollama.responder(answer)
    project.ticket("task-6 - Greet.md")
    assert run_once(project) == 0

    assert git(project.remote, "show", "ticketd/task-6-greet:greet.txt") == "hello"
    first, second = prompts(fake_ollama)
    assert "GREETING WRONG" not in first
    assert "GREETING WRONG: 'helo\\n'" in second
    run = last_run(project)
    assert run["model"] == MODEL and run["model_outcomes"] == {MODEL: "ok"}


def test_checks_failing_after_every_reflection_fail_the_ticket_in_the_checks_stage(
    project: Project, fake_ollama: FakeOllama
) -> None:
    """Out of reflections and models: CHECKS_FAILED, in stage checks, with the check's
    output; the agent ran 1 + agent.max_reflections times."""
    check = [PY, "-c", "import sys; sys.exit('NEVER GOOD')"]
    configure(project, fake_ollama, [MODEL], checks=[{"name": "never", "run": check}])
    fake_ollama.responder(lambda body: writes("x.txt", "x\n"))
    name = "task-7 - Never.md"
    project.ticket(name)
    assert run_once(project) == 1
    err = error_json(project, name)
    assert (err["errorCode"], err["stage"]) == ("CHECKS_FAILED", "checks")
    assert "NEVER GOOD" in err["error"] and err["modelsTried"] == [MODEL]
    assert len(prompts(fake_ollama)) == 2


def test_an_agent_failure_names_its_log_and_quotes_its_last_meaningful_lines(
    project: Project, fake_ollama: FakeOllama
) -> None:
    """A megabyte-spewing agent that then fails: its log is bounded, and .error.json names
    the log and quotes the lines that matter (no colour codes, no noise)."""
    configure(project, fake_ollama, [MODEL])
    spam = "SPAM 30000\nEXIT 2\n\x1b[1mError:\x1b[0m cannot edit foo.py: no such file\n\n"
    fake_ollama.reply(spam)
    name = "task-8 - Loud.md"
    project.ticket(name)
    assert run_once(project) == 1
    err = error_json(project, name)
    assert err["errorCode"] == "AGENT_FAILED"
    assert err["agentLog"].endswith("logs/tasks/task-8.agent.log")
    assert "Error: cannot edit foo.py: no such file" in err["error"]
    assert "\x1b" not in err["error"]
    log = project.root / "logs" / "tasks" / "task-8.agent.log"
    assert log.stat().st_size < LOG_LIMIT + KEPT_TAIL + 4096
    assert "bytes of output not kept]" in log.read_text()


def test_a_model_name_with_shell_characters_is_one_argument(
    project: Project, fake_ollama: FakeOllama
) -> None:
    """A ticket's model reaches the agent as exactly one argument; no shell ever sees it."""
    evil = "x; touch pwned $(id) `id`"
    record = "import sys, json; open('args.json', 'w').write(json.dumps(sys.argv[1:]))"
    configure(
        project,
        fake_ollama,
        [MODEL],
        agent={"command": [PY, "-c", record, "--model", "{model}"], "uses_ollama": True},
    )
    project.ticket("task-9 - Evil.md", model=evil)
    assert run_once(project) == 0
    args = json.loads(git(project.remote, "show", "ticketd/task-9-evil:args.json"))
    assert args == ["--model", evil]
    assert not list(project.root.rglob("pwned*"))


def test_an_agent_that_uses_no_model_is_credited_with_none(project: Project) -> None:
    """Runs of an agent with no {model} record no model (status, stats, .error.json)."""
    project.ticket("task-10 - Plain.md")
    assert run_once(project) == 0
    run = last_run(project)
    assert run["outcome"] == "done" and run["model"] is None and run["model_outcomes"] == {}
    report = json.loads(ticketd("status", "--json", "--config", str(project.config_path)).stdout)
    assert report["recent"][0]["model"] is None


def test_an_unreachable_remote_holds_the_queue_and_ready_says_why(project: Project) -> None:
    """With the remote out of reach every push would fail: tickets wait in todo/, /ready
    answers 503 naming the remote, and the queue runs once the remote is back."""
    away = project.root / "later.git"
    git(project.repo, "remote", "set-url", "origin", str(away))
    project.write_config(server={"enabled": True, "port": 0}, intake={"reconcile_interval_s": 0.3})
    name = "task-11 - Later.md"
    with Running(project) as supervisor:
        project.ticket(name)
        wait_until(lambda: "holding the queue" in daemon_log(project), what="the hold")
        assert project.where() == {"todo": [name]}
        server = wait_until(lambda: supervisor._server, what="the server")
        try:
            urllib.request.urlopen(server.url + "/ready", timeout=5)
            raise AssertionError("/ready answered 200 while the queue is held")
        except urllib.error.HTTPError as e:
            assert e.code == 503
            body = json.loads(e.read())
        assert body["holds"] is False and str(away) in body["held"][0]

        git(project.root, "clone", "--quiet", "--bare", str(project.remote), str(away))
        wait_until(lambda: project.where() == {"done": [name]}, what="the ticket done")
    assert "ticketd/task-11-later" in git(away, "branch", "--list")


def test_credentials_in_an_unreachable_remote_url_never_reach_the_log_or_doctor(
    project: Project,
) -> None:
    """A remote URL carrying a password, out of reach: the queue is held and the reason
    logged, with the password masked there and in `ticketd doctor`'s report."""
    secret = "hunter2-not-for-logs"
    git(project.repo, "remote", "set-url", "origin", f"https://bob:{secret}@127.0.0.1:9/r.git")
    project.ticket("task-12 - Held.md")
    result = ticketd("run", "--once", "--config", str(project.config_path), timeout=60)
    assert result.returncode == 1 and "holding the queue: cannot reach the remote" in result.stderr
    doctor = ticketd("doctor", "--config", str(project.config_path), timeout=60)
    assert doctor.returncode == 1 and "FAIL  remote" in doctor.stdout
    logs = "".join(p.read_text() for p in (project.root / "logs").rglob("*.log"))
    for text in (result.stdout + result.stderr, doctor.stdout + doctor.stderr, logs):
        assert secret not in text
    assert project.where() == {"todo": ["task-12 - Held.md"]}
