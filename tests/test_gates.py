"""The gates between the agent and the outside world: secret scan, LLM review, signing."""

from __future__ import annotations

import json
import os
import random
import shutil
import string
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PY, SIDE_CHANNEL, Project, git
from fake_github import FakeGitHub
from fake_ollama import FakeOllama

from daemon import config as configuration
from daemon.supervisor import Supervisor

MODEL = "qwen2.5-coder:7b"


def fake_pat() -> str:
    rng = random.Random()
    return "ghp_" + "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(36))


def writing_agent(content: str, path: str = "settings.py") -> list[str]:
    return [PY, "-c", f"open({path!r}, 'w').write({content!r})"]


def run_once(project: Project) -> int:
    cfg = configuration.load(project.config_path)
    return Supervisor(cfg, once=True, log_to_stderr=False).run()


def held(project: Project, name: str) -> dict:
    return json.loads((project.folder("review") / name.replace(".md", ".review.json")).read_text())


def all_text(root: Path) -> str:
    return "\n".join(
        p.read_text(errors="replace")
        for p in root.rglob("*")
        if p.is_file() and ".git" not in p.parts
    )


def test_a_secret_holds_the_ticket_and_nothing_is_committed(
    project: Project, tmp_path_factory: pytest.TempPathFactory
) -> None:
    token = fake_pat()  # handed to the agent through a file, so no config holds it
    source = tmp_path_factory.mktemp("elsewhere") / "token"
    source.write_text(f'GITHUB = "{token}"\n')
    copy = f"import shutil; shutil.copy({str(source)!r}, 'settings.py')"
    project.write_config(agent={"command": [PY, "-c", copy], **SIDE_CHANNEL})
    name = "task-1 - Leaky.md"
    project.ticket(name)

    assert run_once(project) == 0

    assert project.where() == {"review": [name]}
    record = held(project, name)
    assert record["reason"] == "SECRET_DETECTED" and record["stage"] == "secrets"
    [finding] = record["findings"]
    assert finding["file"] == "settings.py" and finding["line"] == 1
    assert len(finding["redacted"].rstrip("…")) <= 4 and token.startswith(
        finding["redacted"].rstrip("…")
    )
    assert project.remote_branches() == ["main"]
    assert token not in all_text(project.root / "backlog") + all_text(project.root / "logs")
    assert token not in all_text(project.root / "state")


def test_on_finding_fail_sends_it_to_failed(project: Project) -> None:
    project.write_config(
        agent={"command": writing_agent(f'KEY = "{fake_pat()}"\n')}, secrets={"on_finding": "fail"}
    )
    project.ticket("task-2 - Leaky.md")
    assert run_once(project) == 1
    err = json.loads((project.folder("failed") / "task-2 - Leaky.error.json").read_text())
    assert (err["errorCode"], err["stage"], err["retryable"]) == (
        "SECRET_DETECTED",
        "secrets",
        False,
    )


def test_an_allowlisted_line_passes(project: Project) -> None:
    line = f'KEY = "{fake_pat()}"  # pragma: allowlist secret\n'
    project.write_config(agent={"command": writing_agent(line)})
    project.ticket("task-3 - Allowed.md")
    assert run_once(project) == 0
    assert project.where() == {"done": ["task-3 - Allowed.md"]}


def review_config(project: Project, fake: FakeOllama, **review: object) -> None:
    project.write_config(
        agent={"command": writing_agent("def f(x):\n    return eval(x)\n", "app.py")},
        review={"enabled": True, **review},
        ollama={
            "host": fake.url,
            "models": [MODEL],
            "retries": 0,
            "health_check": {"interval_s": 0.2, "timeout_s": 2},
        },
    )


def verdict(severity: str) -> str:
    return json.dumps(
        {
            "verdict": "request_changes",
            "summary": "eval on input",
            "issues": [
                {
                    "severity": severity,
                    "category": "security",
                    "file": "app.py",
                    "line": 2,
                    "description": "eval of user input",
                }
            ],
        }
    )


def test_a_critical_review_holds_the_ticket(project: Project, fake_ollama: FakeOllama) -> None:
    review_config(project, fake_ollama)
    name = "task-4 - Eval.md"
    project.ticket(name)
    fake_ollama.reply(verdict("CRITICAL"))

    assert run_once(project) == 0

    assert project.where() == {"review": [name]}
    record = held(project, name)
    assert record["reason"] == "REVIEW_BLOCKED"
    assert record["review"]["issues"][0]["severity"] == "CRITICAL"
    assert project.remote_branches() == ["main"]
    [request] = fake_ollama.requests_to("/api/chat")
    assert request.body["format"]["required"] == ["verdict", "summary", "issues"]
    assert "return eval(x)" in request.messages[-1]["content"]


