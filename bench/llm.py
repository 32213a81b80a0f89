"""The builtin agent's LLM cost per ticket: calls, tokens, prompt prefixes, overhead.

Builds a throwaway project in a temporary directory (bench/project.py: a real git repo, a bare
remote, a config.yaml), adds a small package to the repo (``pkg/mod_NN.py``, one per ticket,
each with a ``greet_NN`` function, and ``pkg/__init__.py`` importing them all; committed and
pushed) and rewrites the config for ``agent.kind: builtin`` against a fake Ollama
(tests/fake_ollama.py) running in this process, with ``retries: 0`` and a 0.2 s health check.

The fake answers like a model: its responder reads the ticket id and the file it names from
the first user message, finds that file as the prompt shows it, and returns a SEARCH/REPLACE
block that makes the change. For every ``--wrong-every``-th ticket the first answer's SEARCH
matches nothing, so the agent reflects once and the second answer is the right one. Every
answer streams in three pieces with ``--model-ms`` / 3 between them (the fake's ``slow``), so
each call carries a known, simulated model time.

N tickets go into todo/ and one ``python -m daemon run --once --config ...`` runs them
(``max_tickets: 1``). Then the bench reads

1. from the daemon's history (``state_dir/history.sqlite3``): LLM calls, prompt and eval
   tokens per run (table ``runs``), each call's duration (``llm_calls``) and the ``agent``
   stage's duration (``stages``);
2. from the fake's recorded /api/chat bodies: each prompt as the concatenated message
   contents, in order, and the longest common prefix (characters) with (a) the previous
   ticket's first call, for a ticket's first call, and (b) the call before it in the same
   ticket, for a reflection; as a share of the prompt's length.

Agent overhead is the ``agent`` stage minus the run's summed ``llm_calls.duration_s`` (the
client's own timing of each request, which holds the simulated model time and the HTTP).
Prints figures; asserts nothing.

    python bench/llm.py [--tickets 20] [--model-ms 50] [--wrong-every 3] [--keep]
"""

from __future__ import annotations

import argparse
import math
import re
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml
from project import PY, git, make_project, run_in_tempdir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fake_ollama import FakeOllama

MODEL = "qwen2.5-coder:7b"
OLD = '    return "hi " + name\n'
NEW = '    return f"Hello, {name}!"\n'
WRONG = '    return "hello " + name\n'  # what a model misremembers: in no file
TICKET_ID = re.compile(r"^# (task-\d+):", re.MULTILINE)
NAMED_FILE = re.compile(r"pkg/mod_\d+\.py")


def module(n: int) -> str:
    doc = f'"""Greeting number {n} of the bench package."""\n'
    return f"{doc}\n\ndef greet_{n:02d}(name: str) -> str:\n{OLD}"


def add_package(repo: Path, n: int) -> None:
    """pkg/mod_01.py .. pkg/mod_NN.py and pkg/__init__.py, committed and pushed."""
    pkg = repo / "pkg"
    pkg.mkdir()
    imports = []
    for i in range(1, n + 1):
        (pkg / f"mod_{i:02d}.py").write_text(module(i))
        imports.append(f"from pkg.mod_{i:02d} import greet_{i:02d}\n")
    names = ", ".join(f'"greet_{i:02d}"' for i in range(1, n + 1))
    (pkg / "__init__.py").write_text("".join(imports) + f"\n__all__ = [{names}]\n")
    git(repo, "add", ".")
    git(repo, "commit", "--quiet", "-m", "bench package")
    git(repo, "push", "--quiet", "origin", "main")


def add_ticket(todo: Path, n: int) -> None:
    name = f"task-{n} - Greet-politely-{n}.md"
    body = (
        f"In pkg/mod_{n:02d}.py, greet_{n:02d} should return 'Hello, NAME!' (capital H, a comma,"
        f" an exclamation mark) instead of 'hi NAME'.\n"
    )
    text = (
        f"---\nid: task-{n}\ntitle: Greet politely {n}\nstatus: To Do\n---\n\n"
        f"## Description\n\n{body}\n## Acceptance Criteria\n\n"
        f"- [ ] #1 greet_{n:02d}('Ada') returns 'Hello, Ada!'\n"
    )
    part = todo.parent / f".{name}.part"
    part.write_text(text)
    part.rename(todo / name)


