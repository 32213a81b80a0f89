"""The stages of one ticket run: worktree, agent (and checks), changes, gates, commit, push,
pull request.

The pipeline knows nothing of folders, leases or the history: the runner hands it a parsed
ticket, plain settings, the run's ``Tools`` and ``RunContext``, and a ``stage`` context
manager that times and records each stage. Failures leave as ``TicketdError``s; the checkout
is removed whatever happens. Nothing is committed before the gates have passed, nothing is
pushed but the commit built from the tree the gates saw, and a cancelled run pushes nothing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from daemon import checks, gates, pulls, review, tickets
from daemon.agent import builtin, command
from daemon.agent.chain import Result
from daemon.confine import Confinement
from daemon.errors import AgentError, GitError
from daemon.llm.client import Call
from daemon.llm.pool import Route
from daemon.redact import Redactor
from daemon.repo import Repo, Workspace
from daemon.runctx import RunContext

if TYPE_CHECKING:
    from daemon.forge import Forge, PullRequest

StageHook = Callable[[str], AbstractContextManager[None]]
MAX_NAME = 80  # characters of a per-ticket file name made from its id


@dataclass(frozen=True)
class Settings:
    """What a run needs, taken from the config by the runner."""

    base_branch: str
    branch_prefix: str
    push_retries: int
    prompts: Path
    logs: Path
    timeout_s: float
    exclude: tuple[str, ...]
    models: tuple[str, ...]
    kind: str
    models_by_label: Mapping[str, Sequence[str]]
    builtin: builtin.Settings
    command: command.Settings
    suite: checks.Suite
    sensitive_paths: tuple[str, ...] = ()
    sign_commits: bool = False
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


@dataclass
class Tools:
    """The running parts one run uses."""

    repo: Repo
    confine: Confinement
    redact: Redactor
    llm: Route | None = None  # this run's way to its Ollama host
    forge: Forge | None = None


@dataclass(frozen=True)
class Delivered:
    branch: str
    commit: str
    model: str | None  # None: the agent used no model
    agent: Result | None = None
    review: review.Review | None = None
    pr_url: str | None = None
    pr_number: int | None = None
    revision: pulls.Revision | None = None


def branch_name(prefix: str, ticket: tickets.Ticket, redact: Callable[[str], str]) -> str:
    ticket_part = re.sub(r"[^a-z0-9._-]+", "-", ticket.id.lower()).strip("-.")[:MAX_NAME]
    return f"{prefix}{ticket_part or 'ticket'}-{tickets.slug(redact(ticket.title))}"


def safe_name(ticket_id: str) -> str:
    """A file name for per-ticket files (logs, prompts) made from the ticket id: at most
    ``MAX_NAME`` characters (a long id keeps a hash of the rest)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", ticket_id).strip("._") or "ticket"
    if len(name) > MAX_NAME:
        digest = hashlib.sha256(ticket_id.encode()).hexdigest()[:12]
        name = f"{name[: MAX_NAME - 13]}-{digest}"
    return name


