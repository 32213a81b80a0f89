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

from daemon import checks, tickets
from daemon.agent import builtin, command
from daemon.errors import AgentError
from daemon.llm.client import Ollama
from daemon.repo import Repo

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


@dataclass(frozen=True)
class Delivered:
    branch: str
    commit: str
    model: str
    agent: builtin.Result | None = None


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
    log: Callable[[str], None] = lambda message: None,
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
                )
            else:
                _command_agent(ticket, ticket_file, worktree, chain[0], s, cancel, on_agent_start)
        if s.kind == "command" and (s.builtin.checks or s.builtin.analysis):
            with stage("checks"):
                _check(repo, worktree, s)
        with stage("commit"):
            if not repo.stage_all(worktree, s.exclude):
                raise AgentError("the agent finished without changing any file", code="NO_CHANGES")
            commit = repo.commit(worktree, commit_message(ticket))
        with stage("push"):
            repo.push(worktree, s.remote, branch, attempts=s.push_retries)
    finally:
        repo.remove_worktree(worktree)
    model = agent.model if agent is not None and agent.model else chain[0]
    return Delivered(branch=branch, commit=commit, model=model, agent=agent)


def _command_agent(
    ticket: tickets.Ticket,
    ticket_file: Path,
    worktree: Path,
    model: str,
    s: Settings,
    cancel: threading.Event,
    on_agent_start: Callable[[int], None],
) -> None:
    prompt = s.prompts / f"{safe_name(ticket.id)}.prompt.md"
    prompt.parent.mkdir(parents=True, exist_ok=True)
    prompt.write_text(command.render_prompt(ticket), encoding="utf-8")
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
