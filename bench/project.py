"""The throwaway project both benchmarks run against: a real repo, a bare remote, a config."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import yaml

PY = sys.executable
NOOP_AGENT = [PY, "-c", "open('x.txt','w').write('x')"]


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


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
