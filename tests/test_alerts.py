"""Operator notifications: real apprise sending to a local webhook through its json:// URLs.

The webhook (``FakeHook``) is a real HTTP server on 127.0.0.1 recording what apprise POSTs
(JSON with ``title``, ``message`` and ``type``); it can answer 500, or hold its answer until
the test releases it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Project, Running, captured_log, wait_until
from fake_ollama import FakeOllama
from fakehttp import FakeServer, Handler

from daemon import config as configuration
from daemon.alerts import Alerts
from daemon.config import NotifyConfig
from daemon.errors import ConfigError
from daemon.redact import Redactor

FAST: dict[str, Any] = {"batch_s": 0.3, "timeout_s": 5}  # a batch window short enough for tests
FMT = "{level} {message}"


def keep(text: str) -> str:
    """No redaction: whatever would leak does."""
    return text


class FakeHook(FakeServer):
    """A webhook: records each POST's JSON body and path; answers 500 on the paths in
    ``failing``, else the statuses in ``answers`` first, then ``status``. With ``hold`` set
    it answers only once ``release`` is set; ``arrived`` says a request came, ``answered``
    that an answer went."""

    label = "fake hook"
    handler = Handler

    def __init__(self) -> None:
        super().__init__()
        self.posts: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.failing: set[str] = set()
        self.answers: list[int] = []
        self.status = 200
        self.hold = False
        self.arrived = threading.Event()
        self.release = threading.Event()
        self.answered = threading.Event()
        self._mutex = threading.Lock()

    def json_url(self, path: str = "hook") -> str:
        return f"json://127.0.0.1:{self.port}/{path}"

    def _handle(self, h: Any, stopping: threading.Event) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length", 0)))
        with self._mutex:
            self.posts.append(json.loads(body))
            self.paths.append(h.path)
            if h.path in self.failing:
                status = 500
            else:
                status = self.answers.pop(0) if self.answers else self.status
        self.arrived.set()
        if self.hold:
            self.release.wait(timeout=30)
        self.answered.set()
        h.send(status, b"{}", "application/json")


@pytest.fixture
def hook() -> Iterator[FakeHook]:
    fake = FakeHook()
    fake.start()
    yield fake
    fake.release.set()  # a held answer goes, so that its thread ends
    fake.stop()
    assert not fake.errors


@contextlib.contextmanager
def running(cfg: NotifyConfig, redact: Callable[[str], str] = keep) -> Iterator[Alerts]:
    """Started alerts with short waits between tries, stopped at the end."""
    alerts = Alerts(cfg, {}, redact, backoff_s=0.01)
    alerts.start()
    try:
        yield alerts
    finally:
        alerts.stop(timeout_s=10)


@contextlib.contextmanager
def root_records() -> Iterator[list[logging.LogRecord]]:
    """The standard-library records that reach the root logger while the block runs: what the
    daemon forwards to its log."""
    found: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = found.append  # type: ignore[method-assign]
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield found
    finally:
        root.removeHandler(handler)


def senders() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "alerts"]


def test_events_within_batch_s_are_one_message(hook: FakeHook) -> None:
    kinds = ["failed"] * 7 + ["held"] * 3
    with running(NotifyConfig(urls=(hook.json_url(),), **FAST)) as alerts:
        for i, kind in enumerate(kinds):
            alerts.tell(kind, f"task-{i}: CHECKS_FAILED in stage checks")
        wait_until(lambda: hook.posts, timeout=10, what="the message")
    assert len(hook.posts) == 1
    [post] = hook.posts
    assert post["title"] == "ticketd: 7 failed, 3 held"
    assert post["message"].splitlines() == [
        f"- [{kind}] task-{i}: CHECKS_FAILED in stage checks" for i, kind in enumerate(kinds)
    ]
    assert post["type"] == "failure"


def test_only_the_events_of_on_are_sent(hook: FakeHook) -> None:
    cfg = NotifyConfig(urls=(hook.json_url(),), on=("held", "pr_merged"), **FAST)
    with running(cfg) as alerts:
        alerts.tell("failed", "task-1: AGENT_FAILED")
        alerts.tell("held", "task-2: SENSITIVE_PATH\n  .github/workflows/ci.yml")
        alerts.tell("ollama_down", "http://127.0.0.1:11434: connection refused")
        alerts.tell("pr_merged", "task-3: #12 merged")
        assert alerts.flush(10)
    [post] = hook.posts
    assert post["title"] == "ticketd: 1 held, 1 PR merged"
    assert post["message"] == (
        "- [held] task-2: SENSITIVE_PATH .github/workflows/ci.yml\n- [pr_merged] task-3: #12 merged"
    )
    assert post["type"] == "info"


def test_a_failed_send_is_tried_again(hook: FakeHook) -> None:
    hook.answers = [500, 500]
    cfg = NotifyConfig(urls=(hook.json_url(),), retries=3, **FAST)
    with captured_log("DEBUG", FMT) as lines, running(cfg) as alerts:
        alerts.tell("failed", "task-1: AGENT_FAILED")
        assert alerts.flush(10)
    assert len(hook.posts) == 3
    assert all(p["message"] == "- [failed] task-1: AGENT_FAILED" for p in hook.posts)
    [said] = [line.strip() for line in lines if "sent to" in line]
    assert said.startswith("INFO notify: 1 event sent to json://... at try 3 of 4, after: ")
    assert said.endswith("error=500; nothing lost")


def test_a_send_failing_every_try_is_logged_lost_and_later_events_still_go(
    hook: FakeHook,
) -> None:
    hook.status = 500
    cfg = NotifyConfig(urls=(hook.json_url(),), retries=2, **FAST)
    with captured_log("ERROR", FMT) as lines, running(cfg) as alerts:
        alerts.tell("failed", "task-1: AGENT_FAILED")
        alerts.tell("held", "task-2: SECRET_DETECTED")
        assert alerts.flush(10)
        assert len(hook.posts) == 3  # the first try and two more
        [lost] = [line.strip() for line in lines]
        assert lost.startswith("ERROR notify: 2 events lost for json://...: 3 tries failed, ")
        assert "error=500" in lost
        hook.status = 200
        alerts.tell("ollama_down", "http://127.0.0.1:11434: connection refused")
        assert alerts.flush(10)
    assert hook.posts[-1]["title"] == "ticketd: 1 Ollama down"
    assert len(lines) == 1


def test_each_destination_is_tried_again_alone(hook: FakeHook) -> None:
    hook.failing = {"/down"}
    cfg = NotifyConfig(urls=(hook.json_url("up"), hook.json_url("down")), retries=2, **FAST)
    with captured_log("ERROR", FMT) as lines, running(cfg) as alerts:
        alerts.tell("crashed", "ticketd: RuntimeError in the main loop")
        assert alerts.flush(10)
    assert hook.paths == ["/up", "/down", "/down", "/down"]  # /up got it once
    assert [line.split(":")[0] for line in lines] == ["ERROR notify"]


def test_tell_returns_while_a_send_hangs(hook: FakeHook) -> None:
    hook.hold = True
    cfg = NotifyConfig(urls=(hook.json_url(),), batch_s=0, timeout_s=30)
    with running(cfg) as alerts:
        alerts.tell("failed", "first")
        assert hook.arrived.wait(10)  # the sender is in its send; the hook holds the answer
        alerts.tell("failed", "second")
        alerts.tell("ollama_up", "third")
        assert not hook.answered.is_set()  # both returned before the hook answered
        hook.release.set()
        assert alerts.flush(10)
    assert [p["message"] for p in hook.posts] == [  # batch_s 0: one message each
        "- [failed] first",
        "- [failed] second",
        "- [ollama_up] third",
    ]


def test_a_hanging_destination_costs_timeout_s(hook: FakeHook) -> None:
    hook.hold = True  # released only at the end of the test
    cfg = NotifyConfig(urls=(hook.json_url(),), batch_s=0, retries=0, timeout_s=0.2)
    with captured_log("ERROR", FMT) as lines, running(cfg) as alerts:
        alerts.tell("crashed", "ticketd: RuntimeError in the main loop")
        assert alerts.flush(10)
    assert [line.split(":")[0] for line in lines] == ["ERROR notify"]
    assert "1 event lost for json://..." in lines[0]


def test_a_url_from_the_environment_is_used_and_never_logged(
    hook: FakeHook, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_HOOK", hook.json_url("secret-path-TOKEN123"))
    monkeypatch.setenv("NOTIFY_BAD", "nope://TOKEN123")  # apprise logs these whole
    monkeypatch.delenv("NOTIFY_MISSING", raising=False)
    cfg = NotifyConfig(urls_env=("NOTIFY_HOOK", "NOTIFY_MISSING", "NOTIFY_BAD"), retries=1, **FAST)
    hook.answers = [500]  # the first message is sent at its second try ...
    with captured_log("TRACE", FMT) as lines, root_records() as records:
        alerts = Alerts(cfg, os.environ, keep, backoff_s=0.01)
        alerts.start()
        try:
            alerts.tell("failed", "task-1: AGENT_FAILED")
            assert alerts.flush(10)
            hook.answers = [500, 500]  # ... the second is lost
            alerts.tell("failed", "task-2: AGENT_FAILED")
            assert alerts.flush(10)
        finally:
            alerts.stop()
    assert hook.paths == ["/secret-path-TOKEN123"] * 4
    assert alerts.destinations == ("json://...",)
    said = [line.strip() for line in lines]
    assert [line for line in said if line.startswith("WARNING")] == [
        "WARNING notify.urls_env: $NOTIFY_MISSING is not set; skipped",
        "WARNING notify.urls_env: $NOTIFY_BAD is not a URL apprise can read; skipped",
    ]
    assert any(line.startswith("ERROR notify: 1 event lost for json://...") for line in said)
    assert not [line for line in said if "TOKEN123" in line]
    assert not [r for r in records if r.name.startswith("apprise")]  # it logs URLs whole
    assert not [r for r in records if "TOKEN123" in r.getMessage()]


def test_every_text_passes_the_redactor(hook: FakeHook) -> None:
    redactor = Redactor(["hunter2-hunter2"])
    with running(NotifyConfig(urls=(hook.json_url(),), **FAST), redactor) as alerts:
        alerts.tell("failed", "task-1: the agent printed hunter2-hunter2")
        assert alerts.flush(10)
    assert hook.posts[0]["message"] == "- [failed] task-1: the agent printed ***"


def test_a_long_message_is_cut_and_a_full_queue_counts_the_rest(hook: FakeHook) -> None:
    alerts = Alerts(NotifyConfig(urls=(hook.json_url(),), batch_s=60), {}, keep)
    for i in range(1005):  # before start(): the queue takes 1000, then counts
        alerts.tell("failed", f"task-{i}: AGENT_FAILED")
    assert not alerts.flush(5)  # no sender yet: flush() does not wait for one
    alerts.start()
    try:
        assert alerts.flush(10)
    finally:
        alerts.stop()
    [post] = hook.posts
    assert post["title"] == "ticketd: 1005 failed"
    lines = post["message"].splitlines()
    assert len(lines) == 51
    assert lines[0] == "- [failed] task-0: AGENT_FAILED"
    assert lines[49] == "- [failed] task-49: AGENT_FAILED"
    assert lines[50] == "... and 955 more"


def test_flush_sends_at_once_and_stop_leaves_no_thread(hook: FakeHook) -> None:
    alerts = Alerts(NotifyConfig(urls=(hook.json_url(),), batch_s=60), {}, keep)
    alerts.start()
    assert len(senders()) == 1
    alerts.tell("crashed", "ticketd: RuntimeError in the main loop")
    assert alerts.flush(10)  # without waiting out batch_s, a minute
    assert [p["title"] for p in hook.posts] == ["ticketd: 1 crashed"]
    alerts.tell("failed", "task-9: AGENT_FAILED")
    alerts.stop(timeout_s=10)  # sends what is queued, then ends
    assert [p["title"] for p in hook.posts] == ["ticketd: 1 crashed", "ticketd: 1 failed"]
    assert not senders()
    alerts.tell("failed", "task-10: AGENT_FAILED")  # after stop(): dropped
    assert alerts.flush(1)
    assert len(hook.posts) == 2


def test_without_a_url_there_is_no_thread() -> None:
    alerts = Alerts(NotifyConfig(), {}, keep)
    alerts.start()
    alerts.tell("crashed", "ticketd: RuntimeError in the main loop")
    assert not senders()
    assert alerts.flush(1)
    alerts.stop()


def test_notify_defaults(tmp_path: Path) -> None:
    notify = configuration.parse("", tmp_path / "c.yaml").notify
    assert notify == NotifyConfig()
    assert (notify.urls, notify.urls_env) == ((), ())
    assert notify.on == ("failed", "held", "ollama_down", "ollama_up", "crashed")
    assert (notify.batch_s, notify.retries, notify.timeout_s) == (60, 3, 10)
    # YAML reads an unquoted "on:" key as true: it is still notify.on
    text = "notify:\n  urls: [ntfy://ticketd-alerts]\n  on: [pr_opened]\n"
    notify = configuration.parse(text, tmp_path / "c.yaml").notify
    assert (notify.urls, notify.on) == (("ntfy://ticketd-alerts",), ("pr_opened",))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "notify:\n  urls: [ntfy://ticketd-alerts, 'nope://x']\n",
            "cfg.yaml:2: notify.urls: Value error, 'nope://x' is not an apprise URL",
        ),
        (
            "notify:\n  on: [failed, exploded]\n",
            "cfg.yaml:2: notify.on.1: Input should be 'failed', 'held', 'pr_opened'",
        ),
        ("notify:\n  batch_s: -1\n", "cfg.yaml:2: notify.batch_s: Input should be greater"),
        ("notify:\n  retries: 11\n", "cfg.yaml:2: notify.retries: Input should be less"),
        ("notify:\n  timeout_s: 0\n", "cfg.yaml:2: notify.timeout_s: Input should be greater"),
    ],
)
def test_bad_notify_values_name_key_and_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        configuration.parse(text, tmp_path / "cfg.yaml")
    assert message in caught.value.message.replace(str(tmp_path) + "/", "")


def test_the_urls_of_urls_env_are_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SLACK", "slack://T0000/B0000/XXXXXXXXXXXXXXXXXXXXXXXX")
    monkeypatch.delenv("NOTIFY_UNSET", raising=False)
    cfg = configuration.parse("notify: {urls_env: [NOTIFY_SLACK, NOTIFY_UNSET]}\n", tmp_path / "c")
    assert "slack://T0000/B0000/XXXXXXXXXXXXXXXXXXXXXXXX" in cfg.secret_values()
    assert "" not in cfg.secret_values()


# -- the daemon tells ---------------------------------------------------------------------------


def test_the_daemon_tells_of_a_failure_and_of_ollama_going_and_coming_back(
    project: Project, fake_ollama: FakeOllama, hook: FakeHook
) -> None:
    """A real daemon (builtin agent, fake Ollama): a ticket that fails and Ollama going away
    and coming back reach the webhook, batched, while the tickets go on."""
    project.write_config(
        agent={"kind": "builtin", "max_reflections": 0, "candidates": 1},
        ollama={
            "host": fake_ollama.url,
            "retries": 0,
            "health_check": {"interval_s": 0.2, "timeout_s": 1},
            "circuit_breaker": {"failure_threshold": 1, "reset_timeout_s": 0.3},
        },
        notify={"urls": [hook.json_url()], "batch_s": 0.2},
    )
    fake_ollama.reply("I cannot do that.")  # no edit at all: the ticket fails
    project.ticket("task-9 - Impossible.md", body="Do the impossible.")
    with Running(project):
        wait_until(lambda: project.where().get("failed"), what="task-9 failed")
        wait_until(lambda: hook.posts, what="the failure told")
        fake_ollama.stop()
        wait_until(lambda: "down" in json.dumps(hook.posts), what="Ollama down told")
        fake_ollama.start()
        wait_until(lambda: "answers again" in json.dumps(hook.posts), what="Ollama up told")
    first = hook.posts[0]
    assert first["title"].startswith("ticketd: 1 failed") and first["type"] == "failure"
    assert "- [failed] task-9: " in first["message"] and "in stage" in first["message"]
    said = "\n".join(p["message"] for p in hook.posts)
    assert f"[ollama_down] Ollama at {fake_ollama.url} stopped answering" in said
    assert f"[ollama_up] Ollama at {fake_ollama.url} answers again" in said
