"""The command agent: any CLI coding agent (aider, ...) run as a child process.

The ticket becomes a prompt file; ``agent.command`` runs in the worktree, confined (its
sandbox, own process tree, memory limit), with its placeholders filled in. Its output is
masked by the redactor on its way to the agent log. The run's deadline ends the whole process
tree (AGENT_TIMEOUT); a cancel ends it too; a non-zero exit is AGENT_FAILED with the tail of
the agent's output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from daemon import procs
from daemon.confine import Confinement
from daemon.errors import AgentError
from daemon.runctx import RunContext
from daemon.tickets import Ticket


def ticket_sections(ticket: Ticket, *, plan_and_notes: bool = True) -> list[str]:
    """Markdown lines: description, acceptance criteria as a checklist, plan and notes."""
    parts: list[str] = []
    if ticket.description:
        parts += ["## Description", "", ticket.description, ""]
    if ticket.acceptance_criteria:
        parts += ["## Acceptance Criteria", ""]
        parts += [f"- [{'x' if c.checked else ' '}] {c.text}" for c in ticket.acceptance_criteria]
        parts.append("")
    if plan_and_notes and ticket.plan:
        parts += ["## Implementation Plan", "", ticket.plan, ""]
    if plan_and_notes and ticket.notes:
        parts += ["## Implementation Notes", "", ticket.notes, ""]
    return parts


def render_ticket(ticket: Ticket) -> str:
    """The ticket as a task: title, description, acceptance criteria, plan and notes."""
    return "\n".join([f"# {ticket.id}: {ticket.title}", "", *ticket_sections(ticket)])


def render_prompt(ticket: Ticket, previous: str | None = None) -> str:
    """The prompt file for a command agent: the ticket, what failed last time, what to do."""
    parts = [
        render_ticket(ticket),
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


def run(
    template: Sequence[str],
    *,
    values: Mapping[str, str],
    confine: Confinement,
    worktree: Path,
    output: Path,
    ctx: RunContext,
    on_start: Callable[[int], None],
    redact: Callable[[str], str],
) -> None:
    """Run the agent until it exits, the run's deadline passes or the run is cancelled."""
    argv = build_argv(template, values)
    try:
        result = confine.run(
            argv,
            cwd=worktree,
            timeout_s=ctx.timeout(ctx.budget_s),
            output=output,
            on_start=on_start,
            filter=redact,
            limit_memory=True,
        )
    except (FileNotFoundError, PermissionError) as e:
        raise AgentError(
            f"cannot start agent command {argv[0]!r}: {e.strerror}; install it or set agent.command"
        ) from e
    if result.cancelled:
        raise ctx.error()
    if result.out_of_memory:
        raise AgentError(
            f"the agent's processes grew past agent.max_memory_mb ({confine.max_memory_mb:g} "
            "MiB) and were ended",
            code="AGENT_OOM",
        )
    if result.timed_out:
        raise ctx.timed_out()
    if result.returncode != 0:
        last = " | ".join(procs.tail(output, 1500).strip().splitlines()[-8:])
        raise AgentError(f"agent exited with status {result.returncode}: {last}")
