"""git through GitPython: worktrees, branches, commits, pushes.

Every git call runs with a timeout (``kill_after_timeout``) and never prompts for a
password (``GIT_TERMINAL_PROMPT=0``). Failures raise ``GitError`` with the tail of git's
own message; a push that fails for a reason the network may heal is retried with backoff.
"""

from __future__ import annotations

import contextlib
import fcntl
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import git
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from daemon.errors import GitError

# Push failures that retrying cannot fix; anything else (network, remote hung up, 5xx) is retried.
PERMANENT_PUSH = (
    "rejected",
    "non-fast-forward",
    "authentication failed",
    "permission denied",
    "could not read username",
    "does not appear to be a git repository",
    "repository not found",
    "protected branch",
)


REMOTE_PATTERNS = (
    re.compile(r"^[\w.-]+@[\w.-]+:(?P<repo>[\w.-]+/[\w.-]+?)(?:\.git)?/?$"),  # git@host:o/r.git
    re.compile(r"^[a-z+]+://(?:[^@/]+@)?[^/]+(?::\d+)?/(?P<repo>[\w.-]+/[\w.-]+?)(?:\.git)?/?$"),
)


def repo_from_remote(url: str) -> str | None:
    """``owner/name`` from a remote URL (ssh, scp-like or https), or None."""
    for pattern in REMOTE_PATTERNS:
        if m := pattern.match(url.strip()):
            return m["repo"]
    return None


class PushTransient(GitError):
    code = "PUSH_FAILED"


