"""The stages of one ticket run: worktree, agent (and checks), commit, push.

The pipeline knows nothing of folders, leases or the history: the supervisor hands it a
parsed ticket, plain settings and a ``stage`` context manager that times and records each
stage. Failures leave as ``TicketdError``s; the worktree is removed whatever happens.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from daemon import checks, gates, review, tickets
from daemon.agent import builtin, command
from daemon.errors import AgentError, GitError
from daemon.llm.client import Call, Ollama
from daemon.repo import Repo

if TYPE_CHECKING:
    from daemon.forge import Forge

StageHook = Callable[[str], AbstractContextManager[None]]


@dataclass(frozen=True)
class Settings:
    """What a run needs, taken from the config by the supervisor."""

    repo: Path
    base_branch: str
    remote: str
    branch_prefix: str
    push_retries: int
    git_timeout_s: float
    prompts: Path
    logs: Path
    command: tuple[str, ...]
    timeout_s: float
    grace_s: float
    exclude: tuple[str, ...]
    env: Mapping[str, str]
    models: tuple[str, ...]
    redact: Callable[[str], str]
    kind: str
    models_by_label: Mapping[str, Sequence[str]]
    builtin: builtin.Settings
    sign_commits: bool = False
    max_memory_mb: float = 0
    secrets: bool = True
    secrets_on_finding: str = "review"
    secrets_baseline: Path | None = None
    review: review.Policy | None = None  # None: no review
    review_model: str = ""
    review_on_block: str = "review"
    pr: PRSettings | None = None  # None: no pull request


@dataclass(frozen=True)
class PRSettings:
    draft: bool
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Delivered:
    branch: str
    commit: str
    model: str
    agent: builtin.Result | None = None
    review: review.Review | None = None
    pr_url: str | None = None


def branch_name(prefix: str, ticket: tickets.Ticket) -> str:
    ticket_part = re.sub(r"[^a-z0-9._-]+", "-", ticket.id.lower()).strip("-.") or "ticket"
    return f"{prefix}{ticket_part}-{tickets.slug(ticket.title)}"


def safe_name(ticket_id: str) -> str:
    """A file name for per-ticket files (logs, prompts) made from the ticket id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", ticket_id).strip("._") or "ticket"


def commit_message(ticket: tickets.Ticket) -> str:
    subject = " ".join(ticket.title.split())
    return f"{subject}\n\nTicket: {ticket.id}\n"


def model_chain(
    ticket: tickets.Ticket, models: Sequence[str], by_label: Mapping[str, Sequence[str]]
) -> list[str]:
    """The ticket's own ``model``/``models``, then models mapped from its labels, then the
    configured chain; each once, in that order."""
    chain = [*ticket.models]
    for label in ticket.labels:
        chain += by_label.get(label, ())
    return list(dict.fromkeys([*chain, *models]))


def run(
    ticket: tickets.Ticket,
    ticket_file: Path,
    worktree: Path,
    s: Settings,
    *,
    stage: StageHook,
    cancel: threading.Event,
    on_agent_start: Callable[[int], None],
    llm: Ollama | None = None,
    forge: Forge | None = None,
    log: Callable[[str], None] = lambda message: None,
    previous: str | None = None,
) -> Delivered:
    repo = Repo(s.repo, timeout_s=s.git_timeout_s)
    branch = branch_name(s.branch_prefix, ticket)
    chain = model_chain(ticket, s.models, s.models_by_label)
    agent: builtin.Result | None = None
    with stage("worktree"):
        repo.require_branch(s.base_branch)
        repo.add_worktree(worktree, branch, s.base_branch)
    try:
        with stage("agent"):
            if s.kind == "builtin":
                assert llm is not None
                agent = builtin.run(
                    ticket,
                    worktree,
                    chain,
                    llm,
                    s.builtin,
                    reset=lambda: repo.reset(worktree),
                    log=log,
                    previous=previous,
                )
            else:
                _command_agent(
                    ticket, ticket_file, worktree, chain[0], s, cancel, on_agent_start, previous
                )
        if s.kind == "command" and (s.builtin.checks or s.builtin.analysis):
            with stage("checks"):
                _check(repo, worktree, s)
        with stage("changes"):
            if not repo.stage_all(worktree, s.exclude):
                raise AgentError("the agent finished without changing any file", code="NO_CHANGES")
            diff = repo.staged_diff(worktree)
            diffstat = repo.staged_diff(worktree, stat=True)
        if s.secrets:
            with stage("secrets"):
                gates.scan_secrets(
                    diff, baseline=s.secrets_baseline, on_finding=s.secrets_on_finding
                )
        verdict: review.Review | None = None
        draft = s.pr.draft if s.pr else False
        if s.review is not None:
            with stage("review"):
                assert llm is not None
                verdict = review.review(
                    llm,
                    s.review_model,
                    command.render_ticket(ticket),
                    review.split_diff(diff),
                    s.review,
                    num_ctx=s.builtin.num_ctx,
                    num_predict=s.builtin.num_predict,
                    log=log,
                )
                draft = gates.check_review(verdict, s.review_on_block) or draft
        with stage("commit"):
            commit = repo.commit(worktree, commit_message(ticket), sign=s.sign_commits)
        with stage("push"):
            repo.push(worktree, s.remote, branch, attempts=s.push_retries)
    finally:
        repo.remove_worktree(worktree)
    model = agent.model if agent is not None and agent.model else chain[0]
    pr_url = None
    if s.pr is not None and forge is not None:
        calls = (agent.calls if agent else []) + (verdict.calls if verdict else [])
        with stage("pr"):
            pr_url = open_pr(
                ticket,
                branch,
                s,
                forge,
                log,
                diffstat=diffstat,
                verdict=verdict,
                model=model,
                calls=calls,
                draft=draft,
            )
    return Delivered(branch, commit, model, agent, verdict, pr_url)