def block(path: str, search: str, replace: str) -> str:
    edit = f"<<<<<<< SEARCH\n{search}=======\n{replace}>>>>>>> REPLACE\n"
    return f"I will change {path}.\n\n{path}\n```python\n{edit}```\n"


class Model:
    """The fake's responder: a model that knows the edit format and sometimes misremembers."""

    def __init__(self, wrong_every: int) -> None:
        self.wrong_every = wrong_every
        self.anomalies: list[str] = []
        self._lock = threading.Lock()

    def note(self, text: str) -> str:
        with self._lock:
            self.anomalies.append(text)
        return "I am not sure what to change."  # no blocks: the agent reflects on that

    def __call__(self, body: dict[str, Any]) -> str:
        messages = body.get("messages") or []
        users = [m.get("content") or "" for m in messages if m.get("role") == "user"]
        # the prompt is: the repository's file list, the ticket ("# task-N: ..."), the files
        first = users[0] if users else ""
        found = TICKET_ID.search(first)
        task = first[found.start() :].split("\n## Files", 1)[0] if found else ""
        path = NAMED_FILE.search(task)
        if found is None or path is None:
            return self.note(f"no ticket id or file in the first user message: {task[:80]!r}")
        ticket, rel = found.group(1), path.group(0)
        shown = re.search(re.escape(rel) + r"\n```\n(.*?)```\n", users[0], re.DOTALL)
        if shown is None or OLD not in shown.group(1):
            return self.note(f"{ticket}: {rel} is not shown whole in the prompt")
        turn = sum(m.get("role") == "assistant" for m in messages)
        if turn == 0 and self.wrong_every and int(ticket.split("-")[1]) % self.wrong_every == 0:
            return block(rel, WRONG, NEW)
        if turn and "SEARCH text not found" not in users[-1]:
            self.note(f"{ticket}: reflection {turn} without 'SEARCH text not found': {users[-1]!r}")
        return block(rel, OLD, NEW)


