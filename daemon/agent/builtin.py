"""The builtin agent: a local model edits the worktree, judged by the checks.

For each model of the chain in turn: ask the server how many tokens the model really holds
(``/api/show``); show it a stable system prompt for the edit format (so Ollama reuses the
cached prefix) whose worked example is another project's (an example in this repository
gets copied); then the file list, the files (the most relevant whole, the others as
outlines), the ticket, and the format named again with the file the change most likely goes
to. Read the answer in whatever format it came (``formats``: SEARCH/REPLACE, a unified
diff, whole or partial files), apply it, run static analysis and the checks; on a failure
say what failed, with the format shown on a real line of the file at hand, up to
``max_reflections`` times.

A conversation that cannot succeed stops early: an answer the model has given before, an
answer cut at the context window. Then, and when the reflections run out, a fresh candidate
starts on a clean worktree (``candidates`` in all), at a higher temperature and another
seed, in the format the model has shown it writes (another one when it repeated itself),
with less context after a repeat or a full window; the checks judge each. A model that runs
out of candidates hands over to the next one of the chain. The run's ``RunContext`` reaches
every call and check: a cancel ends them at once, and ``agent.timeout_s`` bounds the whole
run; no candidate starts that the time left cannot hold.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from daemon import checks
from daemon.agent import context, edits, formats
from daemon.agent.chain import AgentFailure, Result, walk
from daemon.agent.command import render_ticket
from daemon.confine import Confinement
from daemon.errors import TicketdError
from daemon.llm.client import CHARS_PER_TOKEN, Message, Reply, estimate_tokens
from daemon.llm.pool import Route
from daemon.repo import Workspace
from daemon.runctx import RunContext
from daemon.tickets import Ticket

_INTRO = "You are an expert software engineer working in a git repository.\n"
_RULES = """\
Rules:
- Use the paths exactly as the file list gives them.
- Change only what the task needs: the code, not its tests, unless the task asks for tests.
  Do not touch files under .git/.
- Briefly say what you will change, then give the edits. Nothing else.
"""
_REQUEST = """\
For example, in another project (its file is not in this repository), greeting.py reads:

```
def greeting(name):
    print(f"Hello {name}")
```

and the task is: make the greeting casual, and add farewell(name), which prints "Bye NAME".
The answer:

I will change "Hello" to "Hey" and add farewell after greeting.

"""
_ANSWERS = {
    formats.SEARCH_REPLACE: """\
greeting.py
```
<<<<<<< SEARCH
def greeting(name):
    print(f"Hello {name}")
=======
def greeting(name):
    print(f"Hey {name}")


def farewell(name):
    print(f"Bye {name}")
>>>>>>> REPLACE
```
""",
    formats.WHOLE: """\
greeting.py
```
def greeting(name):
    print(f"Hey {name}")


def farewell(name):
    print(f"Bye {name}")
```
""",
    formats.UDIFF: """\
```diff
--- greeting.py
+++ greeting.py
@@ ... @@
 def greeting(name):
-    print(f"Hello {name}")
+    print(f"Hey {name}")
+
+
+def farewell(name):
+    print(f"Bye {name}")
```
""",
}
_FORMATS = {
    formats.SEARCH_REPLACE: """\
You change files only by answering with SEARCH/REPLACE blocks. A block is the file's path
on a line of its own, then a fence holding three markers:

<<<<<<< SEARCH
the lines to change, copied from the file exactly, with their indentation
=======
the lines that replace them
>>>>>>> REPLACE

- SEARCH must match one place only: include a few unchanged lines around the change.
- To add a function, SEARCH the lines it goes after and repeat them in REPLACE before it.
- To create a file, leave SEARCH empty. To delete lines, leave REPLACE empty.
- Several blocks may change one file; they apply in order.
""",
    formats.WHOLE: """\
You change files by answering with each changed file in full: the file's path on a line of
its own, then a fence holding the file's complete new content, every line of it, changed or
not, with your change made. To create a file, do the same under its new path.
""",
    formats.UDIFF: """\
