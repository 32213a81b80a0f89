"""The command agent: any CLI coding agent (aider, ...) run as a child process.

The ticket becomes a prompt file; ``agent.command`` runs in the worktree with its
placeholders filled in. A timeout ends the whole process tree (AGENT_TIMEOUT); a non-zero
exit is AGENT_FAILED with the tail of the agent's output.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from daemon import procs
from daemon.errors import AgentError, Interrupted
from daemon.files import atomic_write
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
    worktree: Path,
    output: Path,
    timeout_s: float,
    grace_s: float,
    env: Mapping[str, str],
    cancel: threading.Event,
    on_start: Callable[[int], None],
    redact: Callable[[str], str],
    max_memory_mb: float = 0,
) -> None:
    """Run the agent; its output goes to ``output`` with secrets masked once it ends."""
    argv = build_argv(template, values)
    try:
        result = procs.run(
            argv,
            cwd=worktree,
            timeout_s=timeout_s,
            output=output,
            env=env,
            grace_s=grace_s,
            cancel=cancel,
            on_start=on_start,
            max_memory_mb=max_memory_mb,
        )
    except (FileNotFoundError, PermissionError) as e:
        raise AgentError(
            f"cannot start agent command {argv[0]!r}: {e.strerror}; install it or set agent.command"
        ) from e
    text = output.read_text(encoding="utf-8", errors="replace")
    if (clean := redact(text)) != text:
        atomic_write(output, clean)
    if result.cancelled:
        raise Interrupted("the daemon is stopping; the agent was ended")
    if result.out_of_memory:
        raise AgentError(
            f"the agent's processes grew past agent.max_memory_mb ({max_memory_mb:g} MiB) "
            "and were ended",
            code="AGENT_OOM",
        )
    if result.timed_out:
        raise AgentError(
            f"agent ran past agent.timeout_s ({timeout_s:g}s) and was ended", code="AGENT_TIMEOUT"
        )
    if result.returncode != 0:
        last = " | ".join(procs.tail(output, 1500).strip().splitlines()[-8:])
        raise AgentError(f"agent exited with status {result.returncode}: {last}")
