"""The builtin agent: a small local model edits the worktree with SEARCH/REPLACE blocks.

For each model of the chain in turn: show it a stable system prompt (so Ollama reuses the
cached prefix across calls), then the ticket and the repository context within the token
budget. Apply the edits it answers with; run static analysis and the checks; on any failure
tell it what failed and ask again, up to ``max_reflections`` times. A model that runs out of
reflections hands over to the next one, on a clean worktree, with a summary of what failed.
A missing model (404) hands over at once. The run's ``RunContext`` reaches every model call
and check: a cancel ends them at once, and ``agent.timeout_s`` bounds the whole run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from daemon import checks
from daemon.agent import context, edits
from daemon.agent.chain import AgentFailure, Result, walk
from daemon.agent.command import render_ticket
from daemon.confine import Confinement
from daemon.errors import TicketdError
from daemon.llm.client import Message, Ollama, estimate_tokens
from daemon.repo import Workspace
from daemon.runctx import RunContext
from daemon.tickets import Ticket

SYSTEM_PROMPT = """\
You are an expert software engineer working in a git repository. You change files only by
answering with SEARCH/REPLACE blocks, in exactly this form:

path/to/file.py
```python
<<<<<<< SEARCH
lines copied exactly from the file, including indentation
=======
the lines that replace them
>>>>>>> REPLACE
```

Rules:
- The path line comes right before each block, relative to the repository root.
- SEARCH must copy a run of the file's current lines character for character, and must match
  one place only: include a few unchanged lines around the change to make it unique.