You change files by answering with a unified diff in a ```diff fence: for each file a
"--- path" and a "+++ path" line, then hunks that start with "@@ ... @@", where unchanged
lines start with a space, removed lines with "-" and added lines with "+". Give two or three
unchanged lines around each change. To create a file, use "--- /dev/null".
""",
}
# The system prompt per format: fixed, so Ollama reuses it; its example is another project's
# (formats.EXAMPLE_PATH is never created), since an example in this repository gets copied.
SYSTEM_PROMPTS = {
    fmt: f"{_INTRO}{text}\n{_REQUEST}{_ANSWERS[fmt]}\n{_RULES}" for fmt, text in _FORMATS.items()
}
FORMAT_NAMES = {
    formats.SEARCH_REPLACE: "SEARCH/REPLACE blocks",
    formats.WHOLE: "the whole changed files",
    formats.UDIFF: "a unified diff",
}
_YOURS = "(your new lines)"  # the example's placeholder: an answer holding it copied the example
REFLECTION_RESERVE = 1500  # tokens kept free for feedback and earlier answers (an 8th at most)
CANDIDATE_TEMPERATURE = 0.6  # a fresh candidate samples; the first answer is deterministic


@dataclass(frozen=True)
class Settings:
    num_ctx: int
    num_predict: int
    max_reflections: int
    max_context_files: int
    whole_files: int = 3  # of the files shown, this many whole, the others as outlines
    lessons: str = ""  # learned from earlier runs (insights); appended to the system prompt
    candidates: int = 3  # fresh attempts per model when one fails
    edit_format: str = "auto"  # or one of formats.FORMATS
    learned_formats: Mapping[str, str] = field(default_factory=dict)  # model -> what worked

    def system(self, fmt: str) -> str:
        lessons = f"\nLessons from earlier tickets:\n{self.lessons}\n" if self.lessons else ""
        return SYSTEM_PROMPTS[fmt] + lessons

    def first_format(self, model: str) -> str:
        """The format to ask for first; "" to choose by the files (``_by_size``)."""
        if self.edit_format != "auto":
            return self.edit_format
        return self.learned_formats.get(model, "")


@dataclass(frozen=True)
class _Run:
    """What every attempt of one run shares."""

    task: str
    workspace: Workspace
    llm: Route
    s: Settings
    suite: checks.Suite
    confine: Confinement
    ctx: RunContext
    result: Result
    log: Callable[[str], None]
    words: list[str]  # the ticket's identifiers and keywords


@dataclass
class _Plan:
    """How the next candidate of one model goes; each failure may change it."""

    model: str
    num_ctx: int
    format: str
    narrow: bool = False  # fewer files: the window was too small, or the model repeated itself
    chars_per_token: float = CHARS_PER_TOKEN  # measured on the first answer
    answers: list[str] = field(default_factory=list)  # every answer so far, to see repeats
    written: list[str] = field(default_factory=list)  # formats the model answered in


@dataclass(frozen=True)
class _Verdict:
    failure: AgentFailure | None  # None: the checks pass
    format: str = ""  # the format the answer was in


def run(
    ticket: Ticket,
    workspace: Workspace,
    chain: Sequence[str],
    llm: Route,
    s: Settings,
    suite: checks.Suite,
    confine: Confinement,
    ctx: RunContext,
    *,
    log: Callable[[str], None],
    previous: str | None = None,
    request: str | None = None,
    on_model: Callable[[str], None] = lambda model: None,
) -> Result:
    result = Result()
    task = render_ticket(ticket, request)
    words = context.keywords(task)
    r = _Run(task, workspace, llm, s, suite, confine, ctx, result, log, words)

    def attempt(model: str | None, before: TicketdError | None) -> None:
        assert model is not None
        _model(r, model, before)

    earlier = TicketdError(f"(an earlier run of this ticket) {previous}") if previous else None
    return walk(chain, workspace, attempt, result, log=log, earlier=earlier, on_model=on_model)


def _model(r: _Run, model: str, before: TicketdError | None) -> None:
    """Up to ``candidates`` conversations with ``model``; returns once one passes."""
    s, log = r.s, r.log
    known = r.llm.context_length(model, r.ctx)
    num_ctx = min(s.num_ctx, known or s.num_ctx)
    if num_ctx < s.num_ctx:
        log(f"{model}: holds {known} tokens, less than ollama.num_ctx ({s.num_ctx}); using {known}")
    plan = _Plan(model, num_ctx, s.first_format(model))
    failure: AgentFailure | None = None
    k = 0
    while k < max(1, s.candidates):
        if failure is not None:
            if not _time_for_another(r):
                log(f"{model}: no time left for another candidate")
                break
            r.workspace.reset()
            r.result.changed.clear()
            log(f"{model}: candidate {k + 1}/{s.candidates}, {FORMAT_NAMES[plan.format]}")
        failure = _converse(r, plan, k, before)
        if failure is None:
            r.result.edit_format = plan.written[-1]
            return
        if failure.code != "CONTEXT_TOO_LARGE":  # a window too small: the same again, narrower
            k += 1
    assert failure is not None
    raise failure


def _time_for_another(r: _Run) -> bool:
    """Whether the run's time left holds another candidate's first answer and its checks."""
    longest = max((c.duration_s for c in r.result.calls), default=0.0)
    return r.ctx.remaining() > 2 * longest


def _converse(r: _Run, plan: _Plan, k: int, before: TicketdError | None) -> AgentFailure | None:
    """One candidate: an answer and up to ``max_reflections`` corrections. None when it
    passes; else the failure, with ``plan`` changed for the next candidate."""
    s, result, log, model = r.s, r.result, r.log, plan.model
    budget = _budget(plan, s.system(plan.format or formats.SEARCH_REPLACE), r.task, s)
    if budget < 0:
        raise AgentFailure(
            f"the ticket alone needs about {plan.num_ctx - budget} "
            f"tokens with the answer, more than {_window(plan, s)} holds; shorten the ticket "
            "or use a model with a larger context",
            code="CONTEXT_TOO_LARGE",
            result=result,
        )
    files = 3 if plan.narrow else s.max_context_files
    whole = min(files, 2 if plan.narrow else s.whole_files)
    shown = context.gather(r.workspace, r.task, budget, files, whole)
    if shown.dropped:
        log(f"context: {len(shown.files)} files shown, over budget: {', '.join(shown.dropped)}")
    plan.format = plan.format or _by_size(shown)
    reminder = _reminder(plan.format, shown, r.words)
    earlier = f"\n## An earlier attempt failed\n\n{before.message}\n" if before else ""
    # the files, then the task and the format last: small models follow what they read last
    user = f"{shown.tree}\n## Files\n\n{shown.text}\n{r.task}\n{earlier}\n{reminder}"
    messages: list[Message] = [
        {"role": "system", "content": s.system(plan.format)},
        {"role": "user", "content": user},
    ]
    failure: AgentFailure | None = None
    chosen = False  # the next candidate's format is decided
    for turn in range(s.max_reflections + 1):
        reply = r.llm.chat(
            model,
            _fit(messages, plan, s),
            on_call=result.calls.append,
            judge_shortfall=turn == 0,
            ctx=r.ctx,
            num_ctx=plan.num_ctx,
            temperature=CANDIDATE_TEMPERATURE if k else None,
            seed=(r.llm.seed + k) if k and r.llm.seed is not None else None,
        )
        call = reply.call
        log(
            f"llm {model}: {call.prompt_tokens} prompt + {call.eval_tokens} eval tokens, "
            f"{call.duration_s:.1f}s, {call.outcome}"
        )
        if turn == 0 and call.prompt_tokens and not reply.truncated:
            chars = sum(len(m["content"]) for m in messages)
            plan.chars_per_token = min(CHARS_PER_TOKEN, chars / call.prompt_tokens)
        if reply.truncated or _window_full(reply, plan):
            what = (
                f"Ollama truncated the prompt for {model} (evaluated {call.prompt_tokens} tokens)"
                if reply.truncated
                else f"the prompt and answer filled {_window(plan, s)}"
            )
            if plan.narrow:
                raise AgentFailure(
                    f"{what} even with less context; lower agent.max_context_files or use a "
                    "model with a larger context",
                    code="CONTEXT_TOO_LARGE",
                    result=result,
                )
            log(f"{what}; trying again with less context")
            plan.narrow = True
            return AgentFailure(what, code="CONTEXT_TOO_LARGE", result=result)
        verdict = _apply_and_check(reply.content, r, plan, shown)
        failure = verdict.failure
        if verdict.format:
            plan.written.append(verdict.format)
        if failure is not None and reply.done_reason == "length":
            failure = AgentFailure(
                f"Your answer was cut off at the length limit (ollama.num_predict: "
                f"{s.num_predict} tokens) before its edits were complete. Answer again, "
                "shorter: only the changed lines, as SEARCH/REPLACE blocks.",
                code="ANSWER_TOO_LONG",
                result=result,
            )
            plan.format, chosen = formats.SEARCH_REPLACE, True
        if failure is None:
            result.first_try = result.first_try or (
                turn == 0 and k == 0 and len(result.models_tried) == 1
            )
            result.checks_passed = True
            return None
        repeated = reply.content.strip() in plan.answers
        plan.answers.append(reply.content.strip())
        if repeated:
            log(f"{model}: the same answer again; a fresh candidate instead")
            plan.format, plan.narrow, chosen = _other(plan), True, True  # and fewer files
            break
        if turn == s.max_reflections:
            break
        result.reflections += 1
        log(f"{model}: {failure.code}, reflecting ({turn + 1}/{s.max_reflections})")
        messages += [
            {"role": "assistant", "content": reply.content},
            {"role": "user", "content": failure.message},
        ]
    if plan.written and not chosen:
        plan.format = plan.written[-1]  # the model writes this format: ask for it
    return failure


WHOLE_LINES = 200  # files this short are cheaper to answer whole than to get blocks wrong


def _by_size(shown: context.Context) -> str:
    """Whole files when every file shown whole is short, else SEARCH/REPLACE blocks."""
    short = all(body.count("\n") <= WHOLE_LINES for body in shown.bodies.values())
    return formats.WHOLE if shown.bodies and short else formats.SEARCH_REPLACE


def _budget(plan: _Plan, system: str, task: str, s: Settings) -> int:
    """Tokens left for the repository context, with the measured characters per token."""
    budget = plan.num_ctx - s.num_predict - _reserve(plan) - 200
    budget -= estimate_tokens(system + task, plan.chars_per_token)
    if plan.narrow:
        budget //= 2
    return budget if budget < 0 else int(budget * plan.chars_per_token / CHARS_PER_TOKEN)


def _reserve(plan: _Plan) -> int:
    return min(REFLECTION_RESERVE, plan.num_ctx // 8)


def _window(plan: _Plan, s: Settings) -> str:
    if plan.num_ctx == s.num_ctx:
        return f"ollama.num_ctx ({s.num_ctx})"
    return f"the context of {plan.model} ({plan.num_ctx} tokens, as the server reports)"


def _window_full(reply: Reply, plan: _Plan) -> bool:
    """An answer cut because the prompt and it filled the window (not at num_predict)."""
    used = reply.call.prompt_tokens + reply.call.eval_tokens
    return reply.done_reason == "length" and used >= plan.num_ctx * 0.95


def _other(plan: _Plan) -> str:
    """The format to try when the model repeats itself: the one it wrote, if it wrote
    another; else whole files after blocks, blocks after anything else."""
    if plan.written and plan.written[-1] != plan.format:
        return plan.written[-1]
    return formats.WHOLE if plan.format == formats.SEARCH_REPLACE else formats.SEARCH_REPLACE


def _reminder(fmt: str, shown: context.Context, words: Sequence[str]) -> str:
    """The format named again after the ticket, with the file the change most likely goes to
    (``_focus``); the system prompt's example is another project's."""
    found = _focus(shown, words, guess=False)
    where = f" (the change most likely goes to {found[0]})" if found else ""
    how = {
        formats.SEARCH_REPLACE: "SEARCH/REPLACE blocks, each after its file's path",
        formats.WHOLE: "each changed file in full: its path on a line of its own, then a "
        "fence holding every line of the file as it should be",
        formats.UDIFF: "a unified diff in a ```diff fence",
    }[fmt]
    text = f"Answer with {how}, as in the example, for this repository's files{where}."
    return f"## Answer format\n\n{text}\n"


