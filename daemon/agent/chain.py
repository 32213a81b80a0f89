"""The fallback chain of models, shared by both agents.

``walk`` gives each model of the ticket's chain its turn, on a clean checkout when an
earlier one left work behind: a model the server does not have (MODEL_NOT_FOUND) or one
that gave up hands over to the next, told what failed before; the first that succeeds ends
the walk. ``Result`` records what was tried, for the history, the log and ``.error.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from daemon.errors import AgentError, TicketdError
from daemon.llm.client import Call, LLMError
from daemon.repo import Workspace

# A failure that no other model can mend ends the walk at once.
FINAL = frozenset(
    {"OLLAMA_UNAVAILABLE", "LLM_TIMEOUT", "AGENT_TIMEOUT", "UNSAFE_EDIT", "CONTEXT_TOO_LARGE"}
)


@dataclass
class Result:
    """What the agent did: the models it tried and how each did, its calls and reflections."""

    model: str | None = None  # the model whose work is kept; None: the agent used none
    models_tried: list[str] = field(default_factory=list)
    outcomes: dict[str, str] = field(default_factory=dict)  # model -> ok / not_found / failed
    calls: list[Call] = field(default_factory=list)
    reflections: int = 0
    fixes: int = 0
    first_try: bool = False
    checks_passed: bool = False
    changed: set[str] = field(default_factory=set)
    attempts: int = 0  # runs of a command agent
    edit_format: str = ""  # builtin: the format of the answer that passed

    @property
    def quality(self) -> float:
        """1.0 for a first-try success, less for each reflection and hand-over, 0 on failure."""
        if not self.checks_passed:
            return 0.0
        handovers = max(0, len(self.models_tried) - 1)
        return round(max(0.1, 1.0 - 0.15 * self.reflections - 0.25 * handovers), 2)


class AgentFailure(AgentError):
    """The agent gave up; ``result`` says what it tried."""

    def __init__(self, message: str, *, code: str, result: Result) -> None:
        super().__init__(message, code=code)
        self.result = result


Attempt = Callable[[str | None, TicketdError | None], None]


def walk(
    chain: Sequence[str | None],
    workspace: Workspace,
    attempt: Attempt,
    result: Result,
    *,
    log: Callable[[str], None],
    earlier: TicketdError | None = None,
    final: Collection[str] = FINAL,
    on_model: Callable[[str], None] = lambda model: None,
) -> Result:
    """Call ``attempt(model, what_failed_before)`` for each model in turn until one returns.
    An attempt fails with ``AgentError`` (or ``LLMError``); the walk records it and raises
    ``AgentFailure``, carrying ``result``, when no model is left or the failure is final.
    ``on_model`` hears of each model as its turn starts."""
    last: TicketdError | None = None
    for model in chain:
        if last is not None:  # a hand-over starts on a fresh checkout
            workspace.reset()
            result.changed.clear()
        if model is not None:
            result.models_tried.append(model)
            on_model(model)
        name = model or "the agent"
        try:
            attempt(model, last or earlier)
        except LLMError as e:
            if e.code != "MODEL_NOT_FOUND" or model is None:
                raise AgentFailure(e.message, code=e.code, result=result) from e
            result.outcomes[model] = "not_found"
            log(f"{model}: not found on the server; next model")
            last = last or e
            continue
        except AgentError as e:
            failure = AgentFailure(e.message, code=e.code, result=result)
            failure.stage = e.stage  # where in the attempt it failed (changes, checks)
            if model is not None:
                result.outcomes[model] = "failed"
            if e.code in final:
                raise failure from None
            last = failure
            log(f"{name}: gave up ({e.code}); handing over")
            continue
        if model is not None:
            result.outcomes[model] = "ok"
        result.model = model
        return result
    assert last is not None
    failure = AgentFailure(last.message, code=last.code, result=result)
    failure.stage = last.stage
    raise failure