def open_pr(
    ticket: tickets.Ticket,
    branch: str,
    s: Settings,
    forge: Forge,
    log: Callable[[str], None],
    *,
    diffstat: str,
    verdict: review.Review | None,
    model: str,
    calls: Sequence[Call],
    draft: bool,
) -> str:
    """Open (or update) the pull request for ``branch``; returns its URL."""
    assert s.pr is not None
    tokens = (
        (len(calls), sum(c.prompt_tokens for c in calls), sum(c.eval_tokens for c in calls))
        if calls
        else None
    )
    body = gates.pr_body(
        ticket,
        diffstat=diffstat,
        checks=checks_passed(s),
        result=verdict,
        model=model,
        tokens=tokens,
    )
    pr = forge.open_or_update(
        branch=branch,
        base=s.base_branch,
        title=" ".join(ticket.title.split()),
        body=s.redact(body),
        draft=draft,
        labels=list(dict.fromkeys([*s.pr.labels, *ticket.labels])),
    )
    log(f"pull request {'opened' if pr.created else 'updated'}: {pr.url}")
    return pr.url


def resume(
    ticket: tickets.Ticket,
    s: Settings,
    forge: Forge | None,
    *,
    after: str,
    stage: StageHook,
    log: Callable[[str], None],
) -> Delivered:
    """Continue a run that failed at the push (``after="PUSH_FAILED"``: the commit is on the
    local branch) or at the pull request (``"PR_FAILED"``: the branch is pushed). The agent
    does not run again."""
    repo = Repo(s.repo, timeout_s=s.git_timeout_s)
    branch = branch_name(s.branch_prefix, ticket)
    log(f"resuming after {after} with {branch}; the agent does not run again")
    if after == "PUSH_FAILED":
        with stage("push"):
            commit = repo.ticket_commit(branch, ticket.id)
            if commit is None:
                raise GitError(f"branch {branch} holds no commit for {ticket.id}; run it afresh")
            repo.push(s.repo, s.remote, branch, attempts=s.push_retries, source=branch)
    else:
        commit = repo.remote_head(s.remote, branch) or ""
        if not commit:
            raise GitError(f"branch {branch} is not on {s.remote} any more; run the ticket afresh")
    url = None
    if s.pr is not None and forge is not None:
        with stage("pr"):
            url = open_pr(
                ticket,
                branch,
                s,
                forge,
                log,
                diffstat="(see the branch)",
                verdict=None,
                model="(earlier run)",
                calls=(),
                draft=s.pr.draft,
            )
    return Delivered(branch, commit, "(earlier run)", None, None, url)


def checks_passed(s: Settings) -> list[str]:
    names = [c.name for c in s.builtin.checks]
    return [f"{n}: passed" for n in names]


def _command_agent(
    ticket: tickets.Ticket,
    ticket_file: Path,
    worktree: Path,
    model: str,
    s: Settings,
    cancel: threading.Event,
    on_agent_start: Callable[[int], None],
    previous: str | None,
) -> None:
    prompt = s.prompts / f"{safe_name(ticket.id)}.prompt.md"
    prompt.parent.mkdir(parents=True, exist_ok=True)
    prompt.write_text(command.render_prompt(ticket, previous), encoding="utf-8")
    values = {
        "prompt_file": str(prompt),
        "worktree": str(worktree),
        "ticket_file": str(ticket_file),
        "ticket_id": ticket.id,
        "model": model,
    }
    command.run(
        s.command,
        values=values,
        worktree=worktree,
        output=s.logs / f"{safe_name(ticket.id)}.agent.log",
        timeout_s=s.timeout_s,
        grace_s=s.grace_s,
        env=s.env,
        cancel=cancel,
        on_start=on_agent_start,
        redact=s.redact,
        max_memory_mb=s.max_memory_mb,
    )


def _check(repo: Repo, worktree: Path, s: Settings) -> None:
    """Static analysis (with auto-fix) of what a command agent changed, then the checks."""
    changed = repo.changed_files(worktree, s.exclude)
    b = s.builtin
    out = checks.analyse(
        worktree, changed, python=b.python_analysis, commands=b.analysis, grace_s=b.grace_s
    )
    if out.ok:
        out = checks.run_checks(worktree, b.checks, b.grace_s)
    if not out.ok:
        raise AgentError(
            " | ".join(f.replace("\n", " | ") for f in out.failures)[:1500], code="CHECKS_FAILED"
        )
