"""A fake GitHub REST API (v3) that the real PyGithub client talks to unchanged.

It is a real HTTP/1.1 server on 127.0.0.1 that answers as GitHub Enterprise Server does, under
``/api/v3``, so a client is pointed at it the way it is pointed at an Enterprise host::

    github.Github(base_url=fake.url, auth=github.Auth.Token("t0k3n"), retry=None)

It keeps one private repository (``acme/widgets`` by default) with its pull requests, their
labels, their conversation (comments, inline review comments in threads, reviews, reactions) and
who may do what in it, and answers with GitHub's JSON shapes, status codes and headers: 201 and
``Location`` on create, 422 ``Validation Failed`` for a second open pull request from the same
head into the same base, 401 ``Bad credentials`` for a wrong token, ``X-RateLimit-*`` on every
answer, ``Link`` pagination, an ``ETag`` on every 200 to a GET and 304 ``Not Modified`` (without
a body, not counted against the rate limit) when it is sent back in ``If-None-Match``, and the
token's kind: a classic token's ``X-OAuth-Scopes`` on every authenticated answer
(``scopes="repo"``), or none for a fine-grained token (``scopes=None``), whose push access shows
in the repository's ``permissions.push`` (``push=``). A pull request changes (``updated_at``, the
``comments`` and ``review_comments`` counts, so its ETag) when its conversation does; an inline
comment outside a review gets a review of its own (COMMENTED, no body), as on GitHub. Each test
scripts the trouble and the people it needs::

    fake.fail(502, "Server Error", method="POST", path_contains="/pulls")  # next such request
    fake.rate_limit(retry_after=2, status=429)  # a secondary limit with Retry-After, then normal
    fake.rate_limit(retry_after=None)           # a primary limit: Remaining 0 until Reset
    fake.add_pull("feature", title="Left from the last run")  # state as if created earlier
    fake.add_issue_comment(1, "Please rename it.", user="alice")
    first = fake.add_review_comment(1, "Off by one?", path="app.py", line=3)
    fake.add_review_comment(1, "Still there.", in_reply_to=first["id"])
    fake.add_review(1, "Looks good", state="APPROVED", at=datetime(2025, 1, 2, tzinfo=UTC))
    fake.edit_comment(first["id"], "Off by two?")
    fake.set_permission("alice", "write")  # else only the token's user has a role (admin)
    fake.merge(1, by="alice")  # or fake.close(1)

Timestamps have whole seconds, as GitHub's do, so two changes within one second can leave a pull
request's JSON (and ETag) the same unless a count changed; the scripting methods take ``at`` to
set the time. A test inspects what arrived: ``requests`` (method, path under the API root,
query, headers with the token masked, parsed JSON body, status answered), ``pulls`` (number ->
the pull request's JSON), ``comments``, ``review_comments`` and ``reviews`` (number -> their
JSON, oldest first), ``reactions`` (comment id -> its reactions), ``permissions`` (login ->
role). A request for anything the fake does not implement is answered 404 and listed in
``unimplemented``; the ``fake_github`` fixture fails the test at teardown for it, so a gap in the
fake is never mistaken for GitHub's answer.

The HTTP plumbing (open connections dropped on ``stop()``, handler threads joined) is
``fakehttp``'s, shared with ``fake_ollama``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import pytest
from fakehttp import FakeServer, Handler

API_PREFIX = "/api/v3"  # where GitHub Enterprise Server serves the REST API
DOCS = "https://docs.github.com/rest"
RATE_DOCS = "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api"
CREATE_PULL_DOCS = "https://docs.github.com/rest/pulls/pulls#create-a-pull-request"
REPLY_DOCS = "https://docs.github.com/rest/pulls/comments#create-a-reply-for-a-review-comment"
REACTIONS_DOCS = "https://docs.github.com/rest/reactions/reactions"
BAD_CREDENTIALS = "Bad credentials"
NEEDS_AUTH = "Requires authentication"
NOT_FOUND = "Not Found"
VALIDATION_FAILED = "Validation Failed"
PRIMARY_LIMIT = "API rate limit exceeded for user ID 1."
SECONDARY_LIMIT = (
    "You have exceeded a secondary rate limit. Please wait a few minutes before you try again."
)
RATE_LIMIT = 5000  # GitHub's hourly limit for a personal access token
MASK = "***"
REVIEW_STATES = ("APPROVED", "CHANGES_REQUESTED", "COMMENTED")  # as submitted reviews list
REACTIONS = ("+1", "-1", "laugh", "confused", "heart", "hooray", "rocket", "eyes")
# The roles on a repository, least first, and the legacy ``permission`` GitHub reports for each.
ROLES = {
    "none": "none",
    "read": "read",
    "triage": "read",
    "write": "write",
    "maintain": "write",
    "admin": "admin",
}
DIFF_HUNK = "@@ -1,1 +1,1 @@\n-x = 1\n+x = 2"

# Fields GitHub sends only when one pull request is fetched, not in a list of them.
_FULL_ONLY = (
    "merged",
    "mergeable",
    "rebaseable",
    "mergeable_state",
    "merged_by",
    "comments",
    "review_comments",
    "maintainer_can_modify",
    "commits",
    "additions",
    "deletions",
    "changed_files",
)


def already_exists(head_label: str) -> str:
    """GitHub's message for a second open pull request from ``owner:branch``."""
    return f"A pull request already exists for {head_label}."


def _now() -> str:
    return _stamp(None)


def _stamp(at: datetime | None) -> str:
    """GitHub's timestamp, in UTC with whole seconds: of ``at`` (naive means UTC), or now."""
    at = datetime.now(UTC) if at is None else at if at.tzinfo else at.replace(tzinfo=UTC)
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _node_id(kind: str, number: int) -> str:
    return f"{kind}_kwDO{number:08d}"


def _role_permissions(role: str) -> dict[str, bool]:
    """The ``permissions`` GitHub shows for a collaborator with ``role``: the roles it holds."""
    roles = list(ROLES)
    held = roles[1 : roles.index(role) + 1]  # "none" holds nothing
    names = {"admin": "admin", "maintain": "maintain", "push": "write", "triage": "triage"}
    return {key: name in held for key, name in names.items()} | {"pull": "read" in held}


