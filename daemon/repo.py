"""ticketd's own repositories, and the agent's checkout.

Every git command here goes through ``gitcmd.Git`` (nothing a repository says runs a
program). ticketd keeps two bare repositories under ``state_dir/git``:

- ``base.git`` holds only what was fetched from the remote: the base branch, and a ticket's
  branch when it exists there (people's commits on it are kept and built on). Checkouts
  borrow its objects (git alternates); the sandbox shows them read-only.
- ``work.git`` is ticketd's own: the trees and commits it builds, and ``refs/ticketd/<branch>``
  for each branch (a run that failed at the push resumes from it). No agent sees it.

An agent's checkout is a fresh ``git init`` on the base commit. The agent may do anything to
it, ``.git`` included: ticketd never runs git there again. ``snapshot`` reads the checkout's
files into a tree with ticketd's own index and ``work.git``, and diffs it against the base
commit; that diff is what the gates see. ``commit`` makes the commit from exactly that tree
with the base commit as parent, and ``push`` sends exactly that commit to the URL resolved
from the configuration at start, fenced with ``--force-with-lease``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from loguru import logger
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from daemon.errors import GitError
from daemon.gitcmd import Git, Remote

GITLINK = "160000"  # a submodule entry
SYMLINK = "120000"

# Push failures that retrying cannot fix; anything else (network, remote hung up, 5xx) is retried.
PERMANENT_PUSH = (
    "rejected",
    "non-fast-forward",
    "stale info",
    "authentication failed",
    "permission denied",
    "could not read username",
    "does not appear to be a git repository",
    "repository not found",
    "protected branch",
)


class PushTransient(GitError):
    code = "PUSH_FAILED"


@dataclass(frozen=True)
class Checkout:
    """An agent's checkout: ``path`` holds the base commit's files on ``branch``."""

    path: Path
    base: str  # the base commit
    branch: str
    index: Path  # ticketd's copy of the index made when the checkout was fresh


@dataclass(frozen=True)
class Entry:
    old_mode: str
    new_mode: str
    status: str  # A, M, D, T
    path: str
    sha: str  # the new blob
    link: str | None = None  # a symbolic link's target


@dataclass(frozen=True)
class Change:
    """The checkout's files as a tree, and how it differs from the base commit."""

    tree: str
    base: str
    entries: tuple[Entry, ...]
    diff: str  # unified, new files whole: what the gates see