def test_a_medium_issue_does_not_block(project: Project, fake_ollama: FakeOllama) -> None:
    review_config(project, fake_ollama)
    project.ticket("task-5 - Fine.md")
    fake_ollama.reply(verdict("MEDIUM"))
    assert run_once(project) == 0
    assert project.where() == {"done": ["task-5 - Fine.md"]}


@pytest.mark.parametrize(("on_error", "folder"), [("fail", "failed"), ("allow", "done")])
def test_an_invalid_review_answer_is_retried_once(
    project: Project, fake_ollama: FakeOllama, on_error: str, folder: str
) -> None:
    review_config(project, fake_ollama, on_error=on_error)
    project.ticket("task-6 - Odd.md")
    fake_ollama.reply("this is not json")
    fake_ollama.reply('{"verdict": "maybe"}')
    run_once(project)
    assert project.where() == {folder: ["task-6 - Odd.md"]}
    assert len(fake_ollama.requests_to("/api/chat")) == 2
    if folder == "failed":
        err = json.loads((project.folder("failed") / "task-6 - Odd.error.json").read_text())
        assert err["errorCode"] == "REVIEW_FAILED"


@pytest.fixture
def token() -> Iterator[None]:
    os.environ["GITHUB_TOKEN"] = "t0k3n"
    yield
    del os.environ["GITHUB_TOKEN"]


@pytest.mark.usefixtures("token")
def test_a_blocked_review_can_open_a_draft_pr(
    project: Project, fake_ollama: FakeOllama, fake_github: FakeGitHub
) -> None:
    review_config(project, fake_ollama, on_block="draft_pr")
    cfg = project.config_path.read_text()
    project.config_path.write_text(
        cfg + f"github: {{enabled: true, repo: acme/widgets, base_url: '{fake_github.url}'}}\n"
    )
    project.ticket("task-7 - Draft.md")
    fake_ollama.reply(verdict("CRITICAL"))
    assert run_once(project) == 0
    [pr] = fake_github.open_pulls()
    assert pr["draft"] is True and "**CRITICAL** (security) `app.py:2`" in pr["body"]


@pytest.mark.skipif(shutil.which("gpg") is None, reason="gpg is not installed on this machine")
def test_signed_commits(project: Project, tmp_path: Path) -> None:
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}
    subprocess.run(
        [
            "gpg",
            "--batch",
            "--passphrase",
            "",
            "--quick-gen-key",
            "Ticketd Test <t@example.invalid>",
            "ed25519",
            "sign",
            "never",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    git(project.repo, "config", "user.signingkey", "t@example.invalid")
    project.write_config(repo={"sign_commits": True})
    project.ticket("task-8 - Signed.md")
    os.environ["GNUPGHOME"] = str(home)
    try:
        assert run_once(project) == 0
        shown = subprocess.run(
            ["git", "log", "-1", "--format=%G? %GS", "ticketd/task-8-signed"],
            cwd=project.remote,
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
    finally:
        del os.environ["GNUPGHOME"]
        subprocess.run(["gpgconf", "--kill", "all"], env=env, capture_output=True, timeout=30)
    assert shown.startswith("G ") and "Ticketd Test" in shown


def test_secrets_scan_cli(tmp_path: Path) -> None:
    from conftest import ticketd

    token = fake_pat()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "app.py").write_text(f'import os\nTOKEN = "{token}"\n')
    (tmp_path / "src" / "ok.py").write_text(f'TOKEN = "{token}"  # gitleaks:allow\n')
    (tmp_path / "src" / "blob.bin").write_bytes(b"\x00\x01" + token.encode())
    result = ticketd("secrets", "scan", "--json", str(tmp_path / "src"))
    assert result.returncode == 1, result.stderr
    findings = json.loads(result.stdout)["findings"]
    assert [(f["file"].endswith("app.py"), f["line"]) for f in findings] == [(True, 2)]
    assert token not in result.stdout + result.stderr
    baseline = tmp_path / "baseline.json"
    assert (
        ticketd(
            "secrets", "scan", "--write-baseline", str(baseline), str(tmp_path / "src")
        ).returncode
        == 0
    )
    again = ticketd("secrets", "scan", "--baseline", str(baseline), str(tmp_path / "src"))
    assert again.returncode == 0 and again.stdout.strip() == "0 finding(s)"
    assert token not in baseline.read_text()
