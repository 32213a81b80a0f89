"""Speed of the redactor (``daemon.redact.Redactor``) on what ticketd writes.

Every text ticketd logs, stores or serves passes one ``Redactor``: known tokens and their
encodings, URL credentials and the secret detector. This times it on:

- typical log lines, one call each (``stage push done in 0.31s``, ``claimed task-12 …``);
- log lines that name a secret-sounding word (``token``, ``password``) without holding one,
  which let the detector's keyword-gated rules run;
- a 10,000-line agent output (compiler and test chatter, diffs, a few secrets), as one text,
  the way an agent's log is redacted when it ends;
- the first call of a fresh process, which loads the detector's rules.

Prints microseconds per call and lines per second. Asserts nothing. All secrets are generated
at run time.

    python bench/redact.py [--lines 10000]
"""

from __future__ import annotations

import argparse
import random
import string
import subprocess
import sys
import time
from collections.abc import Callable

from daemon.redact import Redactor

ALNUM = string.ascii_letters + string.digits

PLAIN = [
    "stage push done in 0.31s",
    "claimed task-12 - Fix the login page (title)",
    "stage agent done in 41.27s",
    "task-12 done in 48.9s: https://github.com/acme/app/pull/17",
    "watching /srv/app/backlog/todo (pid 4242)",
    "retrying task-7 - Flaky import (attempt 2 of 3, AGENT_TIMEOUT)",
]
WORDY = [
    "stage secrets done in 0.02s: no secret found",
    "checks: test_password_reset passed",
    "reading token from $GITHUB_TOKEN",
    "review: 2 issues, first: app/auth.py:41 api key compared without constant time",
]


def agent_output(rng: random.Random, lines: int) -> str:
    """Something like an agent's log: edits, a diff, compiler and test output, some secrets."""

    def word(n: int) -> str:
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))

    kinds: list[Callable[[], str]] = [
        lambda: f"Applied edit to src/{word(6)}/{word(8)}.py",
        lambda: f"+    {word(5)} = {word(7)}({word(4)}, {rng.randint(0, 99)})",
        lambda: f"-    return {word(6)}.{word(5)}()",
        lambda: f"tests/test_{word(6)}.py::test_{word(8)} PASSED [{rng.randint(1, 99)}%]",
        lambda: f"src/{word(5)}.py:{rng.randint(1, 400)}: error: Name {word(6)!r} is not defined",
        lambda: (
            f"Tokens: {rng.randint(1, 9)}.{rng.randint(0, 9)}k sent, {rng.randint(1, 999)} "
            "received."
        ),
        lambda: f"commit {rng.getrandbits(160):040x}",
        lambda: (
            f"    at {word(7)}.{word(5)} ({word(6)}.js:{rng.randint(1, 300)}:{rng.randint(1, 80)})"
        ),
    ]
    out = [rng.choice(kinds)() for _ in range(lines)]
    secrets = [
        "AKIA" + "".join(rng.choice(string.ascii_uppercase + "234567") for _ in range(16)),
        "ghp_" + "".join(rng.choice(ALNUM) for _ in range(36)),
        'db_password = "' + "".join(rng.choice(ALNUM) for _ in range(12)) + '!#"',
    ]
    for i, secret in enumerate(secrets):
        out[(i + 1) * lines // (len(secrets) + 1)] = f"export VALUE={secret}"
    return "\n".join(out)


def per_call(redact: Redactor, texts: list[str], rounds: int) -> float:
    """Seconds per call, over ``rounds`` passes through ``texts``."""
    start = time.perf_counter()
    for _ in range(rounds):
        for text in texts:
            redact(text)
    return (time.perf_counter() - start) / (rounds * len(texts))


def first_call() -> float:
    """Seconds a fresh process spends on its first call (the detector's rules load)."""
    code = (
        "import time; from daemon.redact import Redactor; r = Redactor(); "
        "t = time.perf_counter(); r('stage push done in 0.31s'); "
        "print(time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=10_000, help="lines of agent output")
    args = parser.parse_args()
    rng = random.Random(7)
    token = "".join(rng.choice(ALNUM) for _ in range(40))
    redact = Redactor([token, "".join(rng.choice(ALNUM) for _ in range(32))])
    redact("warm up")

    print(f"first call in a fresh process: {first_call() * 1000:7.1f} ms (loads the rules)")
    for name, texts in (("plain log lines", PLAIN), ("lines naming secrets", WORDY)):
        seconds = per_call(redact, texts, 2000)
        print(f"{name:30} {seconds * 1e6:7.1f} µs/line  {1 / seconds:9.0f} lines/s")

    output = agent_output(rng, args.lines)
    start = time.perf_counter()
    clean = redact(output)
    whole = time.perf_counter() - start
    masked = clean.count("***")
    print(
        f"{f'agent output, {args.lines} lines':30} {whole * 1000:7.1f} ms/text "
        f"{args.lines / whole:9.0f} lines/s  ({len(output) / 1e6:.2f} MB, {masked} masks)"
    )
    lines = output.split("\n")
    seconds = per_call(redact, lines, 1)
    print(
        f"{'the same, one line a call':30} {seconds * 1e6:7.1f} µs/line  {1 / seconds:9.0f} lines/s"
    )


if __name__ == "__main__":
    main()
