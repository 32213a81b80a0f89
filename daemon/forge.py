"""Pull requests through PyGithub (github.com, or GitHub Enterprise with ``base_url``).

Idempotent: an open pull request for the branch is updated, never duplicated. Rate limits
(403 with ``X-RateLimit-*``, 403/429 with ``Retry-After``) are waited out by PyGithub's
``GithubRetry`` up to ``max_rate_limit_wait_s``; 5xx answers are retried a few times. Any
failure left is ``PR_FAILED`` (retryable). The token never appears in a message.

For the review loop (``daemon/pulls.py``) it reads a pull request's state with conditional
requests (PyGithub's ``update()`` sends ``If-None-Match``: an unchanged pull request costs a
304, which GitHub does not count against the rate limit), its conversation (comments,
reviews, inline review comments) as plain ``Note`` values, who may write, and it replies,
comments and reacts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import github
from github import Auth, GithubException, GithubRetry

from daemon.errors import PRFailed
from daemon.pulls import Note

WRITE = ("admin", "maintain", "write")  # the permissions that may ask for a revision
PERMISSION_TTL_S = 600  # how long an answer about someone's access is kept


@dataclass(frozen=True)
class Pull:
    """A pull request's state: ``open``, ``merged`` or ``closed`` (unmerged)."""

    number: int
    state: str
    url: str
    changed: bool  # False: GitHub answered 304, nothing changed since the last read
    merged_at: datetime | None = None


@dataclass(frozen=True)
class Access:
    """What the token is allowed on the repository."""

    login: str
    scopes: list[str] | None  # a classic token's scopes; None for a fine-grained token
    private: bool
    can_push: bool


@dataclass(frozen=True)
class PullRequest:
    number: int
    url: str
    created: bool
    draft: bool


