"""The builtin agent against a fake Ollama that the real client talks to over HTTP."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from conftest import PY, SIDE_CHANNEL, Project, git, ticketd, wait_until
from fake_ollama import FakeOllama

from daemon import config as configuration
from daemon.supervisor import Supervisor

MODEL = "qwen2.5-coder:7b"


def block(path: str, search: str, replace: str) -> str:
    edit = f"<<<<<<< SEARCH\n{search}=======\n{replace}>>>>>>> REPLACE\n"
    return f"I will change {path}.\n\n{path}\n```\n{edit}```\n"


def builtin_config(project: Project, fake: FakeOllama, **sections: object) -> None:
    ollama = {
        "host": fake.url,
        "models": [MODEL],
        "num_ctx": 8192,
        "num_predict": 1024,
        "keep_alive": "7m",
        "retries": 0,
        "health_check": {"interval_s": 0.2, "timeout_s": 2},
        "circuit_breaker": {"failure_threshold": 1, "reset_timeout_s": 0.3},
    }
    ollama.update(sections.pop("ollama", {}))  # type: ignore[arg-type]
    agent = {"kind": "builtin", "max_reflections": 2, "candidates": 1}
    agent["edit_format"] = "search-replace"  # the tests of blocks; auto is tested on its own
    agent.update(sections.pop("agent", {}))  # type: ignore[arg-type]
    project.write_config(agent=agent, ollama=ollama, **sections)


def run_once(project: Project) -> int:
    return Supervisor(configuration.load(project.config_path), once=True, log_to_stderr=False).run()


def error_json(project: Project, name: str) -> dict:
    return json.loads((project.folder("failed") / name.replace(".md", ".error.json")).read_text())


def chats(fake: FakeOllama) -> list:
    return fake.requests_to("/api/chat")


def test_first_try_success_and_every_request_sends_num_ctx(
    project: Project, fake_ollama: FakeOllama
) -> None:
    builtin_config(project, fake_ollama)
    project.ticket("task-1 - Greet.md", body="Change the greeting in README.md to say hello world.")
    fake_ollama.reply(block("README.md", "hello\n", "hello world\n"))

    assert run_once(project) == 0

    assert project.where() == {"done": ["task-1 - Greet.md"]}
    assert git(project.remote, "show", "ticketd/task-1-greet:README.md") == "hello world"
    assert len(chats(fake_ollama)) == 1
    for request in fake_ollama.requests_to("/api/chat") + fake_ollama.requests_to("/api/generate"):
        assert request.options["num_ctx"] == 8192, request
        assert request.keep_alive == "7m"
    messages = chats(fake_ollama)[0].messages
    assert messages[0]["role"] == "system" and "SEARCH/REPLACE" in messages[0]["content"]
    assert "Change the greeting" in messages[1]["content"]
    assert "README.md\n```\nhello\n```" in messages[1]["content"]  # the named file, whole
    log = (project.root / "logs" / "tasks" / "task-1.log").read_text()
    assert "llm: 1 calls" in log and "quality 1.0" in log


def test_malformed_edit_is_fixed_on_reflection(project: Project, fake_ollama: FakeOllama) -> None:
    builtin_config(project, fake_ollama)
    project.ticket("task-2 - Greet.md", body="Change README.md to say hi.")
    fake_ollama.reply("README.md\n<<<<<<< SEARCH\nhello\n>>>>>>> REPLACE\n")  # no =======
    fake_ollama.reply(block("README.md", "helo\n", "hi\n"))  # does not match
    fake_ollama.reply(block("README.md", "hello\n", "hi\n"))

    assert run_once(project) == 0

    assert git(project.remote, "show", "ticketd/task-2-greet:README.md") == "hi"
    requests = chats(fake_ollama)
    assert len(requests) == 3
    second = requests[1].messages
    assert second[-2]["role"] == "assistant" and second[-1]["role"] == "user"
    assert "could not be read" in second[-1]["content"]
    third = requests[2].messages[-1]["content"]
    assert "Block 1 (README.md): SEARCH text not found" in third
    assert "1 | hello" in third  # the closest real lines, numbered
    assert requests[0].messages[:2] == requests[2].messages[:2]  # a stable prefix


def test_failing_checks_go_back_to_the_model(project: Project, fake_ollama: FakeOllama) -> None:
    check = [
        PY,
        "-c",
        "import sys; t = open('README.md').read();"
        " sys.exit(0 if 'ok' in t else 'README must say ok')",
    ]
    builtin_config(project, fake_ollama, checks=[{"name": "readme", "run": check}])
    project.ticket("task-3 - Ok.md", body="Make README.md pass the check.")
    fake_ollama.reply(block("README.md", "hello\n", "bye\n"))
    fake_ollama.reply(block("README.md", "bye\n", "ok\n"))

    assert run_once(project) == 0

    assert git(project.remote, "show", "ticketd/task-3-ok:README.md") == "ok"
    feedback = chats(fake_ollama)[1].messages[-1]["content"]
    assert "check 'readme' failed" in feedback and "README must say ok" in feedback


def test_checks_still_failing_after_all_reflections_fail_the_ticket(
    project: Project, fake_ollama: FakeOllama
) -> None:
    builtin_config(
        project, fake_ollama, checks=[{"name": "never", "run": [PY, "-c", "raise SystemExit(3)"]}]
    )
    project.ticket("task-4 - Never.md")
    for word in ("a", "b", "c"):
        fake_ollama.reply(
            block("README.md", "hello\n" if word == "a" else f"{chr(ord(word) - 1)}\n", f"{word}\n")
        )

    assert run_once(project) == 1

    err = error_json(project, "task-4 - Never.md")
    assert err["errorCode"] == "CHECKS_FAILED" and err["stage"] == "agent"
    assert err["model"] == MODEL and err["modelsTried"] == [MODEL]
    assert err["modelOutcomes"] == {MODEL: "failed"}
    assert len(chats(fake_ollama)) == 3  # first answer + max_reflections (2)


def test_missing_first_model_moves_on_at_once(project: Project, fake_ollama: FakeOllama) -> None:
    builtin_config(project, fake_ollama, ollama={"models": ["missing:1b", MODEL]})
    project.ticket("task-5 - Fallback.md", body="Edit README.md.")
    fake_ollama.reply(block("README.md", "hello\n", "fallback\n"), model=MODEL)

    assert run_once(project) == 0

    assert [r.model for r in chats(fake_ollama)] == ["missing:1b", MODEL]
    log = (project.root / "logs" / "tasks" / "task-5.log").read_text()
    assert "models tried ['missing:1b', 'qwen2.5-coder:7b']" in log


def test_ticket_model_and_label_map_choose_the_chain(
    project: Project, fake_ollama: FakeOllama
) -> None:
    fake_ollama.models.append("docs:3b")
    builtin_config(project, fake_ollama, ollama={"models_by_label": {"docs": ["docs:3b"]}})
    project.ticket("task-6 - Docs.md", labels=["docs"], body="Edit README.md.")
    fake_ollama.reply(block("README.md", "hello\n", "docs\n"))
    assert run_once(project) == 0
    assert [r.model for r in chats(fake_ollama)] == ["docs:3b"]


def test_unsafe_edit_is_refused_and_nothing_is_written(
    project: Project, fake_ollama: FakeOllama
) -> None:
    builtin_config(project, fake_ollama)
    project.ticket("task-7 - Escape.md")
    fake_ollama.reply(block("README.md", "hello\n", "x\n") + block("../outside.txt", "", "pwned\n"))

    assert run_once(project) == 1

    err = error_json(project, "task-7 - Escape.md")
    assert err["errorCode"] == "UNSAFE_EDIT" and err["retryable"] is False
    assert not (project.root / "state" / "outside.txt").exists()
    assert not list(project.root.rglob("outside.txt"))


def test_a_ticket_too_large_for_num_ctx_fails_before_any_request(
    project: Project, fake_ollama: FakeOllama
) -> None:
    builtin_config(project, fake_ollama, ollama={"num_ctx": 2048, "num_predict": 512})
    project.ticket("task-8 - Huge.md", body="word " * 3000)

    assert run_once(project) == 1

    err = error_json(project, "task-8 - Huge.md")
    assert err["errorCode"] == "CONTEXT_TOO_LARGE" and "ollama.num_ctx (2048)" in err["error"]
    assert chats(fake_ollama) == []


def test_a_silently_truncated_prompt_is_caught(project: Project, fake_ollama: FakeOllama) -> None:
    builtin_config(project, fake_ollama)
    project.ticket("task-9 - Big.md", body="Edit README.md. " + "context " * 400)
    fake_ollama.reply(block("README.md", "hello\n", "x\n"), prompt_eval_count=120)
    fake_ollama.reply(block("README.md", "hello\n", "x\n"), prompt_eval_count=100)

    assert run_once(project) == 1

    err = error_json(project, "task-9 - Big.md")
    assert err["errorCode"] == "CONTEXT_TOO_LARGE" and "truncated" in err["error"]
    assert len(chats(fake_ollama)) == 2  # once more with half the context, then it gives up


def test_a_truncated_prompt_is_retried_with_less_context(
    project: Project, fake_ollama: FakeOllama
) -> None:
    builtin_config(project, fake_ollama)
    project.ticket("task-16 - Retry.md", body="Edit README.md. " + "context " * 400)
    fake_ollama.reply(block("README.md", "hello\n", "x\n"), prompt_eval_count=120)
    fake_ollama.reply(block("README.md", "hello\n", "shorter\n"))
    assert run_once(project) == 0
    assert git(project.remote, "show", "ticketd/task-16-retry:README.md") == "shorter"


def test_once_with_ollama_down_names_the_waiting_tickets_and_exits_1(
    project: Project, fake_ollama: FakeOllama
) -> None:
    builtin_config(project, fake_ollama, ollama={"circuit_breaker": {"failure_threshold": 3}})
    project.ticket("task-10 - Wait.md")
    fake_ollama.stop()
    result = ticketd("run", "--once", "--config", str(project.config_path), timeout=30)
    assert result.returncode == 1
    assert f"Ollama at {fake_ollama.url} is unavailable; waiting: task-10" in result.stderr
    assert project.where() == {"todo": ["task-10 - Wait.md"]}


def test_outage_mid_run_requeues_then_resumes_by_itself(
    project: Project, fake_ollama: FakeOllama
) -> None:
    builtin_config(project, fake_ollama)
    name = "task-11 - Outage.md"
    project.ticket(name, body="Edit README.md.")
    fake_ollama.hang(30, path="/api/chat")
    supervisor = Supervisor(configuration.load(project.config_path), log_to_stderr=False)
    thread = threading.Thread(target=supervisor.run)
    thread.start()
    try:
        fake_ollama.wait_for_requests(1, path="/api/chat")
        fake_ollama.stop()  # Ollama dies while the model is thinking
        wait_until(lambda: project.where() == {"todo": [name]}, what="the ticket back in todo/")
        assert supervisor.pool is not None and not supervisor.pool.available
        assert not (project.folder("failed") / name.replace(".md", ".error.json")).exists()

        fake_ollama.reply(block("README.md", "hello\n", "back\n"))
        fake_ollama.start()
        wait_until(lambda: project.where() == {"done": [name]}, what="done after recovery")
    finally:
        supervisor.signals = 1
        supervisor.wake.set()
        thread.join(timeout=30)
    assert git(project.remote, "show", "ticketd/task-11-outage:README.md") == "back"


def test_command_agent_runs_checks_too(project: Project) -> None:
    agent = [PY, "-c", "open('README.md', 'w').write('bad\\n')"]
    check = [
        PY,
        "-c",
        "import sys; sys.exit('README is bad' if 'bad' in open('README.md').read() else 0)",
    ]
    project.write_config(agent={"command": agent}, checks=[{"name": "readme", "run": check}])
    project.ticket("task-12 - Checked.md")
    assert run_once(project) == 1
    err = error_json(project, "task-12 - Checked.md")
    assert (err["errorCode"], err["stage"]) == ("CHECKS_FAILED", "checks")
    assert "README is bad" in err["error"]


@pytest.mark.parametrize("bad", [b"def f(:\n    pass\n"])
def test_python_syntax_errors_are_caught_by_static_analysis(
    project: Project, fake_ollama: FakeOllama, bad: bytes
) -> None:
    builtin_config(project, fake_ollama, agent={"kind": "builtin", "max_reflections": 1})
    project.ticket("task-13 - Py.md", body="Add app.py.")
    fake_ollama.reply(block("app.py", "", bad.decode()))
    fake_ollama.reply(block("app.py", bad.decode(), "def f():\n    pass\n"))
    assert run_once(project) == 0
    feedback = chats(fake_ollama)[1].messages[-1]["content"]
    assert "syntax error in app.py line 1" in feedback


def test_first_model_is_warmed_and_missing_models_are_named(
    project: Project, fake_ollama: FakeOllama, daemons: list
) -> None:
    from conftest import Daemon

    builtin_config(project, fake_ollama, ollama={"models": [MODEL, "absent:1b"]})
    daemons.append(d := Daemon(project))
    wait_until(lambda: fake_ollama.requests_to("/api/generate"), what="the warm-up request")
    warm = fake_ollama.requests_to("/api/generate")[0]
    assert warm.model == MODEL and warm.body["prompt"] == "" and warm.keep_alive == "7m"
    wait_until(lambda: "model absent:1b is not on" in d.text(), what="the warning")
    assert "run `ollama pull absent:1b`" in d.text()


def test_ruff_fixes_what_the_model_left(project: Project, fake_ollama: FakeOllama) -> None:
    builtin_config(project, fake_ollama)
    project.ticket("task-14 - Tool.md", body="Add tool.py.")
    fake_ollama.reply(block("tool.py", "", "import os\nimport sys\n\nprint(sys.argv)\n"))
    assert run_once(project) == 0
    assert (
        git(project.remote, "show", "ticketd/task-14-tool:tool.py")
        == "import sys\n\nprint(sys.argv)"
    )
    assert "auto-fixes 1" in (project.root / "logs" / "tasks" / "task-14.log").read_text()


def test_static_analysis_commands_get_the_changed_files(
    project: Project, fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    seen = tmp_path / "seen"
    lint = [
        PY,
        "-c",
        f"import sys; open({str(seen)!r}, 'w').write(' '.join(sys.argv[1:]))",
        "{files}",
    ]
    builtin_config(project, fake_ollama, agent=SIDE_CHANNEL,
                   static_analysis={"commands": [{"glob": "*.txt", "run": lint}]})  # fmt: skip
    project.ticket("task-15 - Txt.md", body="Add notes.")
    fake_ollama.reply(block("a.txt", "", "a\n") + block("b.md", "", "b\n"))
    assert run_once(project) == 0
    assert seen.read_text() == "a.txt"


# -- what real small models answer (issue: the builtin agent on real local models) ---------

INVENTORY = (
    "class Inventory:\n    def __init__(self):\n        self.items = {}\n\n"
    "    def total(self):\n        return 0\n\n\ndef load(path):\n    return Inventory()\n"
)


def add_module(project: Project, path: str = "textkit/inventory.py", text: str = INVENTORY) -> None:
    target = project.repo / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    git(project.repo, "add", ".")
    git(project.repo, "commit", "-q", "-m", f"add {path}")
    git(project.repo, "push", "-q", "origin", "main")


def test_answers_are_sampled_deterministically_unless_configured(
    project: Project, fake_ollama: FakeOllama
) -> None:
    builtin_config(project, fake_ollama)
    project.ticket("task-30 - Greet.md", body="Change README.md to say hi.")
    fake_ollama.reply(block("README.md", "hello\n", "hi\n"))
    assert run_once(project) == 0
    assert chats(fake_ollama)[0].options["temperature"] == 0
    assert chats(fake_ollama)[0].options["seed"] == 42

    builtin_config(project, fake_ollama, ollama={"temperature": 0.3, "seed": 7})
    project.ticket("task-31 - Again.md", body="Change README.md to say yo.")
    fake_ollama.reply(block("README.md", "hello\n", "yo\n"))
    assert run_once(project) == 0
    assert chats(fake_ollama)[1].options["temperature"] == 0.3
    assert chats(fake_ollama)[1].options["seed"] == 7


def test_the_context_the_model_really_holds_bounds_every_request(project: Project) -> None:
    with FakeOllama([MODEL], context_length=2048) as fake:
        builtin_config(project, fake, ollama={"num_ctx": 8192, "num_predict": 256})
        project.ticket("task-32 - Greet.md", body="Change README.md to say hi.")
        fake.reply(block("README.md", "hello\n", "hi\n"))
        assert run_once(project) == 0
        assert [r.options["num_ctx"] for r in chats(fake)] == [2048]
        assert fake.requests_to("/api/show"), "the model's context length was not asked"

        project.ticket("task-33 - Big.md", body="Edit README.md. " + "context " * 900)
        assert run_once(project) == 1
        assert len(chats(fake)) == 1  # no request for a ticket the model cannot hold
    err = error_json(project, "task-33 - Big.md")
    assert err["errorCode"] == "CONTEXT_TOO_LARGE"
    assert f"the context of {MODEL} (2048 tokens" in err["error"]


def test_a_whole_file_under_a_copied_path_is_the_real_file(
    project: Project, fake_ollama: FakeOllama
) -> None:
    add_module(project)
    builtin_config(project, fake_ollama)
    project.ticket("task-34 - Total.md", body="Inventory.total should return the item count.")
    fake_ollama.reply(
        "Here is the updated code:\n\npath/to/inventory.py\n```python\nclass Inventory:\n"
        "    def total(self):\n        return len(self.items)\n```\n"
    )

    assert run_once(project) == 0

    shown = git(project.remote, "show", "ticketd/task-34-total:textkit/inventory.py")
    assert shown + "\n" == INVENTORY.replace("return 0", "return len(self.items)")
    prompt = "\n".join(m["content"] for m in chats(fake_ollama)[0].messages)
    assert "path/to" not in prompt
    assert "the change most likely goes to textkit/inventory.py" in prompt


def test_a_prose_answer_gets_the_format_again_on_the_file_at_hand(
    project: Project, fake_ollama: FakeOllama
) -> None:
    builtin_config(project, fake_ollama)
    project.ticket("task-35 - Hi.md", body="Change README.md to say hi.")
    fake_ollama.reply("You should change hello to hi in the readme.")
    fake_ollama.reply(block("README.md", "hello\n", "hi\n"))

    assert run_once(project) == 0

    feedback = chats(fake_ollama)[1].messages[-1]["content"]
    assert "no edits that I could read" in feedback
    assert "README.md\n```\n<<<<<<< SEARCH\nhello\n=======\nhello\n" in feedback
    assert feedback.endswith("Answer with SEARCH/REPLACE blocks.")


def test_a_copied_example_is_refused_and_never_written(
    project: Project, fake_ollama: FakeOllama
) -> None:
    builtin_config(project, fake_ollama, agent={"max_reflections": 0})
    project.ticket("task-36 - Hi.md", body="Change README.md to say hi.")
    fake_ollama.reply(block("README.md", "hello\n", "hello\n(your new lines)\n"))

    assert run_once(project) == 1

    err = error_json(project, "task-36 - Hi.md")
    assert err["errorCode"] == "EDIT_PARSE_FAILED" and "copied the format example" in err["error"]


def test_a_repeated_answer_ends_the_conversation_and_a_fresh_candidate_passes(
    project: Project, fake_ollama: FakeOllama
) -> None:
    builtin_config(project, fake_ollama, agent={"candidates": 2, "max_reflections": 3})
    project.ticket("task-37 - Hi.md", body="Change README.md to say hi.")
    wrong = block("README.md", "helo\n", "hi\n")
    fake_ollama.reply(wrong)
    fake_ollama.reply(wrong)  # the same again: reflecting further would not help
    fake_ollama.reply("README.md\n```\nhi\n```\n")  # the candidate, asked for whole files

    assert run_once(project) == 0

    assert git(project.remote, "show", "ticketd/task-37-hi:README.md") == "hi"
    first, second, third = chats(fake_ollama)
    assert len(second.messages) == 4  # a reflection on the first
    assert len(third.messages) == 2  # a fresh conversation, not a second reflection
    assert "each changed file in full" in third.messages[0]["content"]
    assert (third.options["temperature"], third.options["seed"]) == (0.6, 43)
    assert (first.options["temperature"], first.options["seed"]) == (0, 42)
    log = (project.root / "logs" / "tasks" / "task-37.log").read_text()
    assert "the same answer again" in log and "candidate 2/2" in log


def test_an_answer_cut_at_the_window_is_asked_again_with_less_context(
    project: Project, fake_ollama: FakeOllama
) -> None:
    for n in range(6):
        add_module(project, f"textkit/part{n}.py", f"def greet{n}():\n    return 'hello'\n" * 40)
    builtin_config(project, fake_ollama, agent={"candidates": 1})
    project.ticket("task-38 - Hi.md", body="Change README.md to say hi; see greet0 .. greet5.")
    fake_ollama.reply(
        "README.md\n```\n<<<<<<< SEARCH\nhel",
        done_reason="length",
        prompt_eval_count=7000,
        eval_count=1000,
    )
    fake_ollama.reply(block("README.md", "hello\n", "hi\n"))

    assert run_once(project) == 0

    first, second = (r.messages[1]["content"] for r in chats(fake_ollama))
    assert first.count("textkit/part") > second.count("textkit/part")
    assert len(second) < len(first)


def test_the_format_that_worked_for_a_model_is_asked_for_next(
    project: Project, fake_ollama: FakeOllama
) -> None:
    builtin_config(project, fake_ollama, agent={"edit_format": "auto"})
    project.ticket("task-39 - Hi.md", body="Change README.md to say hi.")
    fake_ollama.reply(
        block("README.md", "hello\n", "hi\n")
    )  # blocks, though whole files were asked
    assert run_once(project) == 0
    # nothing learned yet: short files are asked for whole
    assert "each changed file in full" in chats(fake_ollama)[0].messages[0]["content"]

    project.ticket("task-40 - Yo.md", body="Change README.md to say yo.")
    fake_ollama.reply(block("README.md", "hello\n", "yo\n"))
    assert run_once(project) == 0
    assert "SEARCH/REPLACE blocks" in chats(fake_ollama)[1].messages[0]["content"]  # learned

    builtin_config(project, fake_ollama, agent={"edit_format": "udiff"})  # said: it wins
    project.ticket("task-41 - Ho.md", body="Change README.md to say ho.")
    fake_ollama.reply("```diff\n--- a/README.md\n+++ b/README.md\n@@ -1 +1 @@\n-hello\n+ho\n```\n")
    assert run_once(project) == 0
    assert "a unified diff in a ```diff fence" in chats(fake_ollama)[2].messages[0]["content"]
    assert git(project.remote, "show", "ticketd/task-41-ho:README.md") == "ho"


def test_the_file_defining_what_the_ticket_names_is_shown_last_and_the_format_on_it(
    project: Project, fake_ollama: FakeOllama
) -> None:
    add_module(project, "textkit/strings.py", "def truncate(text, n):\n    return text[: n - 1]\n")
    uses = "from textkit.strings import truncate\n\n\ndef test_truncate():\n"
    add_module(
        project, "tests/test_strings.py", uses + "    assert truncate('ab', 5) == 'ab'\n" * 5
    )
    builtin_config(project, fake_ollama, agent={"max_reflections": 1})
    project.ticket("task-42 - Fit.md", body="truncate('hello', 5) cuts a string that fits.")
    fake_ollama.reply(  # changes nothing: SEARCH and REPLACE alike
        block("textkit/strings.py", "    return text[: n - 1]\n", "    return text[: n - 1]\n")
    )
    fake_ollama.reply(  # no path: the one shown file holding SEARCH
        "```\n<<<<<<< SEARCH\n    return text[: n - 1]\n=======\n    return text[:n]\n"
        ">>>>>>> REPLACE\n```\n"
    )

    assert run_once(project) == 0

    shown = git(project.remote, "show", "ticketd/task-42-fit:textkit/strings.py")
    assert shown == "def truncate(text, n):\n    return text[:n]"
    first = chats(fake_ollama)[0].messages[1]["content"]
    files = first.split("## Files")[1]
    assert files.index("tests/test_strings.py\n```") < files.index("textkit/strings.py\n```")
    assert "the change most likely goes to textkit/strings.py" in files
    feedback = chats(fake_ollama)[1].messages[-1]["content"]
    assert "Your edits change nothing" in feedback
    # the format again, on the line that defines what the ticket names
    assert "shown on textkit/strings.py" in feedback
    assert "<<<<<<< SEARCH\ndef truncate(text, n):\n=======\ndef truncate(text, n):\n" in feedback


def test_the_most_relevant_files_are_shown_whole_and_the_others_as_outlines(
    project: Project, fake_ollama: FakeOllama
) -> None:
    for n in range(5):
        body = f"def greet{n}():\n    return 'body of {n}'\n\n\nclass Part{n}:\n    pass\n"
        add_module(project, f"textkit/part{n}.py", body)
    builtin_config(project, fake_ollama, agent={"whole_files": 2})
    project.ticket(
        "task-43 - Hi.md", body="greet0 greet1 greet2 greet3 greet4: say hi in README.md."
    )
    fake_ollama.reply(block("README.md", "hello\n", "hi\n"))

    assert run_once(project) == 0

    files = chats(fake_ollama)[0].messages[1]["content"].split("## Files")[1].split("# task-43")[0]
    whole = [n for n in range(5) if f"'body of {n}'" in files]
    outlined = [n for n in range(5) if f"textkit/part{n}.py (outline" in files]
    assert len(whole) == 1 and "README.md\n```\nhello\n```" in files  # README is named: first
    assert sorted(whole + outlined) == [0, 1, 2, 3, 4]
    for n in outlined:
        assert f"def greet{n}():\nclass Part{n}:" in files


def test_a_server_slow_to_tell_the_context_length_costs_the_run_no_more_than_a_health_check(
    project: Project,
) -> None:
    with FakeOllama([MODEL], context_length=2048) as fake:
        builtin_config(project, fake, ollama={"num_ctx": 8192, "num_predict": 256})
        project.ticket("task-44 - Greet.md", body="Change README.md to say hi.")
        fake.hang(8, path="/api/show")  # answers 2048, but only after 8 s: not waited for
        fake.reply(block("README.md", "hello\n", "hi\n"))
        assert run_once(project) == 0
        # health_check.timeout_s (2 s) bounds the question; the run trusts ollama.num_ctx
        assert [r.options["num_ctx"] for r in chats(fake)] == [8192]
