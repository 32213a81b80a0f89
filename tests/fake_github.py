"""A fake GitHub REST API (v3) that the real PyGithub client talks to unchanged.

It is a real HTTP/1.1 server on 127.0.0.1 that answers as GitHub Enterprise Server does, under
``/api/v3``, so a client is pointed at it the way it is pointed at an Enterprise host::

    github.Github(base_url=fake.url, auth=github.Auth.Token("t0k3n"), retry=None)

It keeps one repository (``acme/widgets`` by default) with its pull requests, their labels and
comments, and answers with GitHub's JSON shapes, status codes and headers: 201 and ``Location``
on create, 422 ``Validation Failed`` for a second open pull request from the same head into the
same base, 401 ``Bad credentials`` for a wrong token, ``X-RateLimit-*`` on every answer,
``Link`` pagination, and the token's kind: a classic token's ``X-OAuth-Scopes`` on every
authenticated answer (``scopes="repo"``), or none for a fine-grained token (``scopes=None``),
whose push access shows in the repository's ``permissions.push`` (``push=``). Each test scripts
the trouble it needs::

    fake.fail(502, "Server Error", method="POST", path_contains="/pulls")  # next such request
    fake.rate_limit(retry_after=2, status=429)  # a secondary limit with Retry-After, then normal
    fake.rate_limit(retry_after=None)           # a primary limit: Remaining 0 until Reset
    fake.add_pull("feature", title="Left from the last run")  # state as if created earlier

and inspects what arrived: ``requests`` (method, path under the API root, query, headers with the
token masked, parsed JSON body, status answered), ``pulls`` (number -> the pull request's JSON),
``comments`` (number -> its comments). A request for anything the fake does not implement is
answered 404 and listed in ``unimplemented``; the ``fake_github`` fixture fails the test at
teardown for it, so a gap in the fake is never mistaken for GitHub's answer.

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
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
from fakehttp import FakeServer, Handler

API_PREFIX = "/api/v3"  # where GitHub Enterprise Server serves the REST API
DOCS = "https://docs.github.com/rest"
RATE_DOCS = "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api"
CREATE_PULL_DOCS = "https://docs.github.com/rest/pulls/pulls#create-a-pull-request"
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
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _node_id(kind: str, number: int) -> str:
    return f"{kind}_kwDO{number:08d}"


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


def _invalid(resource: str, code: str, field_: str | None = None, message: str = "") -> _Reply:
    error: dict[str, Any] = {"resource": resource, "code": code}
    if field_ is not None:
        error["field"] = field_
    if message:
        error["message"] = message
    return _error(422, VALIDATION_FAILED, CREATE_PULL_DOCS, errors=[error])


class _Handler(Handler):
    do_PATCH = do_PUT = Handler._dispatch

    def send_github(self, status: int, obj: Any, headers: dict[str, str]) -> None:
        self.send(status, json.dumps(obj).encode(), "application/json; charset=utf-8", headers)


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
        self.comments: dict[int, list[dict[str, Any]]] = {}
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
    ) -> dict[str, Any]:
        """Put a pull request in place as if it had been created earlier (by an earlier run,
        or by hand); ``head`` is ``branch`` or ``owner:branch``. Returns its JSON."""
        with self._lock:
            pull = self._new_pull(head, base or self.default_branch, title, body, draft)
            if state == "closed":
                pull["state"], pull["closed_at"] = "closed", _now()
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
            req.status = reply.status
            headers = self._headers(reply)
            if self.scopes is not None and self._authenticated(authorization):
                headers["X-OAuth-Scopes"] = self.scopes
        h.send_github(reply.status, reply.body, headers)

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
                "merged_at": None,
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
        return self._page(req, self.comments.get(pull["number"], []))

    def _add_comment(self, req: Request, match: re.Match[str]) -> _Reply:
        pull = self._pull_or_404(match)
        if pull is None:
            return _error(404, NOT_FOUND)
        text = req.get("body")
        if not isinstance(text, str) or not text:
            return _invalid("IssueComment", "missing_field", "body")
        cid, now = next(self._ids), _now()
        comment = {
            "id": cid,
            "node_id": _node_id("IC", cid),
            "url": f"{self._repo_url()}/issues/comments/{cid}",
            "html_url": f"{pull['html_url']}#issuecomment-{cid}",
            "issue_url": pull["issue_url"],
            "body": text,
            "user": self._user(self.login),
            "created_at": now,
            "updated_at": now,
            "author_association": "MEMBER",
        }
        self.comments.setdefault(pull["number"], []).append(comment)
        pull["comments"] += 1
        return _Reply(201, comment, {"Location": comment["url"]})

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


@pytest.fixture(name="fake_github")  # named, so it may be imported under another name
def fake_github() -> Iterator[FakeGitHub]:
    """A running ``FakeGitHub`` with ``acme/widgets`` and token ``t0k3n``; stopped after the
    test, which fails if a request hit an endpoint the fake does not implement or the fake
    itself broke."""
    with FakeGitHub("acme/widgets", token="t0k3n") as fake:
        yield fake
    if problems := fake.problems():
        pytest.fail("fake GitHub: " + "; ".join(problems), pytrace=False)
