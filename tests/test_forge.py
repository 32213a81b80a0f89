"""Pull requests through the real PyGithub against a fake GitHub speaking its REST API."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PY, SIDE_CHANNEL, Project, git
from fake_github import FakeGitHub

from daemon import config as configuration
from daemon.gitcmd import repo_from_remote
from daemon.supervisor import Supervisor, preflight

TOKEN = "t0k3n"


@pytest.fixture
def token() -> Iterator[None]:
    os.environ["GITHUB_TOKEN"] = TOKEN
    yield
    del os.environ["GITHUB_TOKEN"]


def counting_agent(starts: Path) -> list[str]:
    return [
        PY,
        "-c",
        (
            "import pathlib, sys\n"
            f"with open({str(starts)!r}, 'a') as f: f.write('x')\n"
            "pathlib.Path('feature.txt').write_text('new feature\\n')\n"
        ),
    ]


def github_config(project: Project, fake: FakeGitHub, tmp_path: Path, **github: object) -> Path:
    starts = tmp_path / "agent-starts"
    project.write_config(
        agent={"command": counting_agent(starts), **SIDE_CHANNEL},
        github={
            "enabled": True,
            "repo": "acme/widgets",
            "base_url": fake.url,
            "labels": ["bot"],
            **github,
        },
    )
    return starts


def run_once(project: Project) -> int:
    cfg = configuration.load(project.config_path)
    return Supervisor(cfg, once=True, log_to_stderr=False).run()


@pytest.mark.usefixtures("token")
def test_a_pull_request_is_opened_with_the_ticket_in_its_body(
    project: Project, fake_github: FakeGitHub, tmp_path: Path
) -> None:
    github_config(project, fake_github, tmp_path)
    name = "task-1 - Add-feature.md"
    project.ticket(name, labels=["feature"], body="Add the feature file.")

    assert run_once(project) == 0

    [created] = fake_github.requests_to("/repos/acme/widgets/pulls", method="POST")
    body = created.body
    assert body["head"] == "ticketd/task-1-add-feature" and body["base"] == "main"
    assert body["title"] == "Add feature" and body["draft"] is False
    assert "Add the feature file." in body["body"]
    assert "feature.txt | 1 +" in body["body"]  # the diffstat
    [pr] = fake_github.open_pulls()
    assert sorted(fake_github.labels_of(pr["number"])) == ["bot", "feature"]
    waiting = (project.folder("review") / name).read_text()  # until the PR is merged
    assert pr["html_url"] in waiting and "ticketd/task-1-add-feature" in waiting
    for request in fake_github.requests:
        assert TOKEN not in json.dumps(request.headers)
    for path in project.root.rglob("*"):
        if path.is_file() and ".git" not in path.parts:
            assert TOKEN not in path.read_text(errors="replace"), path


@pytest.mark.usefixtures("token")
def test_an_open_pull_request_is_updated_not_duplicated(
    project: Project, fake_github: FakeGitHub, tmp_path: Path
) -> None:
    github_config(project, fake_github, tmp_path)
    fake_github.add_pull("acme:ticketd/task-2-again", title="Old title", body="old")
    project.ticket("task-2 - Again.md", body="Do it again.")

    assert run_once(project) == 0

    assert fake_github.requests_to("/repos/acme/widgets/pulls", method="POST") == []
    [pr] = fake_github.open_pulls()
    assert pr["title"] == "Again" and "Do it again." in pr["body"]


@pytest.mark.usefixtures("token")
def test_a_failed_pr_is_retried_from_the_pushed_branch_without_the_agent(
    project: Project, fake_github: FakeGitHub, tmp_path: Path
) -> None:
    starts = github_config(project, fake_github, tmp_path, retries=0)
    name = "task-3 - Flaky-github.md"
    project.ticket(name)
    fake_github.fail(502, "Server Error", method="POST", path_contains="/pulls")

    assert run_once(project) == 1

    err = json.loads((project.folder("failed") / "task-3 - Flaky-github.error.json").read_text())
    assert (err["errorCode"], err["stage"], err["retryable"]) == ("PR_FAILED", "pr", True)
    assert starts.read_text() == "x"

    (project.folder("failed") / name).rename(project.folder("todo") / name)  # a retry
    assert run_once(project) == 0

    assert starts.read_text() == "x"  # the agent did not run again
    assert len(fake_github.open_pulls()) == 1
    assert project.where() == {"review": [name]}  # until the PR is merged


@pytest.mark.usefixtures("token")
def test_rate_limit_with_retry_after_is_waited_out(
    project: Project, fake_github: FakeGitHub, tmp_path: Path
) -> None:
    github_config(project, fake_github, tmp_path)
    fake_github.rate_limit(times=1, retry_after=1, status=429, method="POST")
    project.ticket("task-4 - Limited.md")
    assert run_once(project) == 0
    assert len(fake_github.open_pulls()) == 1


def test_github_without_a_token_is_a_config_error(
    project: Project, fake_github: FakeGitHub, tmp_path: Path
) -> None:
    github_config(project, fake_github, tmp_path)
    os.environ.pop("GITHUB_TOKEN", None)
    from daemon.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        preflight(configuration.load(project.config_path))
    assert "github.enabled is true but $GITHUB_TOKEN is not set" in caught.value.message


@pytest.mark.parametrize(
    ("url", "repo"),
    [
        ("git@github.com:acme/widgets.git", "acme/widgets"),
        ("https://github.com/acme/widgets", "acme/widgets"),
        ("https://x-access-token:abc@github.example.com/acme/widgets.git", "acme/widgets"),
        ("ssh://git@github.com:22/acme/wid.gets.git", "acme/wid.gets"),
        ("/srv/git/widgets.git", None),
    ],
)
def test_repo_from_remote(url: str, repo: str | None) -> None:
    assert repo_from_remote(url) == repo


@pytest.mark.usefixtures("token")
def test_secrets_in_the_ticket_never_reach_the_pull_request_or_the_commit(
    project: Project, fake_github: FakeGitHub, tmp_path: Path
) -> None:
    key = "AKIA" + "Q4Z7NW2LP8XM5RTV"
    pat = "ghp_" + "Vb3Nq8Lm2Xc6Zk9Wp1Rt4Yh7Jd0Fs5Ga3Ee7"
    assert len(key) == 20 and len(pat) == 40
    github_config(project, fake_github, tmp_path)
    project.ticket(
        "task-4 - Rotate.md",
        title=f"Rotate {key}",
        body=f"The old token {pat} leaked; AWS_SECRET_ACCESS_KEY={key}.",
    )

    assert run_once(project) == 0

    [created] = fake_github.requests_to("/repos/acme/widgets/pulls", method="POST")
    sent = json.dumps(created.body)
    assert key not in sent and pat not in sent, sent
    assert "***(" in created.body["title"] and "The old token ***(" in created.body["body"]
    [branch] = [b for b in project.remote_branches() if b != "main"]
    assert key.lower() not in branch
    message = git(project.remote, "log", "-1", "--format=%B", branch)
    assert key not in message and message.startswith("Rotate ***(")
