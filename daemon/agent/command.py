"""The command agent: any CLI coding agent (aider, ...) run as a child process.

The ticket becomes a prompt file; ``agent.command`` runs in the checkout, confined (its
sandbox, own process tree, memory limit), with its placeholders filled in. An agent that
uses a model (``{model}`` in its command or ``agent.env``, or ``agent.uses_ollama``) walks
the ticket's chain of models like the builtin agent: a failed run, a run that changed
nothing, or checks still failing hand over to the next model on a clean checkout. Checks
that fail go back to the same agent with their output, up to ``agent.max_reflections``
times. The agent reaches the run's Ollama host through ``OLLAMA_HOST`` and ``OLLAMA_API_BASE``.
Before a failure is blamed on the ticket, that host is asked: away -> the run moves to
another host of the pool and the agent runs again there, told so, or, with none left,
OLLAMA_UNAVAILABLE (the ticket waits); the model missing -> MODEL_NOT_FOUND (the next model).

Each attempt appends to the agent's log under a header (attempt, model, time), its output
masked by the redactor and bounded in size. The run's deadline ends the whole process tree
(AGENT_TIMEOUT); a cancel ends it too; a non-zero exit is AGENT_FAILED with the last
meaningful lines of the agent's output.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from daemon import checks, procs
from daemon.agent.chain import Result, walk
from daemon.confine import Confinement
from daemon.errors import AgentError, TicketdError
from daemon.files import atomic_write
from daemon.llm.pool import Route
from daemon.repo import Change, Workspace
from daemon.runctx import RunContext
from daemon.tickets import Ticket

LOG_LIMIT = 4 * 1024 * 1024  # bytes of one attempt's output kept in the agent's log


@dataclass(frozen=True)
class Settings:
    command: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)  # placeholders filled per attempt
    uses_ollama: bool = False
    max_reflections: int = 3


@dataclass(frozen=True)
class Paths:
    prompt: Path  # the prompt file, written anew for each attempt
    log: Path  # the agent's own log: every attempt's output
    ticket: Path


def ticket_sections(ticket: Ticket, *, plan_and_notes: bool = True) -> list[str]:
    """Markdown lines: everything the task holds, once each: description, acceptance
    criteria and Definition of Done as checklists, references, documentation, plan, notes."""
    parts: list[str] = []
    if ticket.description:
        parts += ["## Description", "", ticket.description, ""]
    for title, items in (
        ("Acceptance Criteria", ticket.acceptance_criteria),
        ("Definition of Done", ticket.definition_of_done),
    ):
        if items:
            parts += [f"## {title}", ""]
            parts += [f"- [{'x' if c.checked else ' '}] {c.text}" for c in items]
            parts.append("")
    for title, links in (
        ("References", ticket.references),
        ("Documentation", ticket.documentation),
    ):
        if links:
            parts += [f"## {title}", "", *(f"- {link}" for link in links), ""]
    if plan_and_notes and ticket.plan:
        parts += ["## Implementation Plan", "", ticket.plan, ""]
    if plan_and_notes and ticket.notes:
        parts += ["## Implementation Notes", "", ticket.notes, ""]
    return parts


def render_ticket(ticket: Ticket, request: str | None = None) -> str:
    """The ticket as a task: title, description, acceptance criteria, plan and notes (and a
    reviewer's ``request``, when the run revises the ticket's pull request)."""
    parts = [f"# {ticket.id}: {ticket.title}", "", *ticket_sections(ticket)]
    return "\n".join([*parts, *([request] if request else [])])


def render_prompt(ticket: Ticket, previous: str | None = None, request: str | None = None) -> str:
    """The prompt file for a command agent: the ticket, what failed last time, what to do."""
    parts = [
        render_ticket(ticket, request),
        *(["## A previous attempt failed", "", previous, ""] if previous else []),
        "## Instructions",
        "",
        "Make the change this ticket asks for in the current repository. Edit files only",
        "inside it. Do not commit: the changes are committed and pushed for you.",
        "",
    ]
    return "\n".join(parts)


def build_argv(template: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """Fill the ``{placeholders}`` of each argument; each stays exactly one argument."""
    return [arg.format(**values) for arg in template]


def fill_env(env: Mapping[str, str], values: Mapping[str, str]) -> dict[str, str]:
    """``agent.env`` with the known ``{placeholders}`` filled (other braces kept as they are)."""
    filled = {}
    for name, text in env.items():
        for key, value in values.items():
            text = text.replace("{" + key + "}", value)
        filled[name] = text
    return filled


@dataclass
class _Run:
    """What every attempt of one run shares."""

    ticket: Ticket
    workspace: Workspace
    s: Settings
    suite: checks.Suite
    exclude: tuple[str, ...]
    paths: Paths
    confine: Confinement
    ctx: RunContext
    result: Result
    on_start: Callable[[int], None]
    redact: Callable[[str], str]
    log: Callable[[str], None]
    route: Route | None
    stage: Callable[[str], AbstractContextManager[None]]
    request: str | None = None
    change: Change | None = None


def run(
    ticket: Ticket,
    workspace: Workspace,
    chain: Sequence[str],
    s: Settings,
    suite: checks.Suite,
    *,
    exclude: tuple[str, ...],
    paths: Paths,
    confine: Confinement,
    ctx: RunContext,
    on_start: Callable[[int], None],
    redact: Callable[[str], str],
    log: Callable[[str], None],
    stage: Callable[[str], AbstractContextManager[None]],
    route: Route | None = None,
    previous: str | None = None,
    request: str | None = None,
    on_model: Callable[[str], None] = lambda model: None,
) -> tuple[Result, Change]:
    """Run the agent, model after model, until its change passes the checks. ``route``: the
    run's Ollama host, given to the agent in ``OLLAMA_HOST`` and ``OLLAMA_API_BASE`` and
    asked before a failure is blamed on the ticket. Returns what was tried and the change
    (after any auto-fixes)."""
    result = Result()
    r = _Run(
        ticket=ticket,
        workspace=workspace,
        s=s,
        suite=suite,
        exclude=exclude,
        paths=paths,
        confine=confine,
        ctx=ctx,
        result=result,
        on_start=on_start,
        redact=redact,
        log=log,
        route=route,
        stage=stage,
        request=request,
    )
    models: list[str | None] = [*chain] if s.uses_ollama else [None]
    earlier = TicketdError(f"(an earlier run of this ticket) {previous}") if previous else None
    walk(
        models,
        workspace,
        lambda model, before: _attempt(r, model, before),
        result,
        log=log,
        earlier=earlier,
        on_model=on_model,
    )
    assert r.change is not None
    return result, r.change


def _attempt(r: _Run, model: str | None, before: TicketdError | None) -> None:
    """One model's turn: run the agent, then again with the checks' output while they fail."""
    feedback = before.message if before is not None else None
    for turn in range(r.s.max_reflections + 1):
        change = _turn(r, model, feedback)
        r.result.changed = {e.path for e in change.entries}
        changed = sorted(e.path for e in change.entries if e.status != "D")
        outcome = checks.Outcome()
        if not r.suite.empty:
            with r.stage("checks"):
                outcome = r.suite.verify(r.workspace.path, changed, confine=r.confine, ctx=r.ctx)
                r.ctx.check()
                if not outcome.ok and turn == r.s.max_reflections:
                    raise AgentError(
                        " | ".join(f.replace("\n", " | ") for f in outcome.failures)[:1500],
                        code="CHECKS_FAILED",
                    )
        r.result.fixes += outcome.fixes
        if outcome.ok:
            r.result.checks_passed = True
            r.result.first_try = r.result.attempts == 1
            r.change = (
                r.workspace.snapshot(r.exclude, cancel=r.ctx.event) if outcome.fixes else change
            )
            return
        text = "\n\n".join(outcome.failures)
        r.result.reflections += 1
        r.log(
            f"{model or 'the agent'}: CHECKS_FAILED, reflecting ({turn + 1}/{r.s.max_reflections})"
        )
        feedback = (
            f"Your change does not pass the checks yet:\n\n{text}\n\n"
            "Fix the files in the repository so that these checks pass."
        )


class _Moved(Exception):
    """The run's Ollama host stopped answering, and the run moved to another."""


