"""``ticketd doctor`` as a user meets it: one line per check, the fix for each FAIL, exit
statuses; and ``install-service`` writing the shell's PATH into the unit doctor reads back.

Every test runs the real CLI on a real repository with a bare remote, against the fake Ollama
and fake GitHub servers, with HOME in a temporary folder so that no real unit is seen.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import Project, git, ticketd
from fake_github import FakeGitHub
from fake_ollama import FakeOllama

from daemon import service

NAMES = ["config", "agent", "sandbox", "repo", "remote", "push", "folders", "backlog", "unit"]
TOKEN_ENV = "GH_TOKEN_TEST"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


def doctor(
    project: Project, home: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return ticketd(
        "doctor",
        "--config",
        str(project.config_path),
        *args,
        env={"HOME": str(home), **(env or {})},
    )


def checks(project: Project, home: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``doctor --json``; the report, with ``code`` the exit status and ``by_name``."""
    result = doctor(project, home, "--json", env=env)
    assert result.stderr == ""
    report: dict[str, Any] = json.loads(result.stdout)
    report["code"] = result.returncode
    report["by_name"] = {c["name"]: c for c in report["checks"]}
    return report


def github_section(fake: FakeGitHub) -> dict[str, Any]:
    return {"enabled": True, "base_url": fake.url, "repo": fake.full_name, "token_env": TOKEN_ENV}


def with_ollama(project: Project, fake: FakeOllama, **sections: Any) -> None:
    """A command agent that uses ``ollama.models`` (as aider does), no sandbox."""
    project.write_config(
        agent={"sandbox": "off", "uses_ollama": True},
        ollama={"host": fake.url, "models": ["qwen2.5-coder:7b"], **sections.pop("ollama", {})},
        **sections,
    )


def assert_fails(report: dict[str, Any], name: str, detail: str, fix: str) -> None:
    """Exit status 1, and the check ``name`` FAILs saying ``detail`` with ``fix``."""
    check = report["by_name"][name]
    assert report["code"] == 1 and report["ok"] is False
    assert check["status"] == "FAIL", check
    assert detail in check["detail"], check
    assert fix in check["fix"], check


def test_a_healthy_setup_passes_every_check(
    project: Project, home: Path, fake_ollama: FakeOllama, fake_github: FakeGitHub
) -> None:
    """On a setup that can run tickets, every line is ok (or a warning, such as no unit
    installed), the exit status is 0, and --json gives the same checks as data."""
    project.write_config(
        agent={"sandbox": "auto", "uses_ollama": True},
        ollama={"host": fake_ollama.url, "models": ["qwen2.5-coder:7b"]},
        github=github_section(fake_github),
    )
    env = {TOKEN_ENV: "t0k3n"}
    result = doctor(project, home, env=env)
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert {line.split()[0] for line in lines[:-1]} <= {"ok", "warn"}
    assert lines[0] == f"ok    config    loaded {project.config_path}"
    assert lines[3] == f"ok    repo      {project.repo}, remote origin: {project.remote}"
    assert lines[5] == (
        f"ok    push      {project.remote} accepts a push to ticketd/doctor-check (dry run)"
    )
    assert lines[-2] == (
        "warn  unit      not installed (fine for a foreground run; `ticketd install-service` "
        "to install)"
    )
    assert lines[-1].startswith("12 checks: 0 failed, 0 skipped,")
    assert f"ok    backlog   folders under {project.backlog}" in lines
    assert project.remote_branches() == ["main"]  # the push was a dry run

    report = checks(project, home, env)
    assert report["code"] == 0 and report["ok"] is True
    assert [c["name"] for c in report["checks"]] == [
        *NAMES[:6],
        "ollama",
        "model qwen2.5-coder:7b",
        "github",
        *NAMES[6:],
    ]
    assert {c["status"] for c in report["checks"]} <= {"ok", "warn"}
    assert report["by_name"]["model qwen2.5-coder:7b"]["detail"] == (
        "pulled, context length 32768 >= ollama.num_ctx 16384"
    )
    assert report["by_name"]["github"]["detail"] == (
        "ticketd-bot on acme/widgets; token scopes: repo"
    )