def commit_message(
    ticket: tickets.Ticket, redact: Callable[[str], str], revision: pulls.Revision | None = None
) -> str:
    subject = " ".join(redact(ticket.title).split())
    if revision is not None:
        return (
            f"Address review of #{revision.number} (revision {revision.index})\n\n"
            f"{subject}\n\nTicket: {ticket.id}\n"
        )
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
    checkout: Path,
    s: Settings,
    tools: Tools,
    ctx: RunContext,
    *,
    stage: StageHook,
    on_agent_start: Callable[[int], None],
    still_ours: Callable[[], None],
    log: Callable[[str], None] = lambda message: None,
    on_model: Callable[[str], None] = lambda model: None,
    previous: str | None = None,
    revision: pulls.Revision | None = None,
) -> Delivered:
    """Run the ticket, or revise its open pull request (``revision``). ``still_ours``
    raises when the ticket's file has left in-progress/: it is asked once more right before
    the push.

    The run starts from the base branch, or from the ticket's branch when that holds
    commits by people (a revision always does): their work is kept, and the push is fenced
    on the head ticketd started from."""
    repo, redact = tools.repo, tools.redact
    branch = revision.branch if revision else branch_name(s.branch_prefix, ticket, redact)
    chain = model_chain(ticket, s.models, s.models_by_label)
    agent: Result | None = None
    request = None
    with stage("worktree"):
        heads = repo.remote_heads(s.base_branch, branch, cancel=ctx.event)
        base = heads.get(s.base_branch)
        if base is None:
            raise GitError(f"the remote has no branch {s.base_branch!r} (repo.base_branch)")
        repo.fetch_base(s.base_branch, base, cancel=ctx.event)
        head = heads.get(branch)
        start = base
        if head is not None:
            repo.fetch_base(branch, head, cancel=ctx.event)
            if revision is not None or repo.foreign(base, head, f"Ticket: {ticket.id}"):
                start = head
                log(f"building on {branch} at {head[:12]} (its commits are kept)")
        elif revision is not None:
            raise GitError(
                f"the pull request's branch {branch} is gone from the remote (deleted by a "
                "person?); nothing was pushed",
            )
        if revision is not None:
            request = revision.text + pulls.so_far(repo.between(base, head or base))
        workspace = Workspace(repo, checkout, start, branch)
    try:
        ctx.start_budget(s.timeout_s)
        with stage("agent"):
            if s.kind == "builtin":
                assert tools.llm is not None
                agent = builtin.run(
                    ticket,
                    workspace,
                    chain,
                    tools.llm,
                    s.builtin,
                    s.suite,
                    tools.confine,
                    ctx,
                    log=log,
                    previous=previous,
                    request=request,
                    on_model=on_model,
                )
            else:
                agent, change = command.run(
                    ticket,
                    workspace,
                    chain,
                    s.command,
                    s.suite,
                    exclude=s.exclude,
                    paths=command.Paths(
                        prompt_path(s.prompts, ticket.id), agent_log(s.logs, ticket.id), ticket_file
                    ),
                    confine=tools.confine,
                    ctx=ctx,
                    on_start=on_agent_start,
                    redact=redact,
                    log=log,
                    stage=stage,
                    route=tools.llm,
                    previous=previous,
                    request=request,
                    on_model=on_model,
                )
        ctx.check()
        if s.kind == "builtin":
            with stage("changes"):
                change = workspace.snapshot(s.exclude, cancel=ctx.event)
                if not change.entries:
                    raise AgentError(
                        "the agent finished without changing any file", code="NO_CHANGES"
                    )
        with stage("paths"):
            gates.check_paths(change.entries, s.sensitive_paths)
        if s.secrets:
            with stage("secrets"):
                gates.scan_secrets(
                    change.diff,
                    baseline=s.secrets_baseline,
                    on_finding=s.secrets_on_finding,
                    known=redact.secrets,
                )
        verdict: review.Review | None = None
        draft = s.pr.draft if s.pr else False
        if s.review is not None:
            with stage("review"):
                assert tools.llm is not None
                verdict = review.review(
                    tools.llm,
                    s.review_model,
                    command.render_ticket(ticket),
                    review.split_diff(change.diff),
                    s.review,
                    num_ctx=s.builtin.num_ctx,
                    num_predict=s.builtin.num_predict,
                    log=log,
                    ctx=ctx,
                )
                draft = gates.check_review(verdict, s.review_on_block) or draft
        with stage("commit"):
            message = commit_message(ticket, redact, revision)
            commit = repo.commit(change, branch, message, sign=s.sign_commits)
        with stage("push"):
            ctx.check()
            still_ours()
            repo.push(commit, branch, expect=head, attempts=s.push_retries)
    finally:
        workspace.release()
    model = agent.model if agent is not None else None
    pr: PullRequest | None = None
    if s.pr is not None and tools.forge is not None:
        calls = (agent.calls if agent else []) + (verdict.calls if verdict else [])
        with stage("pr"):
            if revision is not None:
                answer(revision, commit, repo.diffstat(change), s, tools)
            else:
                pr = open_pr(
                    ticket,
                    branch,
                    s,
                    tools,
                    log,
                    diffstat=repo.diffstat(change),
                    verdict=verdict,
                    model=model,
                    calls=calls,
                    draft=draft,
                )
    return Delivered(
        branch,
        commit,
        model,
        agent,
        verdict,
        pr.url if pr else revision.url if revision else None,
        pr.number if pr else revision.number if revision else None,
        revision,
    )