- To create a file, leave SEARCH empty. To delete lines, leave REPLACE empty.
- Several blocks may change one file; they apply in order.
- Change only what the task needs. Do not touch files under .git/.
- Briefly say what you will change, then give the blocks. Nothing else.
"""

REFLECTION_RESERVE = 1500  # tokens kept free for feedback messages and earlier answers


@dataclass(frozen=True)
class Settings:
    num_ctx: int
    num_predict: int
    max_reflections: int
    max_context_files: int
    lessons: str = ""  # learned from earlier runs (insights); appended to the system prompt

    @property
    def system(self) -> str:
        return SYSTEM_PROMPT + (
            f"\nLessons from earlier tickets:\n{self.lessons}\n" if self.lessons else ""
        )


class _Truncated(Exception):
    def __init__(self, tokens: int) -> None:
        super().__init__(tokens)
        self.tokens = tokens


@dataclass(frozen=True)
class _Run:
    """What every attempt of one run shares."""

    ticket: Ticket
    task: str
    workspace: Workspace
    llm: Ollama
    s: Settings
    suite: checks.Suite
    confine: Confinement
    ctx: RunContext
    result: Result
    log: Callable[[str], None]


def run(
    ticket: Ticket,
    workspace: Workspace,
    chain: Sequence[str],
    llm: Ollama,
    s: Settings,
    suite: checks.Suite,
    confine: Confinement,
    ctx: RunContext,
    *,
    log: Callable[[str], None],
    previous: str | None = None,
    request: str | None = None,
) -> Result:
    result = Result()
    task = render_ticket(ticket, request)
    budget = s.num_ctx - s.num_predict - REFLECTION_RESERVE
    budget -= estimate_tokens(s.system) + estimate_tokens(task) + 200
    if budget < 0:
        raise AgentFailure(
            f"the ticket alone needs about {s.num_ctx - s.num_predict - budget} tokens, more than "
            f"ollama.num_ctx ({s.num_ctx}) leaves after num_predict ({s.num_predict})",
            code="CONTEXT_TOO_LARGE",
            result=result,
        )
    r = _Run(ticket, task, workspace, llm, s, suite, confine, ctx, result, log)

    def attempt(model: str | None, before: TicketdError | None) -> None:
        assert model is not None
        try:
            _attempt(r, model, budget, before)
        except _Truncated:
            log(f"{model}: Ollama truncated the prompt; trying again with half the context")
            workspace.reset()
            result.changed.clear()
            try:
                _attempt(r, model, budget // 2, before)
            except _Truncated as e:
                raise AgentFailure(
                    f"Ollama truncated the prompt for {model} (evaluated {e.tokens} tokens) "
                    "even with half the context; lower agent.max_context_files or raise "
                    "ollama.num_ctx",
                    code="CONTEXT_TOO_LARGE",
                    result=result,
                ) from None

    earlier = TicketdError(f"(an earlier run of this ticket) {previous}") if previous else None
    return walk(chain, workspace, attempt, result, log=log, earlier=earlier)


def _attempt(r: _Run, model: str, budget: int, previous: TicketdError | None) -> None:
    s, result, log = r.s, r.result, r.log
    shown = context.gather(r.workspace, r.task, budget, s.max_context_files)
    if shown.dropped:
        log(f"context: {len(shown.files)} files shown, over budget: {', '.join(shown.dropped)}")
    user = f"{shown.tree}\n{r.task}\n## Files\n\n{shown.text}"
    if previous is not None:
        user += f"\n## An earlier attempt failed\n\n{previous.message}\n"
    messages: list[Message] = [
        {"role": "system", "content": s.system},
        {"role": "user", "content": user},
    ]
    failure: AgentFailure | None = None
    for turn in range(s.max_reflections + 1):
        # a reflection shares most of its prompt with the call before; some Ollama versions
        # count only the uncached part, so only a first call is judged by its shortfall
        reply = r.llm.chat(
            model,
            _fit(messages, s),
            on_call=result.calls.append,
            judge_shortfall=turn == 0,
            ctx=r.ctx,
        )
        call = reply.call
        log(
            f"llm {model}: {call.prompt_tokens} prompt + {call.eval_tokens} eval tokens, "
            f"{call.duration_s:.1f}s, {call.outcome}"
        )
        if reply.truncated:
            raise _Truncated(call.prompt_tokens)
        failure = _apply_and_check(reply.content, r)
        if failure is not None and reply.done_reason == "length":
            failure = AgentFailure(
                f"Your answer was cut off at the length limit (ollama.num_predict: "
                f"{s.num_predict} tokens) before its edit blocks were complete. Answer "
                "again, shorter: only the blocks, with SEARCH as small as still matches "
                "one place.",
                code="ANSWER_TOO_LONG",
                result=result,
            )
        if failure is None:
            result.first_try = result.first_try or (turn == 0 and len(result.models_tried) == 1)
            result.checks_passed = True
            return
        if turn == s.max_reflections:
            break
        result.reflections += 1
        log(f"{model}: {failure.code}, reflecting ({turn + 1}/{s.max_reflections})")
        messages += [
            {"role": "assistant", "content": reply.content},
            {"role": "user", "content": failure.message},
        ]
    assert failure is not None
    raise failure


def _apply_and_check(answer: str, r: _Run) -> AgentFailure | None:
    """Apply the answer's edits and check them; the failure to reflect on, or None."""
    result, worktree = r.result, r.workspace.path
    try:
        found = edits.parse(answer)
    except TicketdError as e:
        return AgentFailure(
            f"Your edit blocks could not be read: {e.message}. Answer again "
            "with complete SEARCH/REPLACE blocks.",
            code=e.code,
            result=result,
        )
    if not found:
        return AgentFailure(
            "Your answer had no SEARCH/REPLACE blocks. Make the change with SEARCH/REPLACE blocks.",
            code="EDIT_PARSE_FAILED",
            result=result,
        )
    try:
        applied = edits.apply(worktree, found)
    except TicketdError as e:
        raise AgentFailure(e.message, code=e.code, result=result) from None
    result.changed.update(applied.changed)
    if applied.failures:
        return AgentFailure(
            edits.describe_failures(applied.failures), code="EDIT_APPLY_FAILED", result=result
        )
    outcome = r.suite.verify(worktree, sorted(result.changed), confine=r.confine, ctx=r.ctx)
    result.fixes += outcome.fixes
    if outcome.ok:
        return None
    text = "\n\n".join(outcome.failures)
    return AgentFailure(
        f"The change does not pass the checks:\n\n{text}\n\nFix it with SEARCH/REPLACE blocks.",
        code="CHECKS_FAILED",
        result=result,
    )


def _fit(messages: list[Message], s: Settings) -> list[Message]:
    """Drop the oldest reflections (never the system prompt, the task or the last exchange)
    until the conversation fits ``num_ctx`` with room for the answer."""
    kept = list(messages)
    limit = s.num_ctx - s.num_predict
    while len(kept) > 4 and sum(estimate_tokens(m["content"]) for m in kept) > limit:
        del kept[2:4]
    return kept