def _turn(r: _Run, model: str | None, feedback: str | None) -> Change:
    """Run the agent once and take its change. When its Ollama host failed meanwhile and
    the run moved to another host, run it again there (its work so far kept), told so."""
    while True:
        try:
            _launch(r, model, feedback)
            with r.stage("changes"):
                change = r.workspace.snapshot(r.exclude, cancel=r.ctx.event)
                if not change.entries:
                    error = AgentError(
                        "the agent finished without changing any file", code="NO_CHANGES"
                    )
                    _blame(r, model, error)
            return change
        except _Moved as moved:
            feedback = "\n\n".join(t for t in (str(moved), feedback) if t)


def _blame(r: _Run, model: str | None, error: AgentError) -> None:
    """Before a failure counts against the ticket, ask Ollama: away (with no other host to
    move to) or lacking the model raises ``LLMError``; away, with the run moved to another
    host, raises ``_Moved``. Else raise ``error``."""
    if model is not None and r.route is not None and r.route.probe(model):
        raise _Moved(r.route.moved())
    raise error


def _launch(r: _Run, model: str | None, feedback: str | None) -> None:
    """Run the agent once with the prompt for this attempt; its output goes to its log."""
    r.result.attempts += 1
    paths, ticket = r.paths, r.ticket
    paths.prompt.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(paths.prompt, r.redact(render_prompt(ticket, feedback, r.request)))
    values = {
        "prompt_file": str(paths.prompt),
        "worktree": str(r.workspace.path),
        "ticket_file": str(paths.ticket),
        "ticket_id": ticket.id,
        "model": model or "",
    }
    argv = build_argv(r.s.command, values)
    env = fill_env(r.s.env, values)
    if r.route is not None:  # the run's host, unless agent.env names one
        env = {"OLLAMA_HOST": r.route.url, "OLLAMA_API_BASE": r.route.url, **env}
    at = datetime.now(UTC).isoformat(timespec="seconds")
    header = f"\n===== attempt {r.result.attempts} · model {model or '(none)'} · {at} =====\n"
    paths.log.parent.mkdir(parents=True, exist_ok=True)
    with paths.log.open("a", encoding="utf-8") as f:
        f.write(header)
    start = paths.log.stat().st_size
    try:
        result = r.confine.run(
            argv,
            cwd=r.workspace.path,
            timeout_s=r.ctx.timeout(r.ctx.budget_s),
            output=paths.log,
            on_start=r.on_start,
            filter=r.redact,
            limit_memory=True,
            env=env,
            max_output=LOG_LIMIT,
        )
    except (FileNotFoundError, PermissionError) as e:
        raise AgentError(
            f"cannot start agent command {argv[0]!r}: {e.strerror}; install it or set agent.command"
        ) from e
    if result.cancelled:
        raise r.ctx.error()
    if result.out_of_memory:
        raise AgentError(
            f"the agent's processes grew past agent.max_memory_mb ({r.confine.max_memory_mb:g} "
            "MiB) and were ended",
            code="AGENT_OOM",
        )
    if result.timed_out:
        raise r.ctx.timed_out()
    if result.returncode != 0:
        said = last_lines(procs.tail(paths.log, 64 * 1024, start=start))
        _blame(
            r,
            model,
            AgentError(
                f"agent exited with status {result.returncode}: {said} (its log: {paths.log.name})"
            ),
        )


ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")


def last_lines(output: str, n: int = 6, limit: int = 360) -> str:
    """The last ``n`` meaningful lines of an agent's output, joined with " | ": colour codes
    and progress redraws (``\\r``) removed, blank, rule-only and repeated lines left out."""
    kept: list[str] = []
    for raw in output.splitlines():
        line = ANSI.sub("", raw.rsplit("\r", 1)[-1]).strip()
        if not re.search(r"\w", line) or line.startswith("[ticketd:") or line in kept[-1:]:
            continue
        kept.append(line[:160])
    return " | ".join(kept[-n:])[-limit:] or "(no output)"