class Forge:
    def __init__(
        self,
        repo: str,
        token: str,
        *,
        base_url: str | None = None,
        retries: int = 3,
        max_rate_limit_wait_s: float = 120,
        timeout_s: float = 30,
        backoff_s: float = 0.5,
    ) -> None:
        retry = GithubRetry(
            total=retries,
            backoff_factor=backoff_s,
            secondary_rate_wait=min(60, max_rate_limit_wait_s),
            max_rate_limit_wait=max_rate_limit_wait_s,
        )
        self._gh = github.Github(
            auth=Auth.Token(token),
            base_url=base_url or github.Consts.DEFAULT_BASE_URL,
            timeout=int(timeout_s),
            retry=retry,
        )
        self.repo_name = repo
        self._repo: Any = None
        self._pulls: dict[int, Any] = {}  # number -> PyGithub's object, which keeps its ETag
        self._permissions: dict[str, tuple[str, float]] = {}
        self._login: str | None = None
        self._written: dict[int, dict[int, Any]] = {}  # number -> note id -> PyGithub's comment

    def close(self) -> None:
        self._gh.close()

    def _repository(self) -> Any:
        if self._repo is None:
            self._repo = self._gh.get_repo(self.repo_name)
        return self._repo

    def _pull(self, number: int) -> Any:
        if number not in self._pulls:
            self._pulls[number] = self._repository().get_pull(number)
        return self._pulls[number]

    def access(self) -> Access:
        """Who the token belongs to and whether it may push; PyGithub's ``GithubException``
        and requests' ``OSError`` pass through (``ticketd doctor`` says what they mean)."""
        login = self._gh.get_user().login
        scopes = self._gh.oauth_scopes
        repo = self._gh.get_repo(self.repo_name)
        return Access(login, scopes, repo.private, bool(repo.permissions and repo.permissions.push))

    def open_or_update(
        self, *, branch: str, base: str, title: str, body: str, draft: bool, labels: Sequence[str]
    ) -> PullRequest:
        try:
            repo = self._gh.get_repo(self.repo_name)
            owner = repo.owner.login
            existing = list(repo.get_pulls(state="open", head=f"{owner}:{branch}", base=base))
            if existing:
                pr = existing[0]
                pr.edit(title=title, body=body)
                created = False
            else:
                pr = repo.create_pull(base=base, head=branch, title=title, body=body, draft=draft)
                created = True
            if labels:
                pr.add_to_labels(*labels)
            return PullRequest(pr.number, pr.html_url, created, bool(pr.draft))
        except GithubException as e:
            raise PRFailed(
                f"GitHub refused the pull request for {branch}: {_describe(e)}"
            ) from None
        except OSError as e:  # requests' errors: refused, reset, timed out, retries used up
            raise PRFailed(f"cannot reach GitHub for {self.repo_name}: {e}") from None

    # -- the review loop: every failure here is ``PRFailed``; the caller waits and asks again

    def pull(self, number: int) -> Pull:
        """The pull request's state, asked conditionally after the first read."""
        with _failing(f"pull request #{number}"):
            known = number in self._pulls
            pr = self._pull(number)
            changed = pr.update() if known else True
            state = "merged" if pr.merged else "closed" if pr.state == "closed" else "open"
            return Pull(number, state, pr.html_url, changed, pr.merged_at)

    def login(self) -> str:
        """Whose the token is (ticketd's own notes are written as this person)."""
        if self._login is None:
            with _failing("the token's user"):
                self._login = str(self._gh.get_user().login)
        return self._login

    def forget(self, number: int) -> None:
        """Drop what is kept of a pull request no longer watched."""
        self._pulls.pop(number, None)
        self._written.pop(number, None)

    def conversation(self, number: int) -> list[Note]:
        """Every comment, review and inline review comment on the pull request, oldest first."""
        with _failing(f"the conversation of pull request #{number}"):
            pr = self._pull(number)
            comments = list(pr.get_issue_comments())
            inline = list(pr.get_review_comments())
            notes = [_note(c, "comment") for c in comments] + [_note(c, "inline") for c in inline]
            notes += [
                Note(
                    r.id,
                    "review",
                    _login(r.user),
                    r.body or "",
                    _utc(r.submitted_at),
                    _utc(r.submitted_at),
                    state=r.state or "",
                )
                for r in pr.get_reviews()
                if r.submitted_at is not None  # a pending review is its author's alone
            ]
            self._written[number] = {c.id: c for c in [*comments, *inline]}
            return sorted(notes, key=lambda n: (n.created, n.id))

    def may_write(self, login: str) -> bool:
        """Whether ``login`` has write access to the repository (asked at most every ten
        minutes per person)."""
        cached = self._permissions.get(login.lower())
        if cached is None or time.monotonic() - cached[1] > PERMISSION_TTL_S:
            with _failing(f"{login}'s access"):
                permission = self._repository().get_collaborator_permission(login)
            cached = self._permissions[login.lower()] = (permission, time.monotonic())
        return cached[0] in WRITE

    def react(self, number: int, note: Note, content: str = "eyes") -> None:
        """React to a comment (reviews take no reactions)."""
        written = self._written.get(number, {}).get(note.id)
        if written is None:
            return
        with _failing(f"a reaction on pull request #{number}"):
            written.create_reaction(content)

    def reply(self, number: int, thread: int, body: str) -> None:
        with _failing(f"a reply on pull request #{number}"):
            self._pull(number).create_review_comment_reply(thread, body)

    def comment(self, number: int, body: str) -> None:
        with _failing(f"a comment on pull request #{number}"):
            self._pull(number).create_issue_comment(body)


class _failing:
    """Turn GitHub's and the network's errors into ``PRFailed`` naming what was asked."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None, _: Any) -> None:
        if isinstance(e, GithubException):
            raise PRFailed(f"GitHub refused {self.what}: {_describe(e)}") from None
        if isinstance(e, OSError):
            raise PRFailed(f"cannot reach GitHub for {self.what}: {e}") from None


def _note(c: Any, kind: str) -> Note:
    """An issue comment or an inline review comment as a ``Note``."""
    if kind == "comment":
        return Note(
            c.id, kind, _login(c.user), c.body or "", _utc(c.created_at), _utc(c.updated_at)
        )
    return Note(
        c.id,
        kind,
        _login(c.user),
        c.body or "",
        _utc(c.created_at),
        _utc(c.updated_at),
        path=c.path,
        line=c.line or c.original_line,
        hunk=c.diff_hunk or "",
        reply_to=c.in_reply_to_id,
    )


def _login(user: Any) -> str:
    return str(user.login) if user is not None else "ghost"  # a deleted account


def _utc(at: datetime | None) -> datetime:
    if at is None:
        return datetime.fromtimestamp(0, UTC)
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _describe(e: GithubException) -> str:
    data = e.data if isinstance(e.data, dict) else {}
    message = str(data.get("message") or e.message or "")
    details = "; ".join(str(x.get("message", x)) for x in data.get("errors", []) if x)
    return f"{e.status} {message}{': ' + details if details else ''}".strip()