def answer(revision: pulls.Revision, commit: str, diffstat: str, s: Settings, tools: Tools) -> None:
    """Reply in each thread the revision answered, then the summary comment."""
    assert tools.forge is not None
    for thread in revision.threads:
        text = f"Addressed in {commit[:12]} (revision {revision.index})."
        tools.forge.reply(revision.number, thread, text + "\n\n" + pulls.marks())
    text = pulls.summary(revision, commit, diffstat, checks_passed(s), tools.redact)
    tools.forge.comment(revision.number, text)


def open_pr(
    ticket: tickets.Ticket,
    branch: str,
    s: Settings,
    tools: Tools,
    log: Callable[[str], None],
    *,
    diffstat: str,
    verdict: review.Review | None,
    model: str | None,
    calls: Sequence[Call],
    draft: bool,
) -> PullRequest:
    """Open (or update) the pull request for ``branch``."""
    assert s.pr is not None and tools.forge is not None
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
    pr = tools.forge.open_or_update(
        branch=branch,
        base=s.base_branch,
        title=" ".join(tools.redact(ticket.title).split()),
        body=tools.redact(body),
        draft=draft,
        labels=list(dict.fromkeys([*s.pr.labels, *ticket.labels])),
    )
    log(f"pull request {'opened' if pr.created else 'updated'}: {pr.url}")
    return pr


def resume(
    ticket: tickets.Ticket,
    s: Settings,
    tools: Tools,
    ctx: RunContext,
    *,
    after: str,
    stage: StageHook,
    log: Callable[[str], None],
) -> Delivered:
    """Continue a run that failed at the push (``after="PUSH_FAILED"``: ticketd still has
    the commit) or at the pull request (``"PR_FAILED"``: the branch is pushed). The agent
    does not run again."""
    repo = tools.repo
    branch = branch_name(s.branch_prefix, ticket, tools.redact)
    log(f"resuming after {after} with {branch}; the agent does not run again")
    head = repo.remote_heads(branch, cancel=ctx.event).get(branch)
    if after == "PUSH_FAILED":
        with stage("push"):
            commit = repo.saved(branch)
            if commit is None or f"Ticket: {ticket.id}" not in repo.message(commit):
                raise GitError(f"no commit of {ticket.id} for {branch} is kept; run it afresh")
            if head != commit:
                repo.push(commit, branch, expect=head, attempts=s.push_retries)
    else:
        commit = head or ""
        if not commit:
            raise GitError(f"branch {branch} is not on the remote any more; run the ticket afresh")
    pr = None
    if s.pr is not None and tools.forge is not None:
        with stage("pr"):
            pr = open_pr(
                ticket,
                branch,
                s,
                tools,
                log,
                diffstat="(see the branch)",
                verdict=None,
                model="(earlier run)",
                calls=(),
                draft=s.pr.draft,
            )
    return Delivered(
        branch,
        commit,
        "(earlier run)",
        None,
        None,
        pr.url if pr else None,
        pr.number if pr else None,
    )


def checks_passed(s: Settings) -> list[str]:
    names = [c.name for c in s.suite.checks]
    return [f"{n}: passed" for n in names]


def prompt_path(prompts: Path, ticket_id: str) -> Path:
    return prompts / f"{safe_name(ticket_id)}.prompt.md"


def agent_log(logs: Path, ticket_id: str) -> Path:
    """A command agent's own output, every attempt under a header."""
    return logs / f"{safe_name(ticket_id)}.agent.log"