def run_once(config: Path) -> tuple[float, int, str]:
    """One ``run --once``: (seconds in all, exit status, output)."""
    start = time.monotonic()
    proc = subprocess.run(
        [PY, "-m", "daemon", "run", "--once", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        timeout=600,
    )  # fmt: skip
    return time.monotonic() - start, proc.returncode, proc.stdout


def history(db: Path) -> dict[int, dict[str, Any]]:
    """Per run: outcome, duration, calls, tokens, quality, agent stage, each call's duration."""
    con = sqlite3.connect(db)
    try:
        runs = {
            r[0]: {
                "outcome": r[1],
                "duration": r[2],
                "calls": r[3] or 0,
                "prompt": r[4] or 0,
                "eval": r[5] or 0,
                "quality": r[6],
                "agent": math.nan,
                "call_s": [],
            }
            for r in con.execute(
                "SELECT id, outcome, duration_s, llm_calls, prompt_tokens, eval_tokens, quality"
                " FROM runs ORDER BY id"
            )
        }
        for run_id, took in con.execute(
            "SELECT run_id, duration_s FROM stages WHERE stage = 'agent' ORDER BY rowid"
        ):
            runs[run_id]["agent"] = took if took is not None else math.nan
        for run_id, took in con.execute("SELECT run_id, duration_s FROM llm_calls ORDER BY rowid"):
            runs[run_id]["call_s"].append(took)
    finally:
        con.close()
    return runs


def prompt_text(messages: list[dict[str, Any]]) -> str:
    return "".join(m.get("content") or "" for m in messages)


def common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    lo, hi = 0, n  # binary search on prefix equality: a[:lo] == b[:lo]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def prefixes(fake: FakeOllama) -> dict[str, list[tuple[int, int]]]:
    """(shared prefix chars, prompt chars) per kind of call, from the recorded /api/chat."""
    out: dict[str, list[tuple[int, int]]] = defaultdict(list)
    last_first: dict[str, str] = {}  # model -> text of the previous ticket's first call
    last_call: dict[str, tuple[str | None, str]] = {}  # model -> (ticket, text)
    for req in fake.requests_to("/api/chat"):
        model, messages = req.model or "", req.messages
        text = prompt_text(messages)
        users = [m.get("content") or "" for m in messages if m.get("role") == "user"]
        found = TICKET_ID.search(users[0]) if users else None
        ticket = found.group(1) if found else None
        first = not any(m.get("role") == "assistant" for m in messages)
        if model in last_call:
            out["any"].append((common_prefix(last_call[model][1], text), len(text)))
        if first:
            system = "".join(m.get("content") or "" for m in messages if m.get("role") == "system")
            out["system"].append((len(system), len(text)))
            if model in last_first:
                out["first"].append((common_prefix(last_first[model], text), len(text)))
            last_first[model] = text
        elif model in last_call and last_call[model][0] == ticket:
            out["reflection"].append((common_prefix(last_call[model][1], text), len(text)))
        last_call[model] = (ticket, text)
    return out


def stats_row(label: str, values: list[float], fmt: str = "{:>9.1f}", top: bool = True) -> None:
    """Mean, p50 (and max)."""
    if not values:
        print(f"  {label:<44} {'-':>9} {'-':>9}" + (f" {'-':>9}" if top else ""))
        return
    cells = [statistics.fmean(values), statistics.median(values)]
    line = f"  {label:<44} " + " ".join(fmt.format(c) for c in cells)
    print(line + (" " + fmt.format(max(values)) if top else ""))


def share_row(label: str, pairs: list[tuple[int, int]]) -> None:
    """Mean and p50 of shared/total (percent), beside the mean shared and total characters."""
    if not pairs:
        print(f"  {label:<44} {'-':>9} {'-':>9} {'':>9}  (no such calls)")
        return
    shares = [100 * s / t for s, t in pairs]
    chars = statistics.fmean(s for s, _ in pairs), statistics.fmean(t for _, t in pairs)
    print(
        f"  {label:<44} {statistics.fmean(shares):>8.1f}% {statistics.median(shares):>8.1f}%"
        f" {'':>9}  {chars[0]:.0f} of {chars[1]:.0f} chars, n={len(pairs)}"
    )


def problems(log: str) -> list[str]:
    """Lines of the daemon's output other than its INFO/SUCCESS/DEBUG log lines."""
    ok = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|SUCCESS|DEBUG) ")
    return [line for line in log.splitlines() if line.strip() and not ok.match(line)]


def configure(config: Path, fake: FakeOllama) -> None:
    """make_project's config, with the builtin agent on the fake Ollama."""
    data = yaml.safe_load(config.read_text())
    data["agent"] = {"kind": "builtin", "timeout_s": 60}
    data["ollama"] = {
        "host": fake.url,
        "models": [MODEL],
        "retries": 0,
        "health_check": {"interval_s": 0.2, "timeout_s": 2},
    }
    config.write_text(yaml.safe_dump(data, sort_keys=False))


