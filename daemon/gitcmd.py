"""How ticketd runs git: its own environment, a timeout, a cancel, and nothing a
repository could make git run.

``Git`` runs every git command of ticketd's: an environment of its own (no inherited
``GIT_DIR`` and the like, no terminal prompt, C locale), ``repo.git_timeout_s``, a cancel, and
``SAFE_CONFIG``, settings that switch off whatever in a repository could run a program (hooks,
fsmonitor, the ``ext::`` transport, submodule recursion). ``resolve_remote`` reads the
remote's URLs and the commit identity from the user's repository once, at start.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from daemon import procs
from daemon.errors import GitError

# Settings on every command: nothing a repository's config, hooks or attributes say may run
# a program inside ticketd's git.
SAFE_CONFIG = (
    "core.hooksPath=/dev/null",
    "core.fsmonitor=false",
    "core.untrackedCache=false",
    "core.pager=cat",
    "protocol.ext.allow=never",
    "submodule.recurse=false",
    "fetch.recurseSubmodules=false",
    "push.recurseSubmodules=no",
    "gc.auto=0",
    "maintenance.auto=false",
    "advice.detachedHead=false",
)
# The user's own ways of reaching a remote; every other GIT_* variable is dropped.
KEPT_GIT_VARS = re.compile(
    r"GIT_(SSH|SSH_COMMAND|SSH_VARIANT|ASKPASS|PROXY_COMMAND|SSL_\w+|HTTP_\w+|CONFIG_GLOBAL"
    r"|CONFIG_SYSTEM|CONFIG_NOSYSTEM|(AUTHOR|COMMITTER)_(NAME|EMAIL))"
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


class Git:
    """Runs ticketd's own git commands."""

    def __init__(self, env: Mapping[str, str], *, timeout_s: float) -> None:
        self.env = {k: v for k, v in env.items() if not k.startswith("GIT_")}
        self.env.update({k: v for k, v in env.items() if KEPT_GIT_VARS.fullmatch(k)})
        self.env.update(GIT_TERMINAL_PROMPT="0", LC_ALL="C", GCM_INTERACTIVE="never")
        self.timeout_s = timeout_s

    def __call__(
        self,
        *args: str,
        git_dir: Path | None = None,
        work_tree: Path | None = None,
        cwd: Path | None = None,
        index: Path | None = None,
        config: Sequence[str] = (),
        input: str | None = None,
        cancel: threading.Event | None = None,
        code: str = "GIT_FAILED",
    ) -> str:
        argv = ["git"]
        for setting in (*SAFE_CONFIG, *config):
            argv += ["-c", setting]
        if git_dir is not None:
            argv.append(f"--git-dir={git_dir}")
        if work_tree is not None:
            argv.append(f"--work-tree={work_tree}")
        env = dict(self.env, GIT_INDEX_FILE=str(index)) if index is not None else self.env
        try:
            done = procs.capture(
                [*argv, *args],
                cwd=cwd or git_dir or work_tree,
                env=env,
                timeout_s=self.timeout_s,
                cancel=cancel,
                input=input.encode() if input is not None else None,
            )
        except OSError as e:
            raise GitError(f"cannot run git: {e.strerror}", code=code) from None
        if done.cancelled:
            raise GitError(f"git {args[0]} was cancelled", code=code)
        if done.timed_out:
            raise GitError(f"git {args[0]} ran past repo.git_timeout_s", code=code)
        if done.returncode != 0:
            detail = _last_lines(done.stderr.decode("utf-8", "replace") or str(done.returncode))
            raise GitError(f"git {args[0]} failed: {detail}", code=code)
        return done.stdout.decode("utf-8", "replace")


@dataclass(frozen=True)
class Remote:
    fetch_url: str
    push_url: str
    identity: tuple[
        str, ...
    ]  # ``key=value`` settings (user.name, user.email, user.signingkey, gpg.*)


def resolve_remote(git: Git, repo: Path, remote: str) -> Remote:
    """The URLs of ``remote`` (a remote of the user's repository ``repo``, or a URL) and the
    commit identity configured there. Read once at start; nothing read later changes them."""
    try:
        git("rev-parse", "--git-dir", cwd=repo)
    except GitError:
        raise GitError(f"{repo} is not a git repository") from None
    try:
        fetch = git("remote", "get-url", remote, cwd=repo).strip()
        push = git("remote", "get-url", "--push", remote, cwd=repo).strip()
    except GitError:
        if not _looks_like_url(remote):
            raise GitError(f"{repo} has no remote named {remote!r}") from None
        fetch = push = remote
    try:
        listed = git(
            "config", "-z", "--get-regexp", r"^(user\.(name|email|signingkey)|gpg\.)", cwd=repo
        )
    except GitError:
        listed = ""  # none set
    identity = tuple(
        f"{k}={v}" for k, _, v in (item.partition("\n") for item in listed.split("\0") if item)
    )
    return Remote(_absolute(fetch, repo), _absolute(push, repo), identity)


def _looks_like_url(text: str) -> bool:
    return "://" in text or re.match(r"^[\w.-]+@[\w.-]+:", text) is not None or "/" in text


def _absolute(url: str, base: Path) -> str:
    """A local path remote, made absolute against the repository it was configured in."""
    if "://" in url or re.match(r"^[\w.-]+@[\w.-]+:", url) or Path(url).is_absolute():
        return url
    return str((base / url).resolve())


def _last_lines(text: str, n: int = 6) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])