def _example(fmt: str, shown: context.Context, words: Sequence[str], path: str = "") -> str:
    """The answer format shown on a real line of the file at hand (``_focus``), for a
    reflection: copied, it changes a place the ticket is about; nothing in it is a path to
    copy or an answer to give back. Whole files are said, not shown."""
    found = _focus(shown, words, path)
    if found is None or fmt == formats.WHOLE:
        return _reminder(fmt, shown, words) if found else ""
    path, line = found
    indent = line[: len(line) - len(line.lstrip())] + (
        "    " if line.rstrip().endswith(":") else ""
    )
    head = f"## Answer format, shown on {path} (an illustration only, not the change to make)\n\n"
    fence = "```"
    if fmt == formats.UDIFF:
        diff = f"--- {path}\n+++ {path}\n@@ ... @@\n {line}\n+{indent}{_YOURS}\n"
        return f"{head}{fence}diff\n{diff}{fence}\n"
    block = f"<<<<<<< SEARCH\n{line}\n=======\n{line}\n{indent}{_YOURS}\n>>>>>>> REPLACE\n"
    return f"{head}{path}\n{fence}\n{block}{fence}\n"


def _focus(
    shown: context.Context, words: Sequence[str], path: str = "", *, guess: bool = True
) -> tuple[str, str] | None:
    """Where to show the format: in ``path`` if given, else in the shown files that are not
    tests (most relevant first), the line that defines one of the ticket's words, else (with
    ``guess``) the first definition (or line) of the most relevant file."""
    paths = (
        [path]
        if path in shown.bodies
        else sorted(shown.bodies, key=lambda p: bool(context.TEST.search(p)))
    )
    if not paths:
        return None
    lines = {p: [x for x in shown.bodies[p].splitlines() if x.strip()] for p in paths}
    for word in words:
        name = re.escape(word.split(".")[-1])
        for p in paths:
            if context.TEST.search(p) and p != path:
                continue
            hit = next(
                (x for x in lines[p] if re.match(r"\s*" + edits.DEFINITION + name + r"\b", x)),
                None,
            )
            if hit is not None:
                return p, hit
    if not guess and path not in shown.bodies:
        return None  # no file defines what the ticket names: a new one, maybe; say none
    first = lines[paths[0]]
    line = next(
        (x for x in first if re.match(r"\s*" + edits.DEFINITION, x)), first[0] if first else ""
    )
    return paths[0], line