def bench(root: Path, n: int, model_ms: float, wrong_every: int) -> None:
    config = make_project(root, max_tickets=1)
    add_package(root / "repo", n)
    model = Model(wrong_every)
    with FakeOllama([MODEL]) as fake:
        fake.responder(model)
        fake.slow(model_ms / 1000 / 3)  # three content lines and the last: three waits
        configure(config, fake)
        todo = root / "backlog" / "todo"
        for i in range(1, n + 1):
            add_ticket(todo, i)
        full_s, code, output = run_once(config)
    runs = history(root / "state" / "history.sqlite3")
    shares = prefixes(fake)
    done = [r for r in runs.values() if r["outcome"] == "done"]
    outcomes: dict[str, int] = defaultdict(int)
    for r in runs.values():
        outcomes[r["outcome"]] += 1
    model_s = model_ms / 1000

    print(f"method: {n} tickets, each asking for a one-line edit of its own pkg/mod_NN.py"
          f" (those numbered a multiple of {wrong_every} answered first with a SEARCH that"
          f" matches nothing, so the agent reflects once), run by one `run --once`"
          f" (max_tickets 1, builtin agent) against an in-process fake Ollama that streams"
          f" each answer with {model_ms:g} ms simulated model time; calls, tokens and durations"
          f" from the daemon's history (all {len(runs)} runs); prefixes from the fake's recorded"
          f" /api/chat bodies (message contents concatenated); overhead = agent stage - the"
          f" run's summed llm_calls.duration_s; fake tokens are prompt chars // 4 and answer"
          f" chars // 4; git {git_version()}, {sys.platform}, python"
          f" {sys.version.split()[0]}")  # fmt: skip
    print(f"  {'per ticket':<44} {'mean':>9} {'p50':>9} {'max':>9}")
    calls = [float(r["calls"]) for r in runs.values()]
    stats_row("LLM calls", calls, "{:>9.2f}")
    stats_row("prompt tokens", [r["prompt"] for r in runs.values()])
    stats_row("eval tokens", [r["eval"] for r in runs.values()])
    stats_row("prompt + eval tokens", [r["prompt"] + r["eval"] for r in runs.values()])
    print(f"  {'stable prefix (share of the prompt)':<44} {'mean':>9} {'p50':>9}")
    share_row("(a) first call vs previous ticket's first", shares["first"])
    share_row("(b) reflection vs the call before it", shares["reflection"])
    share_row("system prompt, of a first call", shares["system"])
    share_row("any call vs the previous call to the model", shares["any"])
    print(f"  {'time per ticket (ms)':<44} {'mean':>9} {'p50':>9}")
    rs = list(runs.values())
    llm_s = [sum(r["call_s"]) for r in rs]
    over = [r["agent"] - t for r, t in zip(rs, llm_s, strict=True)]
    calls_of = [len(r["call_s"]) for r in rs]
    ms = [
        ("run, claim to done (runs.duration_s)", [r["duration"] for r in rs]),
        ("  stage agent", [r["agent"] for r in rs]),
        ("    LLM calls (client-timed, summed)", llm_s),
        ("      of which simulated model time", [model_s * len(r["call_s"]) for r in rs]),
        ("    agent overhead = agent - LLM calls", over),
        ("      tickets with 1 call", [o for o, c in zip(over, calls_of, strict=True) if c == 1]),
        ("      tickets with 2+ calls", [o for o, c in zip(over, calls_of, strict=True) if c > 1]),
        ("  run - LLM calls", [r["duration"] - t for r, t in zip(rs, llm_s, strict=True)]),
        ("per call: client-timed - simulated", [c - model_s for r in rs for c in r["call_s"]]),
    ]
    for label, values in ms:
        stats_row(label, [v * 1000 for v in values if not math.isnan(v)], top=False)
    quality = [r["quality"] for r in runs.values() if r["quality"] is not None]
    mean_q = f"{statistics.fmean(quality):.3f}" if quality else "-"
    print(f"quality score: mean {mean_q} over {len(quality)} runs (1.0 first try, -0.15 per"
          f" reflection); {len(done)} of {n} tickets done; the run took {full_s:.2f} s"
          f" in all")  # fmt: skip
    bad = problems(output)
    print(f"daemon: exit status {code}; runs by outcome {dict(outcomes)};"
          f" {len(bad)} other line(s) in its output")  # fmt: skip
    for line in bad[:10]:
        print("  " + line)
    chats, warm = fake.requests_to("/api/chat"), fake.requests_to("/api/generate")
    print(f"fake Ollama: {len(chats)} /api/chat, {len(warm)} /api/generate,"
          f" {len(fake.requests)} requests in all; problems {fake.problems() or 'none'};"
          f" responder anomalies {model.anomalies or 'none'}")  # fmt: skip


def git_version() -> str:
    out = subprocess.run(["git", "--version"], capture_output=True, text=True, check=True).stdout
    return out.split()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tickets", type=int, default=20)
    ap.add_argument("--model-ms", type=float, default=50, help="simulated model time per call")
    ap.add_argument("--wrong-every", type=int, default=3, help="every Nth ticket reflects once")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    run_in_tempdir(
        "ticketd-llm-",
        args,
        lambda root: bench(root, args.tickets, args.model_ms, args.wrong_every),
    )


if __name__ == "__main__":
    main()
