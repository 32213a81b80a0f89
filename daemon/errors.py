"""The ticketd error tree.

Every failure a ticket can meet is a ``TicketdError`` carrying a stable ``code``; the
table ``CODES`` says for each code whether the cause is transient (the world may change:
a server comes back, a network heals) and whether retrying the ticket can help. Only
``cli.py`` turns these into text for a terminal; ``.error.json`` carries the same fields.

    TicketdError
     +-- ConfigError          bad config.yaml (exit status 2)
     +-- InvalidTicket        INVALID_TICKET: the file cannot be read as a ticket
     +-- AgentError           AGENT_FAILED, AGENT_TIMEOUT, NO_CHANGES
     +-- GitError             GIT_FAILED, PUSH_FAILED
     +-- Interrupted          INTERRUPTED: the daemon stopped or died mid-run
     +-- Cancelled            CANCELLED: a person ended the run (or moved its file away)
     +-- HistoryUnavailable   the run history cannot be opened, nor a fresh one created

``StopNow`` is a ``BaseException`` so that ``except Exception`` cannot swallow a forced stop.
"""

from __future__ import annotations

from typing import NamedTuple


class Kind(NamedTuple):
    transient: bool
    retryable: bool


# code -> (transient?, retryable?). README "Error codes" documents this table.
CODES: dict[str, Kind] = {
    "INVALID_TICKET": Kind(transient=False, retryable=False),
    "OLLAMA_UNAVAILABLE": Kind(transient=True, retryable=True),
    "MODEL_NOT_FOUND": Kind(transient=False, retryable=False),
    "LLM_TIMEOUT": Kind(transient=True, retryable=True),
    "CONTEXT_TOO_LARGE": Kind(transient=False, retryable=False),
    "EDIT_PARSE_FAILED": Kind(transient=False, retryable=True),
    "EDIT_APPLY_FAILED": Kind(transient=False, retryable=True),
    "ANSWER_TOO_LONG": Kind(transient=False, retryable=True),
    "UNSAFE_EDIT": Kind(transient=False, retryable=False),
    "NO_CHANGES": Kind(transient=False, retryable=True),
    "CHECKS_FAILED": Kind(transient=False, retryable=True),
    "AGENT_FAILED": Kind(transient=False, retryable=True),
    "AGENT_TIMEOUT": Kind(transient=True, retryable=True),
    "AGENT_OOM": Kind(transient=True, retryable=True),
    "SECRET_DETECTED": Kind(transient=False, retryable=False),
    "REVIEW_BLOCKED": Kind(transient=False, retryable=False),
    "REVIEW_FAILED": Kind(transient=True, retryable=True),
    "GIT_FAILED": Kind(transient=False, retryable=True),
    "PUSH_FAILED": Kind(transient=True, retryable=True),
    "PR_FAILED": Kind(transient=True, retryable=True),
    "PR_CLOSED": Kind(transient=False, retryable=False),
    "PR_OPEN": Kind(transient=False, retryable=False),  # a reason in .review.json: waits
    "INTERRUPTED": Kind(transient=True, retryable=True),
    "DEPENDENCY_FAILED": Kind(transient=False, retryable=False),
    "DUPLICATE": Kind(transient=False, retryable=False),
    "INTERNAL_ERROR": Kind(transient=False, retryable=True),
    "CANCELLED": Kind(transient=False, retryable=False),
    "SENSITIVE_PATH": Kind(transient=False, retryable=False),
    "BRANCH_TAKEN": Kind(transient=False, retryable=False),
}


class TicketdError(Exception):
    """Base of every error ticketd raises on purpose."""

    code = "INTERNAL_ERROR"
    stage: str | None = None  # the innermost stage it left, when stages nest

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            if code not in CODES:
                raise ValueError(f"unknown error code {code!r}")
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code

    @property
    def retryable(self) -> bool:
        return CODES[self.code].retryable

    @property
    def transient(self) -> bool:
        return CODES[self.code].transient


class ConfigError(TicketdError):
    """config.yaml is missing, unreadable or invalid; the message names file, key and problem."""

    code = "INTERNAL_ERROR"


class UsageError(TicketdError):
    """A command was asked for something it cannot do (exit status 2)."""


class InvalidTicket(TicketdError):
    code = "INVALID_TICKET"


class AgentError(TicketdError):
    code = "AGENT_FAILED"


class GitError(TicketdError):
    code = "GIT_FAILED"


class Interrupted(TicketdError):
    code = "INTERRUPTED"


class PRFailed(TicketdError):
    """GitHub refused or could not be reached (``daemon/forge.py``)."""

    code = "PR_FAILED"


class Cancelled(TicketdError):
    """A person ended the run (``ticketd cancel``), or moved its ticket file away by hand;
    ``reason`` is ``CANCELLED`` or ``REMOVED``."""

    code = "CANCELLED"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class HistoryUnavailable(TicketdError):
    """The history cannot be opened, and no fresh one can be created in its place."""


class StopNow(BaseException):
    """Raised to end work at once (a second SIGTERM); never caught by ``except Exception``."""