@dataclass
class Request:
    """One request the fake received. ``path`` is under the API root (``/repos/o/r/pulls``);
    ``headers`` have lower-case names and the token replaced by ``***``; ``body`` is the parsed
    JSON (None without one); ``status`` is what the fake answered (None until it has)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    status: int | None = None

    def get(self, key: str, default: Any = None) -> Any:
        return self.body.get(key, default) if isinstance(self.body, dict) else default


@dataclass(frozen=True)
class _Reply:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Fault:
    status: int
    message: str
    times: int
    method: str | None
    path_contains: str | None
    retry_after: int | None = None  # a secondary rate limit: sent as Retry-After
    reset_in: float | None = None  # a primary rate limit: X-RateLimit-Reset this far ahead

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method.upper() == method) and (
            self.path_contains is None or self.path_contains in path
        )


def _error(
    status: int, message: str, docs: str = DOCS, headers: dict[str, str] | None = None, **extra: Any
) -> _Reply:
    """GitHub's error body: the message, any details, where the docs are, the status."""
    body = {"message": message, **extra, "documentation_url": docs, "status": str(status)}
    return _Reply(status, body, headers or {})


def _invalid(
    resource: str,
    code: str,
    field_: str | None = None,
    message: str = "",
    docs: str = CREATE_PULL_DOCS,
) -> _Reply:
    error: dict[str, Any] = {"resource": resource, "code": code}
    if field_ is not None:
        error["field"] = field_
    if message:
        error["message"] = message
    return _error(422, VALIDATION_FAILED, docs, errors=[error])


class _Handler(Handler):
    do_PATCH = do_PUT = Handler._dispatch

    def send_github(self, status: int, data: bytes, headers: dict[str, str]) -> None:
        if status == 304:  # Not Modified: the headers alone, never a body or a Content-Length
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            return
        self.send(status, data, "application/json; charset=utf-8", headers)