def test_without_models_or_github_those_checks_say_so(project: Project, home: Path) -> None:
    """An agent that uses no Ollama model needs no Ollama: that line is ok, and no model or
    GitHub line appears."""
    project.write_config(agent={"sandbox": "off"})
    report = checks(project, home)
    assert report["code"] == 0
    assert [c["name"] for c in report["checks"]] == [*NAMES[:6], "ollama", *NAMES[6:]]
    assert report["by_name"]["ollama"]["detail"] == "not used by this configuration"
    assert report["by_name"]["sandbox"]["status"] == "warn"


def test_a_missing_agent_program_fails_with_how_to_install_it(project: Project, home: Path) -> None:
    """The agent program not on PATH is named, with where it was looked for and the fix."""
    project.write_config(agent={"sandbox": "off", "command": ["no-such-agent", "{prompt_file}"]})
    result = doctor(project, home, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert (
        "FAIL  agent     'no-such-agent' is not on this shell's PATH, as no unit is installed: "
        "/usr/bin:/bin -- fix: install it (aider: pipx install aider-chat) or change "
        "agent.command"
    ) in result.stdout.splitlines()


def test_the_agent_is_looked_for_on_the_installed_units_path(
    project: Project, home: Path, tmp_path: Path
) -> None:
    """The daemon under systemd gets the PATH install-service wrote into the unit, not the
    shell's: an agent found only on the shell's PATH fails until the unit is installed again
    from that shell."""
    tools = tmp_path / "tools"
    tools.mkdir()
    agent = tools / "my-agent"
    agent.write_text("#!/bin/sh\nexit 0\n")
    agent.chmod(0o755)
    project.write_config(agent={"sandbox": "off", "command": ["my-agent", "{prompt_file}"]})
    base = os.environ["PATH"]
    install = ("install-service", "--user", "--config", str(project.config_path))
    assert ticketd(*install, env={"HOME": str(home), "PATH": base}).returncode == 0
    unit = service.unit_path(True, home)
    assert f"Environment=PATH={base}\n" in unit.read_text()

    report = checks(project, home, {"PATH": f"{tools}:{base}"})
    assert_fails(
        report,
        "agent",
        f"'my-agent' is not on the PATH of {unit}: {base}",
        "run `ticketd install-service` again from a shell whose PATH finds it",
    )
    assert report["by_name"]["unit"]["status"] == "ok"  # the unit is as it was installed

    assert ticketd(*install, env={"HOME": str(home), "PATH": f"{tools}:{base}"}).returncode == 0
    report = checks(project, home, {"PATH": f"{tools}:{base}"})
    assert report["code"] == 0
    assert report["by_name"]["agent"]["detail"] == f"{agent}, found on the PATH of {unit}"


def test_an_unreachable_remote_fails_and_the_push_is_skipped(
    project: Project, home: Path, tmp_path: Path
) -> None:
    """A remote that does not answer is named with git's message; the push check, which
    needs it, says it was skipped."""
    missing = tmp_path / "missing.git"
    project.write_config(agent={"sandbox": "off"}, repo={"remote": str(missing)})
    report = checks(project, home)
    assert_fails(report, "remote", f"cannot reach {missing}: git ls-remote failed", "repo.remote")
    assert report["by_name"]["push"]["detail"] == "skipped: needs the remote check to pass"


def test_a_missing_base_branch_fails_naming_the_key(project: Project, home: Path) -> None:
    """A base branch the remote lacks is named, with the branches it has."""
    project.write_config(agent={"sandbox": "off"}, repo={"base_branch": "develop"})
    report = checks(project, home)
    assert_fails(
        report,
        "remote",
        f"{project.remote} has no branch 'develop'",
        "set repo.base_branch to a branch of the remote (it has: main), or push develop there",
    )


def test_a_remote_that_refuses_pushes_fails_the_push_check(project: Project, home: Path) -> None:
    """Fetching works but pushing cannot: the push check names the push URL and the way to
    change it."""
    git(project.repo, "remote", "set-url", "--push", "origin", "/nonexistent.git")
    project.write_config(agent={"sandbox": "off"})
    report = checks(project, home)
    assert report["by_name"]["remote"]["status"] == "ok"
    assert_fails(
        report,
        "push",
        "/nonexistent.git refuses a push: git push failed",
        f"git -C {project.repo} remote set-url --push origin URL",
    )


def test_ollama_down_fails_with_how_to_start_it(
    project: Project, home: Path, fake_ollama: FakeOllama
) -> None:
    """Ollama not answering is a FAIL saying how to start it at the configured host; the
    model checks, which need it, are skipped."""
    with_ollama(project, fake_ollama)
    fake_ollama.stop()
    report = checks(project, home)
    assert_fails(
        report,
        "ollama",
        f"no answer from {fake_ollama.url}",
        f"start Ollama (`ollama serve` or `systemctl start ollama`) at {fake_ollama.url}",
    )
    assert report["by_name"]["model qwen2.5-coder:7b"]["detail"].startswith("skipped:")


def test_a_model_not_pulled_fails_with_the_pull_command(
    project: Project, home: Path, fake_ollama: FakeOllama
) -> None:
    """Each configured model has its line; one not pulled says the `ollama pull` to run."""
    with_ollama(project, fake_ollama, ollama={"models": ["qwen2.5-coder:7b", "llama3:8b"]})
    report = checks(project, home)
    assert report["by_name"]["model qwen2.5-coder:7b"]["status"] == "ok"
    assert_fails(report, "model llama3:8b", "not pulled", "ollama pull llama3:8b")


def test_a_model_with_a_short_context_fails_naming_num_ctx(
    project: Project, home: Path, fake_ollama: FakeOllama
) -> None:
    """A model whose context is shorter than ollama.num_ctx would have its prompts cut: the
    fix names the largest num_ctx it takes."""
    fake_ollama.context_length = 8192
    with_ollama(project, fake_ollama)
    report = checks(project, home)
    assert_fails(
        report,
        "model qwen2.5-coder:7b",
        "context length 8192 < ollama.num_ctx 16384",
        "set ollama.num_ctx to at most 8192 or use a model with a longer context",
    )


def test_a_rejected_token_fails(project: Project, home: Path, fake_github: FakeGitHub) -> None:
    """A token GitHub does not accept is named by its variable."""
    project.write_config(agent={"sandbox": "off"}, github=github_section(fake_github))
    report = checks(project, home, {TOKEN_ENV: "wrong-token"})
    assert_fails(
        report,
        "github",
        f"the token in ${TOKEN_ENV} was rejected",
        f"put a valid token in ${TOKEN_ENV}",
    )


def test_an_unset_token_fails_naming_the_variable(
    project: Project, home: Path, fake_github: FakeGitHub
) -> None:
    """github.enabled without the token's variable set says which variable to set."""
    project.write_config(agent={"sandbox": "off"}, github=github_section(fake_github))
    report = checks(project, home, {TOKEN_ENV: ""})
    assert_fails(report, "github", f"${TOKEN_ENV} is not set", f"export {TOKEN_ENV}=<token>")


def test_a_classic_token_without_the_repo_scope_fails(project: Project, home: Path) -> None:
    """A classic token that may read but not push says which scope it lacks and has."""
    with FakeGitHub(scopes="read:org, gist") as fake:
        project.write_config(agent={"sandbox": "off"}, github=github_section(fake))
        report = checks(project, home, {TOKEN_ENV: fake.token})
    assert_fails(
        report,
        "github",
        f"the token in ${TOKEN_ENV} lacks the repo scope (it has: read:org, gist)",
        "a classic token with the repo scope",
    )
    assert not fake.problems()


@pytest.mark.parametrize("push", [True, False])
def test_a_fine_grained_token_needs_push_permission(
    project: Project, home: Path, push: bool
) -> None:
    """A fine-grained token (no X-OAuth-Scopes) passes when the repository grants push."""
    with FakeGitHub(scopes=None, push=push) as fake:
        project.write_config(agent={"sandbox": "off"}, github=github_section(fake))
        report = checks(project, home, {TOKEN_ENV: fake.token})
    assert not fake.problems()
    if push:
        assert report["code"] == 0
        assert report["by_name"]["github"]["detail"] == (
            "ticketd-bot on acme/widgets; fine-grained token that may push"
        )
    else:
        assert_fails(
            report,
            "github",
            f"the token in ${TOKEN_ENV} may not push to acme/widgets",
            "a fine-grained token with Contents and Pull requests read-write",
        )


def test_the_token_never_appears_in_the_output(
    project: Project, home: Path, fake_github: FakeGitHub
) -> None:
    """Whether the token is accepted or not, plain or --json, doctor never prints it."""
    secret = "ghp_doctorNeverPrintsThis0123456789"
    fake_github.token = secret
    project.write_config(agent={"sandbox": "off"}, github=github_section(fake_github))
    for token in (secret, secret + "x"):
        for args in ((), ("--json",)):
            result = doctor(project, home, *args, env={TOKEN_ENV: token})
            assert "github" in result.stdout
            assert secret not in result.stdout + result.stderr


def test_a_state_dir_that_is_a_file_fails_naming_the_path(project: Project, home: Path) -> None:
    """A folder the daemon cannot write is named with its key; the push check, which needs
    ticketd's repository there, is skipped."""
    project.write_config(agent={"sandbox": "off"})
    state = project.root / "state"
    state.write_text("in the way\n")
    report = checks(project, home)
    assert_fails(
        report,
        "folders",
        f"state_dir {state} is not a folder",
        f"make {state} a folder this user can write, or change state_dir",
    )
    assert report["by_name"]["push"]["detail"].startswith("skipped:")


def test_a_stale_unit_fails_and_a_fresh_one_passes(project: Project, home: Path) -> None:
    """An installed unit that differs from what install-service writes now (an older
    ticketd, a moved config) says to install it again; once it is, the line is ok."""
    project.write_config(agent={"sandbox": "off"})
    unit = service.unit_path(True, home)
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\nExecStart=/old/ticketd run\n")
    report = checks(project, home)
    assert_fails(
        report,
        "unit",
        f"{unit} differs from what install-service writes now",
        f"run `ticketd install-service --user --config {project.config_path}` again, then "
        "`systemctl --user daemon-reload && systemctl --user restart ticketd`",
    )

    install = ("install-service", "--user", "--config", str(project.config_path))
    assert ticketd(*install, env={"HOME": str(home)}).returncode == 0
    report = checks(project, home)
    assert report["code"] == 0
    assert report["by_name"]["unit"] == {
        "name": "unit",
        "status": "ok",
        "detail": f"{unit} is up to date (systemctl --user)",
        "fix": None,
    }


def test_a_bad_config_exits_2_naming_the_file_and_key(project: Project, home: Path) -> None:
    """A config that cannot be loaded is exit status 2, with the file and the key."""
    project.config_path.write_text("agent:\n  sandbox: sometimes\n")
    result = doctor(project, home)
    assert result.returncode == 2 and result.stdout == ""
    assert f"{project.config_path}:2: agent.sandbox:" in result.stderr


def test_help_says_what_is_checked_and_the_exit_statuses() -> None:
    """`ticketd doctor --help` teaches the checks and what the exit status means."""
    result = ticketd("doctor", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    names = ("config", "agent", "sandbox", "push", "ollama", "github", "folders", "backlog", "unit")
    for name in names:
        assert name in text
    assert "0 when nothing FAILs" in text and "1 when a check FAILs" in text
    assert "2 when the config cannot be read" in text


def test_install_service_writes_the_shells_path_into_the_unit(project: Project, home: Path) -> None:
    """The unit gives the daemon the PATH of the shell that installed it, quoted for systemd,
    and reads back unchanged."""
    path = "/opt/my tools/bin:/usr/bin:/bin"
    result = ticketd(
        "install-service", "--print", "--user", "--config", str(project.config_path),
        env={"HOME": str(home), "PATH": f"{path}:{os.environ['PATH']}"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f'Environment="PATH={path}:' in result.stdout
    assert service.unit_environment(result.stdout)["PATH"].startswith(path)
    assert "Environment=PATH=" in ticketd("install-service", "--help").stdout


@pytest.mark.parametrize("value", ["/usr/bin", "/a b/c:/d", '/x"y\\z:/100%', "$HOME/bin"])
def test_unit_environment_reads_back_what_render_wrote(tmp_path: Path, value: str) -> None:
    """Whatever PATH install-service writes, doctor reads back the same value."""
    text = service.render(
        service.load_template(True),
        executable=tmp_path / "ticketd",
        config=tmp_path / "config.yaml",
        workdir=tmp_path,
        rw_paths=[tmp_path],
        user=None,
        environment={"PATH": value},
    )
    assert service.unit_environment(text)["PATH"] == value
    assert service.unit_environment(text)["XDG_CACHE_HOME"] == "%C/ticketd"
