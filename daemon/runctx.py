"""The context of one ticket run: its clock, its time budget, and why it must stop.

A ``RunContext`` goes to every stage of a run. It is cancelled when the daemon stops (the
grace time is over, or a second signal came), when a person cancels the ticket (``ticketd
cancel``), or when the ticket's file leaves ``in-progress/`` by hand; ``reason`` says which.
``deadline`` (monotonic) bounds the agent's whole run (``agent.timeout_s``). Work that blocks
(a child process, a streamed model answer) either polls ``event`` or registers with
``on_cancel`` a way to be cut short at once (the Ollama client shuts its sockets).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import TYPE_CHECKING

from daemon.errors import AgentError, Cancelled, Interrupted

if TYPE_CHECKING:
    from concurrent.futures import Future

    from daemon.backlog import Lease
    from daemon.llm.pool import Route
    from daemon.pulls import Revision
    from daemon.tickets import Ticket


class Stop(Enum):
    STOPPING = "the daemon is stopping"
    CANCELLED = "cancelled by a person"
    REMOVED = "the ticket file left in-progress/"


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class RunContext:
    clock: Callable[[], datetime] = utcnow
    deadline: float = math.inf  # time.monotonic() by which the agent must be done
    budget_s: float = math.inf  # what the deadline was set from, for messages
    event: threading.Event = field(default_factory=threading.Event)
    reason: Stop | None = None
    fail: bool = False  # a cancel that sends the ticket to failed/ (``ticketd cancel --fail``)
    _callbacks: list[Callable[[], None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def cancelled(self) -> bool:
        return self.event.is_set()

    def cancel(self, reason: Stop, *, fail: bool = False) -> None:
        """Stop the run; the first reason given wins. Thread-safe, cheap, never blocks long."""
        with self._lock:
            if self.reason is None:
                self.reason, self.fail = reason, fail
            callbacks = list(self._callbacks)
        self.event.set()
        for callback in callbacks:
            callback()

    @contextmanager
    def on_cancel(self, callback: Callable[[], None]) -> Iterator[None]:
        """Call ``callback`` if the run is cancelled while the block runs (at once if it
        already is)."""
        with self._lock:
            self._callbacks.append(callback)
        try:
            if self.cancelled:
                callback()
            yield
        finally:
            with self._lock:
                self._callbacks.remove(callback)

    def start_budget(self, seconds: float) -> None:
        """The agent's whole run must end ``seconds`` from now."""
        self.budget_s = seconds
        self.deadline = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def timeout(self, limit: float) -> float:
        """``limit``, or less when the deadline is nearer (never below zero)."""
        return max(0.0, min(limit, self.remaining()))

    def check(self) -> None:
        """Raise when the run must stop: ``Interrupted`` (the daemon stops: back to todo/),
        ``Cancelled`` (a person, or the file moved by hand), or AGENT_TIMEOUT past the
        deadline."""
        if self.cancelled:
            raise self.error()
        if self.remaining() <= 0:
            raise self.timed_out()

    def error(self) -> Interrupted | Cancelled:
        if self.reason is Stop.STOPPING or self.reason is None:
            return Interrupted("the daemon is stopping; the run was ended")
        return Cancelled(f"the run was ended: {self.reason.value}", reason=self.reason.name)

    def timed_out(self) -> AgentError:
        return AgentError(
            f"the agent ran past agent.timeout_s ({self.budget_s:g}s) and was ended",
            code="AGENT_TIMEOUT",
        )


@dataclass
class Active:
    """A ticket being run: its claim, its context, where it is."""

    ticket: Ticket
    lease: Lease
    started: float
    branch: str = ""
    ctx: RunContext = field(default_factory=RunContext)
    stage: str = "claimed"
    run_id: int | None = None  # in the history, once recorded
    future: Future[None] | None = None
    revision: Revision | None = None  # the run revises the ticket's open pull request
    route: Route | None = None  # the Ollama host the run is pinned to, when it uses one