class Repo:
    """ticketd's repositories under ``root`` (``state_dir/git``) and the remote they serve."""

    def __init__(self, root: Path, remote: Remote, git: Git) -> None:
        self.root = root
        self.remote = remote
        self.git = git
        self.base_dir = root / "base.git"
        self.work_dir = root / "work.git"
        self.objects = self.base_dir / "objects"
        self._fetched: set[str] = set()  # base commits known to be in base.git

    def ensure(self) -> None:
        """Create the two repositories (idempotent; safe with other daemons on one state)."""
        with self._locked("init"):
            for path in (self.base_dir, self.work_dir):
                if not (path / "HEAD").is_file():
                    self.git("init", "--quiet", "--bare", "--template=", str(path), cwd=self.root)
            alternates = self.work_dir / "objects" / "info" / "alternates"
            if not alternates.is_file():
                alternates.parent.mkdir(parents=True, exist_ok=True)
                alternates.write_text(f"{self.objects}\n")
            (self.work_dir / "indexes").mkdir(exist_ok=True)

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """Serialise an operation across threads and daemons sharing this state."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / f"{name}.lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    # -- the remote ---------------------------------------------------------------------

    def remote_heads(self, *branches: str, cancel: threading.Event | None = None) -> dict[str, str]:
        """The commit each branch points to on the remote (absent ones are left out)."""
        out = self.git(
            "ls-remote",
            "--heads",
            self.remote.fetch_url,
            *(f"refs/heads/{b}" for b in branches),
            cwd=Path("/"),  # outside any repository: no repository's settings apply
            cancel=cancel,
            code="PUSH_FAILED",
        )
        heads = {}
        for line in out.splitlines():
            sha, _, ref = line.partition("\t")
            heads[ref.removeprefix("refs/heads/")] = sha
        return heads

    def fetch_base(self, branch: str, sha: str, cancel: threading.Event | None = None) -> None:
        """Make sure ``base.git`` has commit ``sha`` (the remote's ``branch``: the base
        branch, or a ticket's), fetching it when it does not."""
        if sha in self._fetched:
            return
        with self._locked("fetch"):
            if self._has(sha):
                self._fetched.add(sha)
                return
            self.git(
                "fetch",
                "--quiet",
                "--no-tags",
                "--no-recurse-submodules",
                self.remote.fetch_url,
                f"+refs/heads/{branch}:refs/base/{branch}",
                git_dir=self.base_dir,
                cancel=cancel,
            )
        if not self._has(sha):
            raise GitError(f"{branch} moved on the remote while it was fetched; try again")
        self._fetched.add(sha)

    def _has(self, sha: str) -> bool:
        try:
            self.git("cat-file", "-e", f"{sha}^{{commit}}", git_dir=self.base_dir)
        except GitError:
            return False
        return True

    # -- the agent's checkout --------------------------------------------------------------

    def checkout(self, path: Path, base: str, branch: str) -> Checkout:
        """A fresh checkout of ``base`` at ``path`` on ``branch`` (anything there is removed)."""
        remove_tree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.git("init", "--quiet", "--template=", f"--initial-branch={branch}", str(path))
        dot = path / ".git"
        (dot / "objects" / "info" / "alternates").write_text(f"{self.objects}\n")
        self.git("reset", "--quiet", "--hard", base, git_dir=dot, work_tree=path, cwd=path)
        index = self.work_dir / "indexes" / f"{path.name}-{uuid.uuid4().hex[:8]}.index"
        shutil.copyfile(dot / "index", index)  # made by us just now: trusted stat data
        return Checkout(path, base, branch, index)

    def files(self, checkout: Checkout) -> list[str]:
        """The base commit's files (what the checkout started with)."""
        out = self.git("ls-tree", "-r", "-z", "--name-only", checkout.base, git_dir=self.base_dir)
        return [p for p in out.split("\0") if p]

    def grep(self, checkout: Checkout, word: str) -> dict[str, int]:
        """How often ``word`` occurs as a word in each text file of the base commit."""
        try:
            out = self.git(
                "grep",
                "-I",
                "-c",
                "-F",
                "-w",
                "-e",
                word,
                checkout.base,
                "--",
                git_dir=self.base_dir,
            )
        except GitError:
            return {}  # no match (git grep exits 1)
        counts = {}
        for line in out.splitlines():
            rest = line.removeprefix(f"{checkout.base}:")
            path, _, count = rest.rpartition(":")
            if path and count.isdigit():
                counts[path] = int(count)
        return counts

    def snapshot(
        self,
        checkout: Checkout,
        exclude: Sequence[str] = (),
        cancel: threading.Event | None = None,
    ) -> Change:
        """The checkout's files (less ``exclude`` pathspecs and what its .gitignore names)
        as a tree in ``work.git``, compared with the base commit."""
        index = checkout.index.with_name(checkout.index.name + f".{uuid.uuid4().hex[:8]}")
        shutil.copyfile(checkout.index, index)
        specs = [".", *(f":(exclude){pattern}" for pattern in exclude)]
        try:
            self.git(
                "add",
                "--all",
                "--",
                *specs,
                git_dir=self.work_dir,
                work_tree=checkout.path,
                index=index,
                cancel=cancel,
            )
            tree = self.git("write-tree", git_dir=self.work_dir, index=index).strip()
        finally:
            index.unlink(missing_ok=True)
        raw = self.git(
            "diff-tree",
            "-r",
            "-z",
            "--no-renames",
            "--raw",
            checkout.base,
            tree,
            git_dir=self.work_dir,
        )
        entries = tuple(
            replace(e, link=self.git("cat-file", "blob", e.sha, git_dir=self.work_dir))
            if e.new_mode == SYMLINK
            else e
            for e in _entries(raw)
        )
        diff = self._diff(checkout.base, tree, git_dir=self.work_dir) if entries else ""
        return Change(tree, checkout.base, entries, diff)

    def _diff(self, *revisions: str, git_dir: Path) -> str:
        return self.git(
            "diff",
            "--no-color",
            "--no-ext-diff",
            "--no-textconv",
            "--text",
            "--no-renames",
            *revisions,
            git_dir=git_dir,
        )

    def between(self, base: str, head: str) -> str:
        """What ``head`` changes since it left ``base`` (a pull request's diff)."""
        return self._diff(f"{base}...{head}", git_dir=self.base_dir)

    def foreign(self, base: str, head: str, marker: str) -> bool:
        """Whether a commit on ``head`` since ``base`` lacks ``marker`` in its message (the
        ``Ticket:`` line ticketd writes): someone else committed there."""
        out = self.git("log", "--format=%B%x00", f"{base}..{head}", git_dir=self.base_dir)
        return any(marker not in message for message in out.split("\0")[:-1])

    def diffstat(self, change: Change) -> str:
        return self.git("diff", "--stat", change.base, change.tree, git_dir=self.work_dir)

    def release(self, checkout: Checkout) -> None:
        """Remove the checkout and ticketd's index for it."""
        remove_tree(checkout.path)
        checkout.index.unlink(missing_ok=True)

    # -- commit and push ---------------------------------------------------------------------

    def commit(self, change: Change, branch: str, message: str, *, sign: bool = False) -> str:
        """The commit of ``change.tree`` on top of its base (signed with the user's key when
        ``sign``); recorded as ``refs/ticketd/<branch>``. Returns its id."""
        sha = self.git(
            "commit-tree",
            change.tree,
            "-p",
            change.base,
            *(["-S"] if sign else []),
            "-F",
            "-",
            git_dir=self.work_dir,
            config=self.remote.identity,
            input=message,
        ).strip()
        self.git("update-ref", f"refs/ticketd/{branch}", sha, git_dir=self.work_dir)
        return sha

    def saved(self, branch: str) -> str | None:
        """The commit ticketd last made for ``branch`` (to resume a failed push)."""
        try:
            return self.git(
                "rev-parse",
                "--verify",
                "--quiet",
                f"refs/ticketd/{branch}^{{commit}}",
                git_dir=self.work_dir,
            ).strip()
        except GitError:
            return None

    def forget(self, branch: str) -> None:
        """Drop ``refs/ticketd/<branch>`` once its ticket is delivered: nothing resumes from
        it, and git's own maintenance may then prune the commit."""
        try:
            self.git("update-ref", "-d", f"refs/ticketd/{branch}", git_dir=self.work_dir)
        except GitError as e:  # a ref left behind costs a little space, nothing else
            logger.warning("cannot drop refs/ticketd/{}: {}", branch, e.message)

    def maintain(self) -> None:
        """git's own housekeeping of ``work.git`` (``gc --auto``: packs loose objects and
        prunes old unreachable ones, only past git's thresholds). ``base.git`` is left
        alone: ``work.git`` borrows its objects, which a gc there could prune."""
        self.git("gc", "--auto", "--quiet", git_dir=self.work_dir)

    def message(self, sha: str) -> str:
        return self.git("log", "-1", "--format=%B", sha, git_dir=self.work_dir)

    def push(
        self,
        sha: str,
        branch: str,
        *,
        expect: str | None,
        attempts: int,
        cancel: threading.Event | None = None,
    ) -> None:
        """Push commit ``sha`` to the remote's ``branch``, only if the branch is still at
        ``expect`` there (``None``: only if it does not exist); a transient failure is
        retried. The remote moving meanwhile is PUSH_FAILED: nothing is overwritten."""
        lease = f"--force-with-lease=refs/heads/{branch}:{expect or ''}"
        for attempt in Retrying(
            retry=retry_if_exception(lambda e: isinstance(e, PushTransient)),
            stop=stop_after_attempt(attempts + 1),
            wait=wait_exponential_jitter(initial=1, max=30),
            reraise=True,
        ):
            with attempt:
                try:
                    self.git(
                        "push",
                        "--quiet",
                        "--no-verify",
                        lease,
                        self.remote.push_url,
                        f"{sha}:refs/heads/{branch}",
                        git_dir=self.work_dir,
                        cancel=cancel,
                        code="PUSH_FAILED",
                    )
                except GitError as e:
                    message = e.message.lower()
                    if "stale info" in message:
                        raise GitError(
                            f"{branch} changed on the remote while the ticket ran (someone "
                            "pushed to it); nothing was overwritten",
                            code="PUSH_FAILED",
                        ) from None
                    if any(word in message for word in PERMANENT_PUSH) or (
                        cancel is not None and cancel.is_set()
                    ):
                        raise
                    raise PushTransient(e.message) from None

    def prune(self, root: Path, keep: Callable[[], set[Path]]) -> list[Path]:
        """Remove checkouts under ``root`` except those ``keep()`` names, and indexes no
        checkout uses; returns the checkouts removed."""
        removed = []
        with self._locked("prune"):
            kept = keep()
            for path in sorted(root.iterdir()) if root.is_dir() else ():
                if path not in kept:
                    remove_tree(path)
                    removed.append(path)
            names = {p.name for p in kept}
            for index in (self.work_dir / "indexes").glob("*.index"):
                if index.name.rsplit("-", 1)[0] not in names:
                    index.unlink(missing_ok=True)
        return removed


def remove_tree(path: Path) -> None:
    """Remove a checkout whatever the agent did to it (read-only folders included)."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return

    def retry(func: Callable[..., object], target: str, _: object) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(target), 0o700)
            os.chmod(target, 0o700)
        with contextlib.suppress(FileNotFoundError):
            func(target)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=retry)


def _entries(raw: str) -> tuple[Entry, ...]:
    """``git diff-tree -z --raw`` output: ``:old new sha sha status\\0path\\0`` records."""
    parts = raw.split("\0")
    entries = []
    for i in range(0, len(parts) - 1, 2):
        head, path = parts[i], parts[i + 1]
        fields = head.lstrip(":").split()
        if len(fields) >= 5:
            entries.append(Entry(fields[0], fields[1], fields[4][:1], path, fields[3]))
    return tuple(entries)


class Workspace:
    """One run's checkout and what ticketd does with it: start it afresh, list and search
    the base commit's files, snapshot it, remove it."""

    def __init__(self, repo: Repo, path: Path, base: str, branch: str) -> None:
        self.repo = repo
        self.checkout = repo.checkout(path, base, branch)

    @property
    def path(self) -> Path:
        return self.checkout.path

    def reset(self) -> None:
        """Throw the agent's work away (its .git included): a fresh checkout of the base."""
        c = self.checkout
        self.repo.release(c)
        self.checkout = self.repo.checkout(c.path, c.base, c.branch)

    def files(self) -> list[str]:
        return self.repo.files(self.checkout)

    def grep(self, word: str) -> dict[str, int]:
        return self.repo.grep(self.checkout, word)

    def snapshot(self, exclude: Sequence[str], cancel: threading.Event | None = None) -> Change:
        return self.repo.snapshot(self.checkout, exclude, cancel)

    def release(self) -> None:
        self.repo.release(self.checkout)
