"""The throwaway project both benchmarks run against: a real repo, a bare remote, a config."""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

PY = sys.executable
NOOP_AGENT = [PY, "-c", "open('x.txt','w').write('x')"]
TREE = Path(__file__).resolve().parents[1]  # the tree whose daemon/ a bench runs

# Words for realistic tickets: common English words every ticket shares some of, and a
# vocabulary of made-up two- and three-syllable words (thousands of them) that tells tickets
# apart, so that a word-set comparison between two tickets has real sets to compare.
COMMON = (
    "the a an to of and in for on with when is it that this should be can not from by as"
    " add fix update remove make use into all each new"
).split()
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def _vocabulary(count: int) -> list[str]:
    rng = random.Random(14)
    return sorted({"".join(rng.choices(_SYLLABLES, k=rng.choice((2, 3)))) for _ in range(count)})


VOCABULARY = _vocabulary(6000)
LABELS = ("backend", "frontend", "cli", "docs", "tests", "infra", "bug", "feature")


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def daemon_env() -> dict[str, str]:
    """The environment for ``python -m daemon`` run with ``cwd=TREE``: this environment less
    PYTHONPATH, so the daemon/ imported is TREE's, and less PYTHONDONTWRITEBYTECODE, so it
    starts from cached bytecode as an installed ticketd does."""
    return {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")
    }


def sentence(rng: random.Random, words: int) -> str:
    """Mostly vocabulary words, one in four a common word."""
    picked = [rng.choice(COMMON if rng.random() < 0.25 else VOCABULARY) for _ in range(words)]
    return " ".join(picked).capitalize() + "."


def backlog_task(n: int, status: str, rng: random.Random, created: str) -> tuple[str, str]:
    """(file name, text) of a Backlog.md task file ``task-<n>``: front matter (id, title,
    status, labels, created_date), a description of a few sentences and acceptance criteria,
    inside Backlog.md's section markers; criteria ticked when ``status`` is Done."""
    title = " ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(3, 6))).capitalize()
    labels = "".join(f"\n  - {x}" for x in rng.sample(LABELS, rng.randint(1, 2)))
    description = " ".join(sentence(rng, rng.randint(8, 16)) for _ in range(rng.randint(2, 4)))
    tick = "x" if status == "Done" else " "
    criteria = "\n".join(
        f"- [{tick}] #{i} {sentence(rng, rng.randint(5, 9))}" for i in range(1, rng.randint(2, 4))
    )
    text = (
        f"---\nid: task-{n}\ntitle: {title}\nstatus: {status}\nassignee: []\n"
        f"created_date: '{created}'\nlabels:{labels}\ndependencies: []\n---\n\n"
        f"## Description\n\n<!-- SECTION:DESCRIPTION:BEGIN -->\n{description}\n"
        f"<!-- SECTION:DESCRIPTION:END -->\n\n## Acceptance Criteria\n<!-- AC:BEGIN -->\n"
        f"{criteria}\n<!-- AC:END -->\n"
    )
    return f"task-{n} - {title.replace(' ', '-')}.md", text


def make_project(root: Path, *, max_tickets: int) -> Path:
    """repo/ (one commit on main, pushed to remote.git), backlog/, config.yaml; returns config."""
    repo, remote = root / "repo", root / "remote.git"
    git(root, "init", "--quiet", "--bare", "-b", "main", str(remote))
    git(root, "init", "--quiet", "-b", "main", str(repo))
    git(repo, "config", "user.email", "bench@example.invalid")
    git(repo, "config", "user.name", "Bench")
    (repo / "README.md").write_text("hello\n")
    git(repo, "add", ".")
    git(repo, "commit", "--quiet", "-m", "initial")
    git(repo, "remote", "add", "origin", str(remote))
    git(repo, "push", "--quiet", "origin", "main")
    for folder in ("todo", "in-progress", "review", "done", "failed", ".leases"):
        (root / "backlog" / folder).mkdir(parents=True, exist_ok=True)
    config = {
        "repo": {"path": "repo", "push_retries": 0},
        "backlog": {"dir": "backlog"},
        "state_dir": "state",
        "logging": {"dir": "logs", "level": "INFO"},
        "agent": {"command": NOOP_AGENT, "timeout_s": 60},
        "concurrency": {"max_tickets": max_tickets},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_in_tempdir(prefix: str, args: argparse.Namespace, bench: Callable[[Path], None]) -> None:
    """Run ``bench`` in a fresh temporary folder, removed afterwards unless ``args.keep``."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        bench(root)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def stop(daemon: subprocess.Popen[Any]) -> int | str:
    """SIGTERM, then its exit status (SIGKILL after two minutes, said so)."""
    daemon.send_signal(signal.SIGTERM)
    try:
        return daemon.wait(timeout=120)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()
        return "killed after 120s"