def _apply_and_check(answer: str, r: _Run, plan: _Plan, shown: context.Context) -> _Verdict:
    """Apply the answer's edits and check them: the failure to reflect on, or None."""
    result, worktree = r.result, r.workspace.path
    asked = FORMAT_NAMES[plan.format]

    def failed(message: str, code: str, fmt: str = "", path: str = "") -> _Verdict:
        again = _example(plan.format, shown, r.words, path)
        text = f"{message}\n\n{again}\nAnswer with {asked}." if again else message
        return _Verdict(AgentFailure(text, code=code, result=result), fmt)

    try:
        read = formats.read(answer)
    except TicketdError as e:
        return failed(f"Your edit blocks could not be read: {e.message}.", e.code)
    if not read.edits:
        return failed("Your answer had no edits that I could read.", "EDIT_PARSE_FAILED")
    if any(_YOURS in e.replace for e in read.edits):
        return failed(
            "Your answer copied the format example; it only shows the format. Make the change "
            "the task asks for.",
            "EDIT_PARSE_FAILED",
            read.format,
        )
    placed, unplaced = formats.place(read.edits, shown.listing, shown.bodies)
    try:
        applied = edits.apply(worktree, placed)
    except TicketdError as e:
        raise AgentFailure(e.message, code=e.code, result=result) from None
    result.changed.update(applied.changed)
    if not (unplaced or applied.failures or applied.changed):
        return failed(
            "Your edits change nothing: the files already read so. Write the changed lines.",
            "NO_CHANGES",
            read.format,
        )
    if unplaced or applied.failures:
        failures = sorted([*unplaced, *applied.failures], key=lambda f: f.edit.index)
        first = failures[0].edit.path
        return failed(edits.describe_failures(failures), "EDIT_APPLY_FAILED", read.format, first)
    outcome = r.suite.verify(worktree, sorted(result.changed), confine=r.confine, ctx=r.ctx)
    result.fixes += outcome.fixes
    if outcome.ok:
        return _Verdict(None, read.format)
    text = "\n\n".join(outcome.failures)
    return _Verdict(
        AgentFailure(
            f"The change does not pass the checks:\n\n{text}\n\nFix it with {asked}.",
            code="CHECKS_FAILED",
            result=result,
        ),
        read.format,
    )


def _fit(messages: list[Message], plan: _Plan, s: Settings) -> list[Message]:
    """Drop the oldest reflections (never the system prompt, the task or the last exchange)
    until the conversation fits the model's window with room for the answer."""
    kept = list(messages)
    limit = plan.num_ctx - s.num_predict
    while (
        len(kept) > 4
        and sum(estimate_tokens(m["content"], plan.chars_per_token) for m in kept) > limit
    ):
        del kept[2:4]
    return kept