class Repo:
    """One repository and the operations a ticket run needs on it."""

    def __init__(self, path: Path, *, timeout_s: float) -> None:
        try:
            self._repo = git.Repo(path)
        except (git.InvalidGitRepositoryError, git.NoSuchPathError) as e:
            raise GitError(f"{path} is not a git repository") from e
        self._repo.git.update_environment(GIT_TERMINAL_PROMPT="0")
        self.path = path
        self.timeout_s = timeout_s

    def _git(self, *args: str, cwd: Path | None = None, code: str = "GIT_FAILED") -> str:
        g = self._repo.git if cwd is None else git.Repo(cwd).git
        if cwd is not None:
            g.update_environment(GIT_TERMINAL_PROMPT="0")
        try:
            out: str = g.execute(["git", *args], kill_after_timeout=self.timeout_s)
        except git.GitCommandError as e:
            detail = _last_lines(str(e.stderr) or str(e))
            raise GitError(f"git {args[0]} failed: {detail}", code=code) from None
        return out

    @contextlib.contextmanager
    def _worktree_lock(self) -> Iterator[None]:
        """Serialise worktree add/remove/prune across threads and daemons on this repo."""
        common = Path(self._repo.common_dir)
        with (common / "ticketd-worktrees.lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def require_branch(self, branch: str) -> None:
        try:
            self._git("rev-parse", "--verify", "--quiet", f"{branch}^{{commit}}")
        except GitError:
            raise GitError(f"base branch {branch!r} does not exist in {self.path}") from None

    def add_worktree(self, path: Path, branch: str, base: str) -> None:
        """A fresh worktree at ``path`` on ``branch``, (re)created from ``base``."""
        with self._worktree_lock():
            if path.exists():
                self._remove(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._git("worktree", "add", "--force", "-B", branch, str(path), base)

    def remove_worktree(self, path: Path) -> None:
        with self._worktree_lock():
            self._remove(path)

    def _remove(self, path: Path) -> None:
        try:
            self._git("worktree", "remove", "--force", "--force", str(path))
        except GitError:
            shutil.rmtree(path, ignore_errors=True)
            self._git("worktree", "prune")

    def prune_worktrees(self, root: Path, keep: Callable[[], set[Path]]) -> list[Path]:
        """Remove worktrees under ``root`` except those ``keep()`` names (asked under the
        lock, so a worktree being created meanwhile is never removed); returns them."""
        removed = []
        with self._worktree_lock():
            self._git("worktree", "prune")
            kept = keep()
            for path in sorted(root.iterdir()) if root.is_dir() else ():
                if path not in kept:
                    self._remove(path)
                    removed.append(path)
        return removed

    def stage_all(self, worktree: Path, exclude: Sequence[str] = ()) -> list[str]:
        """Stage every change but paths matching the ``exclude`` git pathspecs (an agent's
        own files, like aider's ``.aider*``); returns the staged paths."""
        specs = [".", *(f":(exclude){pattern}" for pattern in exclude)]
        self._git("add", "--all", "--", *specs, cwd=worktree)
        return self._git("diff", "--cached", "--name-only", cwd=worktree).splitlines()

    def changed_files(self, worktree: Path, exclude: Sequence[str] = ()) -> list[str]:
        """Paths changed or added in the worktree (not yet staged), less ``exclude``."""
        specs = [".", *(f":(exclude){pattern}" for pattern in exclude)]
        out = self._git(
            "status", "--porcelain", "--untracked-files=all", "-z", "--", *specs, cwd=worktree
        )
        return [entry[3:] for entry in out.split("\0") if len(entry) > 3 and entry[0] != "R"]

    def reset(self, worktree: Path) -> None:
        """Throw away every change in the worktree (tracked and untracked, not ignored)."""
        self._git("reset", "--hard", "--quiet", cwd=worktree)
        self._git("clean", "-fd", "--quiet", cwd=worktree)

    def staged_diff(self, worktree: Path, *, stat: bool = False) -> str:
        """The staged change as a unified diff (or ``--stat``), new files whole."""
        flags = ["--stat"] if stat else ["--no-color", "--no-ext-diff", "--text"]
        return self._git("diff", "--cached", *flags, cwd=worktree)

    def commit(self, worktree: Path, message: str, *, sign: bool = False) -> str:
        """Commit what is staged (the repository's hooks run; ``sign``: with the user's GPG
        key, ``git commit -S``); returns the commit id."""
        self._git("commit", "--quiet", *(["-S"] if sign else []), "-m", message, cwd=worktree)
        return self._git("rev-parse", "HEAD", cwd=worktree)

    def remote_head(self, remote: str, branch: str) -> str | None:
        """The commit ``branch`` points to on ``remote``, or None when it is not there."""
        out = self._git("ls-remote", "--heads", remote, f"refs/heads/{branch}", code="PUSH_FAILED")
        return out.split()[0] if out.strip() else None

    def remote_url(self, remote: str) -> str:
        return self._git("remote", "get-url", remote)

    def ticket_commit(self, branch: str, ticket_id: str) -> str | None:
        """The tip of the local ``branch`` when it is a commit for ``ticket_id``."""
        try:
            message = self._git("log", "-1", "--format=%H%n%B", f"refs/heads/{branch}")
        except GitError:
            return None
        sha, _, body = message.partition("\n")
        return sha if f"Ticket: {ticket_id}" in body else None

    def push(
        self, worktree: Path, remote: str, branch: str, *, attempts: int, source: str = "HEAD"
    ) -> None:
        """Push ``branch`` (ticketd owns it, so force) retrying transient failures."""
        for attempt in Retrying(
            retry=retry_if_exception(lambda e: isinstance(e, PushTransient)),
            stop=stop_after_attempt(attempts + 1),
            wait=wait_exponential_jitter(initial=1, max=30),
            reraise=True,
        ):
            with attempt:
                self._push_once(worktree, remote, branch, source)

    def _push_once(self, worktree: Path, remote: str, branch: str, source: str) -> None:
        try:
            self._git(
                "push",
                "--force",
                remote,
                f"{source}:refs/heads/{branch}",
                cwd=worktree,
                code="PUSH_FAILED",
            )
        except GitError as e:
            if any(word in e.message.lower() for word in PERMANENT_PUSH):
                raise
            raise PushTransient(e.message) from None


def _last_lines(text: str, n: int = 6) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    cleaned = [ln.removeprefix("stderr: ").strip("'") for ln in lines[-n:]]
    return " | ".join(ln for ln in cleaned if ln)
