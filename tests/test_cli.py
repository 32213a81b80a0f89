"""The ticketd command as a user meets it: help, validate, new, exit statuses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import Project, ticketd

from daemon import tickets

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [
    "run",
    "status",
    "validate",
    "new",
    "retry-failed",
    "doctor",
    "stats",
    "insights",
    "install-service",
    "secrets scan",
]


def test_top_level_help_lists_every_command() -> None:
    result = ticketd("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        first = command.split()[0]
        assert re.search(rf"^\W*{first}\s+\S", result.stdout, re.M), command


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_and_a_readme_section(command: str) -> None:
    result = ticketd(*command.split(), "--help")
    assert result.returncode == 0
    assert "Usage:" in result.stdout and len(result.stdout) > 200
    assert f"### `ticketd {command}" in (ROOT / "README.md").read_text()


def test_unknown_option_is_usage_error() -> None:
    result = ticketd("run", "--bogus")
    assert result.returncode == 2
    assert "No such option: --bogus" in result.stderr


def test_validate_reports_each_file_and_exits_1_on_any_invalid(tmp_path: Path) -> None:
    good = tmp_path / "task-1 - Good.md"
    good.write_text("---\nid: task-1\ntitle: Good one\n---\n\n## Description\n\nx\n")
    bad = tmp_path / "task-2 - Bad.md"
    bad.write_bytes(b"---\nid: task-2\ntitle: ok\n---\nfine\n\xc3\x28\n")
    result = ticketd("validate", str(good), str(bad))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"ok      {good}: task-1 'Good one'",
        f"INVALID {bad}: not UTF-8: invalid byte 0xc3 on line 6",
        "1 valid, 1 invalid",
    ]
    assert ticketd("validate", str(good)).returncode == 0


def test_validate_without_files_checks_the_whole_backlog(project: Project) -> None:
    project.ticket("task-1 - A.md")
    project.ticket("task-2 - B.md", folder="done")
    result = ticketd("validate", "--config", str(project.config_path))
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines()[-1] == "2 valid, 0 invalid"


def test_new_writes_a_backlog_md_ticket_with_the_next_free_id(project: Project) -> None:
    project.ticket("task-7 - Old.md", folder="done")
    project.ticket("task-3 - Older.md", folder="failed")
    result = ticketd(
        "new", "Fix login redirect", "--description", "After login, go back.",
        "--priority", "high", "--label", "bug", "--label", "auth",
        "--ac", "Redirects to the page", "--ac", "Has a test",
        "--config", str(project.config_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    path = project.folder("todo") / "task-8 - Fix-login-redirect.md"
    assert result.stdout.strip() == str(path)
    t = tickets.parse_file(path)
    assert (t.id, t.title, t.priority, t.labels) == (
        "task-8",
        "Fix login redirect",
        "high",
        ("bug", "auth"),
    )
    assert t.description == "After login, go back."
    assert [c.text for c in t.acceptance_criteria] == ["Redirects to the page", "Has a test"]
    assert t.status == "To Do"


def test_new_rejects_a_bad_priority(project: Project) -> None:
    result = ticketd("new", "X", "--priority", "urgent", "--config", str(project.config_path))
    assert result.returncode == 2
    assert "--priority must be high, medium or low, not 'urgent'" in result.stderr
    assert project.where() == {}


def test_validate_accepts_folders(project: Project) -> None:
    project.ticket("task-1 - A.md")
    (project.folder("todo") / "task-2 - Bad.md").write_bytes(b"\x00")
    result = ticketd("validate", str(project.folder("todo")))
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1] == "1 valid, 1 invalid"