class FakeGitHub(FakeServer):
    label = "fake GitHub"
    handler = _Handler

    def __init__(
        self,
        repo: str = "acme/widgets",
        *,
        token: str = "t0k3n",
        login: str = "ticketd-bot",
        default_branch: str = "main",
        port: int = 0,
        scopes: str | None = "repo",
        push: bool = True,
    ) -> None:
        super().__init__(port)  # also ``errors``: exceptions raised inside the fake
        self.owner, self.name = repo.split("/")
        self.token = token
        self.scopes = scopes  # X-OAuth-Scopes of a classic token; None: a fine-grained one
        self.push = push  # the repository's permissions.push for the token's user
        self.login = login  # the user the token belongs to: author of pulls and comments
        self.default_branch = default_branch
        self.requests: list[Request] = []
        self.unimplemented: list[Request] = []
        self.pulls: dict[int, dict[str, Any]] = {}
        self.comments: dict[int, list[dict[str, Any]]] = {}  # on the conversation
        self.review_comments: dict[int, list[dict[str, Any]]] = {}  # inline, on the diff
        self.reviews: dict[int, list[dict[str, Any]]] = {}
        self.reactions: dict[int, list[dict[str, Any]]] = {}  # comment id -> its reactions
        self.permissions: dict[str, str] = {login: "admin"}  # login -> role; others: none
        self._arrived = threading.Condition(self._lock)
        self._faults: list[_Fault] = []
        self._ids = iter(range(1_000_001, 10**9))
        self._label_ids: dict[str, int] = {}
        self._used = 0

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The ``base_url`` for PyGithub: the API root, as on GitHub Enterprise Server."""
        return f"{self.web_url}{API_PREFIX}"

    @property
    def web_url(self) -> str:
        """Where ``html_url`` links point."""
        return super().url

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"

    # -- scripting -------------------------------------------------------------------------

    def fail(
        self,
        status: int,
        message: str,
        *,
        times: int = 1,
        method: str | None = None,
        path_contains: str | None = None,
    ) -> None:
        """The next ``times`` requests (with ``method``, and ``path_contains`` in the path under
        the API root, when given) answer ``status`` with ``{"message": message, ...}``. Scripted
        answers come before authentication, as a proxy's would, in the order scripted."""
        with self._lock:
            self._faults.append(_Fault(status, message, times, method, path_contains))

    def rate_limit(
        self,
        times: int = 1,
        retry_after: int | None = 1,
        status: int = 403,
        *,
        reset_in: float = 1,
        method: str | None = None,
        path_contains: str | None = None,
    ) -> None:
        """The next ``times`` (matching) requests hit a rate limit, then all is normal again.

        With ``retry_after`` (whole seconds, as GitHub sends them) it is a secondary limit:
        ``status`` (403 or 429), ``Retry-After``, the message "You have exceeded a secondary
        rate limit...". With ``retry_after=None`` it is the primary limit: ``status``,
        ``X-RateLimit-Remaining: 0``, ``X-RateLimit-Reset`` ``reset_in`` seconds ahead (epoch
        seconds, rounded up), the message "API rate limit exceeded for user ID 1."."""
        if retry_after is not None and (not isinstance(retry_after, int) or retry_after < 0):
            raise ValueError(f"Retry-After is whole seconds, not {retry_after!r}")
        message = PRIMARY_LIMIT if retry_after is None else SECONDARY_LIMIT
        with self._lock:
            self._faults.append(
                _Fault(
                    status,
                    message,
                    times,
                    method,
                    path_contains,
                    retry_after=retry_after,
                    reset_in=reset_in if retry_after is None else None,
                )
            )

    def add_pull(
        self,
        head: str,
        *,
        base: str | None = None,
        title: str = "A pull request",
        body: str | None = None,
        draft: bool = False,
        state: str = "open",
        at: datetime | None = None,
    ) -> dict[str, Any]:
        """Put a pull request in place as if it had been created earlier (by an earlier run,
        or by hand, at ``at``); ``head`` is ``branch`` or ``owner:branch``. Returns its JSON."""
        with self._lock:
            pull = self._new_pull(head, base or self.default_branch, title, body, draft)
            pull["created_at"] = pull["updated_at"] = stamp = _stamp(at)
            if state == "closed":
                pull["state"], pull["closed_at"] = "closed", stamp
            return pull

    def add_issue_comment(
        self, number: int, body: str, *, user: str = "alice", at: datetime | None = None
    ) -> dict[str, Any]:
        """``user`` comments on pull request ``number``'s conversation. Returns its JSON."""
        with self._lock:
            return self._new_comment(self.pulls[number], body, user, _stamp(at))

    def add_review_comment(
        self,
        number: int,
        body: str,
        *,
        user: str = "alice",
        path: str = "app.py",
        line: int = 1,
        diff_hunk: str = DIFF_HUNK,
        in_reply_to: int | None = None,
        review_id: int | None = None,
        at: datetime | None = None,
    ) -> dict[str, Any]:
        """``user`` comments inline on pull request ``number``'s diff: on ``path`` at ``line``
        (the new side), under ``diff_hunk`` (the diff up to that line); or, ``in_reply_to`` a
        review comment, in its thread, on the thread's line. As on GitHub the comment belongs
        to a review: ``review_id``, or one of its own (COMMENTED, empty body) as GitHub makes
        for a single comment. Returns its JSON; KeyError for an unknown comment or review."""
        with self._lock:
            pull = self.pulls[number]
            thread: dict[str, Any] = {"path": path, "line": line, "diff_hunk": diff_hunk}
            if in_reply_to is not None:
                root = self._thread_root(pull, in_reply_to)
                if root is None:
                    raise KeyError(f"no review comment {in_reply_to} on #{number}")
                thread = root
            return self._new_review_comment(pull, body, user, _stamp(at), thread, review_id)

    def add_review(
        self,
        number: int,
        body: str,
        *,
        user: str = "alice",
        state: str = "COMMENTED",
        at: datetime | None = None,
    ) -> dict[str, Any]:
        """``user`` submits a review of pull request ``number``: ``state`` APPROVED,
        CHANGES_REQUESTED or COMMENTED. Returns its JSON."""
        if state not in REVIEW_STATES:
            raise ValueError(f"a submitted review is one of {REVIEW_STATES}, not {state!r}")
        with self._lock:
            return self._new_review(self.pulls[number], body, user, state, _stamp(at))

    def edit_comment(
        self, comment_id: int, body: str, *, at: datetime | None = None
    ) -> dict[str, Any]:
        """Edit a comment or a review comment in place, as its author would on GitHub: its
        ``body`` and ``updated_at``, and the pull request's. KeyError for an unknown id."""
        with self._lock:
            for store in (self.comments, self.review_comments):
                if (found := self._find(store, comment_id)) is not None:
                    number, comment = found
                    comment["body"], comment["updated_at"] = body, _stamp(at)
                    self._touch(self.pulls[number], comment["updated_at"])
                    return comment
        raise KeyError(f"no comment {comment_id}")

    def set_permission(self, login: str, permission: str) -> None:
        """``login``'s role on the repository: admin, maintain, write, triage, read or none.
        GitHub reports maintain as ``permission`` write and triage as read, the role itself
        as ``role_name``."""
        if permission not in ROLES:
            raise ValueError(f"a role is one of {tuple(ROLES)}, not {permission!r}")
        with self._lock:
            self.permissions[login] = permission

    def merge(
        self, number: int, *, by: str = "alice", at: datetime | None = None
    ) -> dict[str, Any]:
        """Pull request ``number`` is merged on GitHub by ``by``: closed, ``merged``,
        ``merged_at``, ``merged_by``, a ``merge_commit_sha``. Returns its JSON."""
        with self._lock:
            pull = self._open_pull(number)
            stamp = _stamp(at)
            pull.update(
                state="closed",
                closed_at=stamp,
                merged=True,
                merged_at=stamp,
                merged_by=self._user(by),
                merge_commit_sha=_sha(f"merge #{number} at {stamp}"),
            )
            self._touch(pull, stamp)
            return pull

    def close(self, number: int, *, at: datetime | None = None) -> dict[str, Any]:
        """Pull request ``number`` is closed on GitHub without a merge. Returns its JSON."""
        with self._lock:
            pull = self._open_pull(number)
            pull["state"], pull["closed_at"] = "closed", _stamp(at)
            self._touch(pull, pull["closed_at"])
            return pull

    # -- inspection ------------------------------------------------------------------------

    def requests_to(self, path: str, method: str | None = None) -> list[Request]:
        """The requests to ``path`` (under the API root), with ``method`` if given."""
        with self._lock:
            return [
                r
                for r in self.requests
                if r.path == path and (method is None or r.method == method.upper())
            ]

    def wait_for_requests(
        self, n: int, timeout: float = 10, *, path: str | None = None, method: str | None = None
    ) -> None:
        """Block until ``n`` requests (to ``path``, with ``method``, or any) have arrived."""

        def count() -> int:
            return sum(
                1
                for r in self.requests
                if (path is None or r.path == path)
                and (method is None or r.method == method.upper())
            )

        with self._arrived:
            if not self._arrived.wait_for(lambda: count() >= n, timeout):
                seen = [f"{r.method} {r.path}" for r in self.requests]
                raise AssertionError(
                    f"fake GitHub got {count()} matching requests in {timeout}s, "
                    f"expected {n}: {seen}"
                )

    def open_pulls(self, head: str | None = None) -> list[dict[str, Any]]:
        """The open pull requests (from ``owner:branch`` or ``branch``, if given)."""
        label = self._head_label(head) if head is not None else None
        with self._lock:
            return [
                p
                for p in self.pulls.values()
                if p["state"] == "open" and (label is None or p["head"]["label"] == label)
            ]

    def labels_of(self, number: int) -> list[str]:
        with self._lock:
            return [label["name"] for label in self.pulls[number]["labels"]]

    def problems(self) -> list[str]:
        """What the fixture fails a test for: requests the fake does not implement, errors
        inside the fake."""
        with self._lock:
            gaps = [f"{r.method} {r.path}: not implemented by the fake" for r in self.unimplemented]
            return gaps + self.errors

    # -- serving (called on handler threads) ---------------------------------------------

    def _handle(self, h: _Handler, stopping: threading.Event) -> None:
        raw = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        if stopping.is_set():
            h.close_connection = True
            return
        parts = urlsplit(h.path)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        headers = {k.lower(): v for k, v in h.headers.items()}
        if "authorization" in headers:
            scheme = headers["authorization"].split(" ", 1)[0]
            headers["authorization"] = f"{scheme} {MASK}"
        path = parts.path
        inside = path == API_PREFIX or path.startswith(API_PREFIX + "/")
        req = Request(
            h.command,
            (path.removeprefix(API_PREFIX) or "/") if inside else path,
            dict(parse_qsl(parts.query)),
            headers,
            body,
        )
        with self._lock:
            self.requests.append(req)
            self._arrived.notify_all()
            authorization = h.headers.get("Authorization")
            reply = self._answer(req, authorization, inside)
            data = json.dumps(reply.body).encode()  # under the lock: the state as answered
            if req.method == "GET" and reply.status == 200:
                reply, data = self._conditional(req, reply, data)
            req.status = reply.status
            headers = self._headers(reply)
            if self.scopes is not None and self._authenticated(authorization):
                headers["X-OAuth-Scopes"] = self.scopes
        h.send_github(reply.status, data, headers)

    def _authenticated(self, authorization: str | None) -> bool:
        scheme, _, given = (authorization or "").partition(" ")
        return scheme.lower() in ("token", "bearer") and given == self.token

    def _answer(self, req: Request, authorization: str | None, inside: bool) -> _Reply:
        """Called with the lock held."""
        fault = next((f for f in self._faults if f.matches(req.method, req.path)), None)
        if fault is not None:
            fault.times -= 1
            if fault.times <= 0:
                self._faults.remove(fault)
            return self._fault_reply(fault)
        if not authorization:
            return _error(401, NEEDS_AUTH)
        if not self._authenticated(authorization):
            return _error(401, BAD_CREDENTIALS)
        self._used += 1
        route = self._route(req.method, req.path) if inside else None
        if route is None:
            self.unimplemented.append(req)
            return _error(404, NOT_FOUND)
        handler, match = route
        if match.groupdict().get("owner") is not None and not self._is_our_repo(match):
            return _error(404, NOT_FOUND)
        if req.body is not None and not isinstance(req.body, dict | list):
            return _error(400, "Problems parsing JSON")
        try:
            return handler(req, match)
        except Exception as e:
            self.errors.append(f"fake GitHub raised {e!r} for {req.method} {req.path}")
            return _error(500, f"fake: {e!r}")

    def _conditional(self, req: Request, reply: _Reply, data: bytes) -> tuple[_Reply, bytes]:
        """GitHub's conditional requests: a 200 to a GET carries an ``ETag``; the same GET with
        ``If-None-Match`` naming it is answered 304 Not Modified without a body, and a 304 does
        not count against the rate limit. Called with the lock held."""
        etag = f'W/"{hashlib.sha1(data).hexdigest()}"'
        if etag in {tag.strip() for tag in req.headers.get("if-none-match", "").split(",")}:
            self._used -= 1
            return _Reply(304, None, {"ETag": etag}), b""
        return _Reply(reply.status, reply.body, reply.headers | {"ETag": etag}), data

    def _fault_reply(self, fault: _Fault) -> _Reply:
        if fault.retry_after is not None:
            headers = {"Retry-After": str(fault.retry_after)}
            return _error(fault.status, fault.message, RATE_DOCS, headers)
        if fault.reset_in is not None:
            reset = int(time.time() + fault.reset_in + 0.999)
            headers = {
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Used": str(RATE_LIMIT),
                "X-RateLimit-Reset": str(reset),
            }
            return _error(fault.status, fault.message, RATE_DOCS, headers)
        return _error(fault.status, fault.message)

    def _headers(self, reply: _Reply) -> dict[str, str]:
        headers = {
            "X-GitHub-Media-Type": "github.v3; format=json",
            "X-GitHub-Request-Id": f"FAKE:{len(self.requests):06d}",
            "X-RateLimit-Limit": str(RATE_LIMIT),
            "X-RateLimit-Remaining": str(max(RATE_LIMIT - self._used, 0)),
            "X-RateLimit-Reset": str(int(time.time()) + 3600),
            "X-RateLimit-Used": str(self._used),
            "X-RateLimit-Resource": "core",
        }
        if reply.status == 401:  # GitHub sends no rate limit headers without a user
            headers = {k: v for k, v in headers.items() if not k.startswith("X-RateLimit")}
        return headers | reply.headers

    # -- routes ----------------------------------------------------------------------------

    def _route(
        self, method: str, path: str
    ) -> tuple[Callable[[Request, re.Match[str]], _Reply], re.Match[str]] | None:
        repo = r"/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)"
        routes: list[tuple[str, str, Callable[[Request, re.Match[str]], _Reply]]] = [
            ("GET", r"/rate_limit", self._get_rate_limit),
            ("GET", r"/user", self._get_user),
            ("GET", repo, self._get_repo),
            ("GET", repo + r"/pulls", self._list_pulls),
            ("POST", repo + r"/pulls", self._create_pull),
            ("GET", repo + r"/pulls/(?P<number>\d+)", self._get_pull),
            ("PATCH", repo + r"/pulls/(?P<number>\d+)", self._edit_pull),
            ("GET", repo + r"/issues/(?P<number>\d+)", self._get_issue),
            ("GET", repo + r"/issues/(?P<number>\d+)/labels", self._get_labels),
            ("POST", repo + r"/issues/(?P<number>\d+)/labels", self._add_labels),
            ("GET", repo + r"/issues/(?P<number>\d+)/comments", self._get_comments),
            ("POST", repo + r"/issues/(?P<number>\d+)/comments", self._add_comment),
            ("GET", repo + r"/pulls/(?P<number>\d+)/comments", self._get_review_comments),
            ("GET", repo + r"/issues/comments/(?P<comment_id>\d+)", self._get_comment),
            ("GET", repo + r"/pulls/comments/(?P<comment_id>\d+)", self._get_review_comment),
            (
                "POST",
                repo + r"/pulls/(?P<number>\d+)/comments/(?P<comment_id>\d+)/replies",
                self._reply_to_review_comment,
            ),
            ("GET", repo + r"/pulls/(?P<number>\d+)/reviews", self._get_reviews),
            (
                "POST",
                repo + r"/issues/comments/(?P<comment_id>\d+)/reactions",
                self._react_to_comment,
            ),
            (
                "POST",
                repo + r"/pulls/comments/(?P<comment_id>\d+)/reactions",
                self._react_to_review_comment,
            ),
            (
                "GET",
                repo + r"/collaborators/(?P<username>[^/]+)/permission",
                self._get_permission,
            ),
        ]
        for verb, pattern, handler in routes:
            if verb == method and (match := re.fullmatch(pattern, path)):
                return handler, match
        return None

    def _is_our_repo(self, match: re.Match[str]) -> bool:
        """GitHub matches owner and repository names case-insensitively."""
        return (match["owner"].lower(), match["repo"].lower()) == (
            self.owner.lower(),
            self.name.lower(),
        )

    def _get_rate_limit(self, req: Request, match: re.Match[str]) -> _Reply:
        reset = int(time.time()) + 3600
        core = {
            "limit": RATE_LIMIT,
            "used": self._used,
            "remaining": RATE_LIMIT - self._used,
            "reset": reset,
        }
        other = {"limit": 30, "used": 0, "remaining": 30, "reset": reset}
        graphql = {"limit": RATE_LIMIT, "used": 0, "remaining": RATE_LIMIT, "reset": reset}
        return _Reply(
            200,
            {"resources": {"core": core, "search": other, "graphql": graphql}, "rate": core},
        )

    def _get_user(self, req: Request, match: re.Match[str]) -> _Reply:
        return _Reply(200, self._user(self.login) | {"name": "ticketd", "email": None})

    def _get_repo(self, req: Request, match: re.Match[str]) -> _Reply:
        return _Reply(200, self._repo(self.owner))

    def _list_pulls(self, req: Request, match: re.Match[str]) -> _Reply:
        state = req.query.get("state", "open")
        if state not in ("open", "closed", "all"):
            return _invalid("PullRequest", "invalid", "state")
        head = req.query.get("head")
        # GitHub filters by head only as "owner:branch"; a bare branch name is ignored.
        label = head if head and ":" in head else None
        base = req.query.get("base")
        pulls = [
            p
            for p in self.pulls.values()
            if state in ("all", p["state"])
            and (label is None or p["head"]["label"] == label)
            and (base is None or p["base"]["ref"] == base)
        ]
        descending = req.query.get("direction", "desc") == "desc"
        pulls.sort(key=lambda p: p["number"], reverse=descending)
        listed = [{k: v for k, v in p.items() if k not in _FULL_ONLY} for p in pulls]
        return self._page(req, listed)

    def _create_pull(self, req: Request, match: re.Match[str]) -> _Reply:
        if not isinstance(req.body, dict):
            return _error(400, "Problems parsing JSON")
        for name in ("head", "base"):
            if not isinstance(req.body.get(name), str) or not req.body[name]:
                return _invalid("PullRequest", "missing_field", name)
        if "issue" not in req.body and not req.body.get("title"):
            return _invalid("PullRequest", "missing_field", "title")
        head_label, base = self._head_label(req.body["head"]), req.body["base"]
        if head_label == f"{self.owner}:{base}":
            message = f"No commits between {base} and {base}"
            return _invalid("PullRequest", "custom", message=message)
        for pull in self.pulls.values():
            same = pull["head"]["label"] == head_label and pull["base"]["ref"] == base
            if same and pull["state"] == "open":
                return _invalid("PullRequest", "custom", message=already_exists(head_label))
        pull = self._new_pull(
            req.body["head"],
            base,
            req.body.get("title") or "",
            req.body.get("body"),
            bool(req.body.get("draft", False)),
            maintainer_can_modify=bool(req.body.get("maintainer_can_modify", True)),
        )
        return _Reply(201, pull, {"Location": pull["url"]})

    def _pull_or_404(self, match: re.Match[str]) -> dict[str, Any] | None:
        return self.pulls.get(int(match["number"]))

    def _get_pull(self, req: Request, match: re.Match[str]) -> _Reply:
        pull = self._pull_or_404(match)
        return _Reply(200, pull) if pull is not None else _error(404, NOT_FOUND)

    def _edit_pull(self, req: Request, match: re.Match[str]) -> _Reply:
        pull = self._pull_or_404(match)
        if pull is None:
            return _error(404, NOT_FOUND)
        if not isinstance(req.body, dict):
            return _error(400, "Problems parsing JSON")
        state = req.body.get("state", pull["state"])
        if state not in ("open", "closed"):
            return _invalid("PullRequest", "invalid", "state")
        for key in ("title", "body", "maintainer_can_modify"):
            if key in req.body:
                pull[key] = req.body[key]
        if "base" in req.body:
            pull["base"] = self._part(self.owner, req.body["base"])
        if state != pull["state"]:
            pull["state"] = state
            pull["closed_at"] = _now() if state == "closed" else None
        pull["updated_at"] = _now()
        return _Reply(200, pull)

    def _get_issue(self, req: Request, match: re.Match[str]) -> _Reply:
        pull = self._pull_or_404(match)
        if pull is None:
            return _error(404, NOT_FOUND)
        issue_keys = ("id", "node_id", "number", "title", "user", "labels", "state", "locked")
        issue = {k: pull[k] for k in issue_keys} | {
            "url": pull["issue_url"],
            "repository_url": self._repo_url(),
            "labels_url": pull["issue_url"] + "/labels{/name}",
            "comments_url": pull["comments_url"],
            "events_url": pull["issue_url"] + "/events",
            "html_url": pull["html_url"],
            "assignee": None,
            "assignees": [],
            "milestone": None,
            "comments": pull["comments"],
            "created_at": pull["created_at"],
            "updated_at": pull["updated_at"],
            "closed_at": pull["closed_at"],
            "author_association": "MEMBER",
            "body": pull["body"],
            "draft": pull["draft"],
            "pull_request": {
                "url": pull["url"],
                "html_url": pull["html_url"],
                "diff_url": pull["diff_url"],
                "patch_url": pull["patch_url"],
                "merged_at": pull["merged_at"],
            },
        }
        return _Reply(200, issue)

    def _get_labels(self, req: Request, match: re.Match[str]) -> _Reply:
        pull = self._pull_or_404(match)
        return self._page(req, pull["labels"]) if pull is not None else _error(404, NOT_FOUND)

    def _add_labels(self, req: Request, match: re.Match[str]) -> _Reply:
        pull = self._pull_or_404(match)
        if pull is None:
            return _error(404, NOT_FOUND)
        given = req.body.get("labels") if isinstance(req.body, dict) else req.body
        names = [g.get("name") if isinstance(g, dict) else g for g in given or []]
        if not names or not all(isinstance(n, str) and n for n in names):
            return _invalid("Label", "invalid", "labels")
        have = {label["name"] for label in pull["labels"]}
        for name in names:
            if name not in have:
                pull["labels"].append(self._label(str(name)))  # each checked a str above
                have.add(name)
        pull["updated_at"] = _now()
        return _Reply(200, pull["labels"])

    def _get_comments(self, req: Request, match: re.Match[str]) -> _Reply:
        pull = self._pull_or_404(match)
        if pull is None:
            return _error(404, NOT_FOUND)
        return self._listed(req, self.comments.get(pull["number"], []))

    def _add_comment(self, req: Request, match: re.Match[str]) -> _Reply:
        pull = self._pull_or_404(match)
        if pull is None:
            return _error(404, NOT_FOUND)
        text = req.get("body")
        if not isinstance(text, str) or not text:
            return _invalid("IssueComment", "missing_field", "body")
        comment = self._new_comment(pull, text, self.login, _now())
        return _Reply(201, comment, {"Location": comment["url"]})

    def _get_comment(self, req: Request, match: re.Match[str]) -> _Reply:
        """PyGithub fetches a listed comment (or, below, review comment) again for an attribute
        the list left out, such as a thread's first comment's ``in_reply_to_id``."""
        found = self._find(self.comments, int(match["comment_id"]))
        return _Reply(200, found[1]) if found is not None else _error(404, NOT_FOUND)

    def _get_review_comment(self, req: Request, match: re.Match[str]) -> _Reply:
        found = self._find(self.review_comments, int(match["comment_id"]))
        return _Reply(200, found[1]) if found is not None else _error(404, NOT_FOUND)

    def _get_review_comments(self, req: Request, match: re.Match[str]) -> _Reply:
        pull = self._pull_or_404(match)
        if pull is None:
            return _error(404, NOT_FOUND)
        return self._listed(req, self.review_comments.get(pull["number"], []))

    def _reply_to_review_comment(self, req: Request, match: re.Match[str]) -> _Reply:
        """GitHub files a reply under the first comment of the thread, on its line."""
        pull = self._pull_or_404(match)
        root = self._thread_root(pull, int(match["comment_id"])) if pull is not None else None
        if pull is None or root is None:
            return _error(404, NOT_FOUND)
        text = req.get("body")
        if not isinstance(text, str) or not text:
            return _invalid("PullRequestReviewComment", "missing_field", "body", docs=REPLY_DOCS)
        comment = self._new_review_comment(pull, text, self.login, _now(), root)
        return _Reply(201, comment, {"Location": comment["url"]})

    def _get_reviews(self, req: Request, match: re.Match[str]) -> _Reply:
        pull = self._pull_or_404(match)
        if pull is None:
            return _error(404, NOT_FOUND)
        return self._page(req, self.reviews.get(pull["number"], []))

    def _react_to_comment(self, req: Request, match: re.Match[str]) -> _Reply:
        return self._react(req, match, self.comments)

    def _react_to_review_comment(self, req: Request, match: re.Match[str]) -> _Reply:
        return self._react(req, match, self.review_comments)

    def _react(
        self, req: Request, match: re.Match[str], store: dict[int, list[dict[str, Any]]]
    ) -> _Reply:
        """GitHub keeps one reaction of each content per user: a second one is answered 200
        with the first, a new one 201."""
        cid = int(match["comment_id"])
        if self._find(store, cid) is None:
            return _error(404, NOT_FOUND)
        content = req.get("content")
        if content not in REACTIONS:
            return _invalid("Reaction", "invalid", "content", docs=REACTIONS_DOCS)
        reactions = self.reactions.setdefault(cid, [])
        for reaction in reactions:
            if (reaction["user"]["login"], reaction["content"]) == (self.login, content):
                return _Reply(200, reaction)
        rid = next(self._ids)
        reaction = {
            "id": rid,
            "node_id": _node_id("REA", rid),
            "user": self._user(self.login),
            "content": content,
            "created_at": _now(),
        }
        reactions.append(reaction)
        return _Reply(201, reaction)

    def _get_permission(self, req: Request, match: re.Match[str]) -> _Reply:
        login = unquote(match["username"])
        role = self.permissions.get(login, "none")
        user = self._user(login) | {"permissions": _role_permissions(role), "role_name": role}
        return _Reply(200, {"permission": ROLES[role], "role_name": role, "user": user})

    def _listed(self, req: Request, items: list[dict[str, Any]]) -> _Reply:
        """One page of ``items``, only those updated at or after ``since`` if it is given, as
        GitHub lists comments."""
        since = req.query.get("since")
        if since is not None:
            try:
                since = _stamp(datetime.fromisoformat(since))
            except ValueError:
                return _error(422, VALIDATION_FAILED)
            items = [item for item in items if item["updated_at"] >= since]
        return self._page(req, items)

    def _page(self, req: Request, items: list[dict[str, Any]]) -> _Reply:
        """One page of ``items`` as GitHub pages lists: ``per_page`` (30, at most 100),
        ``page`` from 1, a ``Link`` header with ``next`` and ``last`` while more follow."""
        try:
            per_page = min(max(int(req.query.get("per_page", 30)), 1), 100)
            page = max(int(req.query.get("page", 1)), 1)
        except ValueError:
            per_page, page = 30, 1
        last = max((len(items) + per_page - 1) // per_page, 1)
        headers: dict[str, str] = {}
        if page < last:

            def link(n: int) -> str:
                query = urlencode(req.query | {"page": str(n), "per_page": str(per_page)})
                return f"<{self.url}{req.path}?{query}>"

            headers["Link"] = f'{link(page + 1)}; rel="next", {link(last)}; rel="last"'
        return _Reply(200, items[(page - 1) * per_page : page * per_page], headers)

    # -- JSON shapes -----------------------------------------------------------------------

    def _repo_url(self, owner: str | None = None) -> str:
        return f"{self.url}/repos/{owner or self.owner}/{self.name}"

    def _user(self, login: str, kind: str = "User") -> dict[str, Any]:
        uid = int(_sha(login)[:6], 16)
        return {
            "login": login,
            "id": uid,
            "node_id": _node_id("U", uid),
            "avatar_url": f"{self.web_url}/avatars/u/{uid}",
            "gravatar_id": "",
            "url": f"{self.url}/users/{login}",
            "html_url": f"{self.web_url}/{login}",
            "repos_url": f"{self.url}/users/{login}/repos",
            "type": kind,
            "user_view_type": "public",
            "site_admin": False,
        }

    def _repo(self, owner: str) -> dict[str, Any]:
        url, full_name = self._repo_url(owner), f"{owner}/{self.name}"
        rid = int(_sha(full_name)[:7], 16)
        host = f"127.0.0.1:{self.port}"
        return {
            "id": rid,
            "node_id": _node_id("R", rid),
            "name": self.name,
            "full_name": full_name,
            "private": True,
            "visibility": "private",
            "owner": self._user(owner, "Organization" if owner == self.owner else "User"),
            "html_url": f"{self.web_url}/{full_name}",
            "description": None,
            "fork": owner != self.owner,
            "url": url,
            "pulls_url": url + "/pulls{/number}",
            "issues_url": url + "/issues{/number}",
            "labels_url": url + "/labels{/name}",
            "branches_url": url + "/branches{/branch}",
            "git_url": f"git://{host}/{full_name}.git",
            "ssh_url": f"git@{host}:{full_name}.git",
            "clone_url": f"{self.web_url}/{full_name}.git",
            "created_at": "2024-01-01T00:00:00Z",
            "updated_at": _now(),
            "pushed_at": _now(),
            "default_branch": self.default_branch,
            "archived": False,
            "disabled": False,
            "has_issues": True,
            "has_projects": True,
            "has_wiki": False,
            "has_pages": False,
            "has_downloads": True,
            "has_discussions": False,
            "is_template": False,
            "open_issues_count": sum(p["state"] == "open" for p in self.pulls.values()),
            "forks_count": 0,
            "stargazers_count": 0,
            "watchers_count": 0,
            "size": 42,
            "language": "Python",
            "topics": [],
            "allow_merge_commit": True,
            "allow_squash_merge": True,
            "allow_rebase_merge": True,
            "allow_auto_merge": False,
            "delete_branch_on_merge": False,
            "permissions": {
                "admin": False,
                "maintain": False,
                "push": self.push,
                "triage": True,
                "pull": True,
            },
        }

    def _head_label(self, head: str) -> str:
        return head if ":" in head else f"{self.owner}:{head}"

    def _part(self, owner: str, ref: str) -> dict[str, Any]:
        """The ``head`` or ``base`` of a pull request."""
        repo = self._repo(owner)
        return {
            "label": f"{owner}:{ref}",
            "ref": ref,
            "sha": _sha(f"{owner}/{self.name}:{ref}"),
            "user": repo["owner"],
            "repo": repo,
        }

    def _label(self, name: str) -> dict[str, Any]:
        lid = self._label_ids.setdefault(name, next(self._ids))
        return {
            "id": lid,
            "node_id": _node_id("LA", lid),
            "url": f"{self._repo_url()}/labels/{name}",
            "name": name,
            "color": _sha(name)[:6],
            "default": False,
            "description": None,
        }

    def _new_pull(
        self,
        head: str,
        base: str,
        title: str,
        body: str | None,
        draft: bool,
        *,
        maintainer_can_modify: bool = True,
    ) -> dict[str, Any]:
        """Called with the lock held."""
        number = max(self.pulls, default=0) + 1
        pid, now = next(self._ids), _now()
        owner, _, ref = self._head_label(head).partition(":")
        url, repo_url = f"{self._repo_url()}/pulls/{number}", self._repo_url()
        html_url = f"{self.web_url}/{self.full_name}/pull/{number}"
        issue_url = f"{repo_url}/issues/{number}"
        pull: dict[str, Any] = {
            "url": url,
            "id": pid,
            "node_id": _node_id("PR", pid),
            "html_url": html_url,
            "diff_url": html_url + ".diff",
            "patch_url": html_url + ".patch",
            "issue_url": issue_url,
            "commits_url": url + "/commits",
            "review_comments_url": url + "/comments",
            "review_comment_url": repo_url + "/pulls/comments{/number}",
            "comments_url": issue_url + "/comments",
            "statuses_url": f"{repo_url}/statuses/{_sha(f'{owner}/{self.name}:{ref}')}",
            "number": number,
            "state": "open",
            "locked": False,
            "title": title,
            "user": self._user(self.login),
            "body": body,
            "labels": [],
            "milestone": None,
            "active_lock_reason": None,
            "created_at": now,
            "updated_at": now,
            "closed_at": None,
            "merged_at": None,
            "merge_commit_sha": None,
            "assignee": None,
            "assignees": [],
            "requested_reviewers": [],
            "requested_teams": [],
            "head": self._part(owner, ref),
            "base": self._part(self.owner, base),
            "_links": {
                "self": {"href": url},
                "html": {"href": html_url},
                "issue": {"href": issue_url},
                "comments": {"href": issue_url + "/comments"},
                "review_comments": {"href": url + "/comments"},
                "commits": {"href": url + "/commits"},
                "statuses": {"href": f"{repo_url}/statuses/{_sha(ref)}"},
            },
            "author_association": "MEMBER",
            "auto_merge": None,
            "draft": draft,
            "merged": False,
            "mergeable": None,
            "rebaseable": None,
            "mergeable_state": "unknown",
            "merged_by": None,
            "comments": 0,
            "review_comments": 0,
            "maintainer_can_modify": maintainer_can_modify,
            "commits": 1,
            "additions": 1,
            "deletions": 0,
            "changed_files": 1,
        }
        self.pulls[number] = pull
        return pull

    def _open_pull(self, number: int) -> dict[str, Any]:
        pull = self.pulls[number]
        if pull["state"] != "open":
            raise ValueError(f"pull request #{number} is already {pull['state']}")
        return pull

    def _touch(self, pull: dict[str, Any], stamp: str) -> None:
        """A pull request is updated when its conversation is (never back in time)."""
        pull["updated_at"] = max(pull["updated_at"], stamp)

    def _association(self, login: str) -> str:
        """``author_association``: the token's user is a member of the organization, anyone
        with a role on the repository a collaborator."""
        if login == self.login:
            return "MEMBER"
        return "COLLABORATOR" if self.permissions.get(login, "none") != "none" else "NONE"

    @staticmethod
    def _find(
        store: dict[int, list[dict[str, Any]]], cid: int
    ) -> tuple[int, dict[str, Any]] | None:
        """The pull request number and the comment with id ``cid`` in ``store``, or None."""
        return next(((n, c) for n, cs in store.items() for c in cs if c["id"] == cid), None)

    def _thread_root(self, pull: dict[str, Any], cid: int) -> dict[str, Any] | None:
        """The first comment of the thread review comment ``cid`` is in, if it is on ``pull``."""
        on_pull = {c["id"]: c for c in self.review_comments.get(pull["number"], [])}
        comment = on_pull.get(cid)
        if comment is None or "in_reply_to_id" not in comment:
            return comment
        return on_pull[comment["in_reply_to_id"]]

    def _new_comment(
        self, pull: dict[str, Any], body: str, login: str, stamp: str
    ) -> dict[str, Any]:
        """Called with the lock held."""
        cid = next(self._ids)
        comment = {
            "id": cid,
            "node_id": _node_id("IC", cid),
            "url": f"{self._repo_url()}/issues/comments/{cid}",
            "html_url": f"{pull['html_url']}#issuecomment-{cid}",
            "issue_url": pull["issue_url"],
            "body": body,
            "user": self._user(login),
            "created_at": stamp,
            "updated_at": stamp,
            "author_association": self._association(login),
        }
        self.comments.setdefault(pull["number"], []).append(comment)
        pull["comments"] += 1
        self._touch(pull, stamp)
        return comment

    def _new_review(
        self, pull: dict[str, Any], body: str, login: str, state: str, stamp: str
    ) -> dict[str, Any]:
        """Called with the lock held."""
        rid = next(self._ids)
        html_url = f"{pull['html_url']}#pullrequestreview-{rid}"
        review = {
            "id": rid,
            "node_id": _node_id("PRR", rid),
            "user": self._user(login),
            "body": body,
            "state": state,
            "html_url": html_url,
            "pull_request_url": pull["url"],
            "author_association": self._association(login),
            "_links": {"html": {"href": html_url}, "pull_request": {"href": pull["url"]}},
            "submitted_at": stamp,
            "commit_id": pull["head"]["sha"],
        }
        self.reviews.setdefault(pull["number"], []).append(review)
        self._touch(pull, stamp)
        return review

    def _new_review_comment(
        self,
        pull: dict[str, Any],
        body: str,
        login: str,
        stamp: str,
        thread: dict[str, Any],
        review_id: int | None = None,
    ) -> dict[str, Any]:
        """A comment on the diff: ``thread`` is the first comment of the thread it replies to,
        or the place (path, line, diff_hunk) of a new thread. Called with the lock held."""
        if review_id is None:  # GitHub makes a review of one comment
            review_id = self._new_review(pull, "", login, "COMMENTED", stamp)["id"]
        elif all(r["id"] != review_id for r in self.reviews.get(pull["number"], [])):
            raise KeyError(f"no review {review_id} on #{pull['number']}")
        cid = next(self._ids)
        url = f"{self._repo_url()}/pulls/comments/{cid}"
        html_url = f"{pull['html_url']}#discussion_r{cid}"
        position = max(len(thread["diff_hunk"].splitlines()) - 1, 1)  # lines below the "@@"
        reply = {"in_reply_to_id": thread["id"]} if "id" in thread else {}
        comment = {
            "url": url,
            "pull_request_review_id": review_id,
            "id": cid,
            "node_id": _node_id("PRRC", cid),
            "diff_hunk": thread["diff_hunk"],
            "path": thread["path"],
            "position": position,
            "original_position": position,
            "commit_id": pull["head"]["sha"],
            "original_commit_id": pull["head"]["sha"],
            **reply,
            "user": self._user(login),
            "body": body,
            "created_at": stamp,
            "updated_at": stamp,
            "html_url": html_url,
            "pull_request_url": pull["url"],
            "author_association": self._association(login),
            "_links": {
                "self": {"href": url},
                "html": {"href": html_url},
                "pull_request": {"href": pull["url"]},
            },
            "start_line": None,
            "original_start_line": None,
            "start_side": None,
            "line": thread["line"],
            "original_line": thread["line"],
            "side": "RIGHT",
            "subject_type": "line",
        }
        self.review_comments.setdefault(pull["number"], []).append(comment)
        pull["review_comments"] += 1
        self._touch(pull, stamp)
        return comment


@pytest.fixture(name="fake_github")  # named, so it may be imported under another name
def fake_github() -> Iterator[FakeGitHub]:
    """A running ``FakeGitHub`` with ``acme/widgets`` and token ``t0k3n``; stopped after the
    test, which fails if a request hit an endpoint the fake does not implement or the fake
    itself broke."""
    with FakeGitHub("acme/widgets", token="t0k3n") as fake:
        yield fake
    if problems := fake.problems():
        pytest.fail("fake GitHub: " + "; ".join(problems), pytrace=False)
