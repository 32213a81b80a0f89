"""The fake GitHub, driven by the real PyGithub (and httpx where PyGithub hides the wire).

These tests also pin what PyGithub does with each answer: which exception it raises for a
duplicate pull request, bad credentials, a server error and a rate limit, what its default
retry does by itself, and what ``update()`` makes of a 304. No test sleeps: where PyGithub's
retry would wait, a ``GithubRetry`` that records the wait instead of sleeping it stands in for
the default one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import github
import httpx
import pytest
import requests
from fake_github import (
    API_PREFIX,
    BAD_CREDENTIALS,
    NEEDS_AUTH,
    PRIMARY_LIMIT,
    SECONDARY_LIMIT,
    FakeGitHub,
    already_exists,
)
from fake_github import fake_github as fake_github_fixture  # noqa: F401
from urllib3 import Retry

REPO = "acme/widgets"
PULLS = "/repos/acme/widgets/pulls"
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)  # for scripted times (``at=``)

Connect = Callable[..., github.Github]


@pytest.fixture
def connect(fake_github: FakeGitHub) -> Iterator[Connect]:
    """Make PyGithub clients for the fake, as ticketd would for GitHub Enterprise, and close
    them after the test. No retries unless asked, and none of PyGithub's own pauses between
    requests (0.25 s, and 1 s between writes, by default)."""
    clients: list[github.Github] = []

    def make(token: str | None = "t0k3n", **kwargs: Any) -> github.Github:
        kwargs.setdefault("retry", None)
        kwargs.setdefault("seconds_between_requests", None)
        kwargs.setdefault("seconds_between_writes", None)
        auth = github.Auth.Token(token) if token is not None else None
        client = github.Github(base_url=fake_github.url, auth=auth, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def repo(connect: Connect) -> Any:
    return connect().get_repo(REPO)


def no_sleep_retry() -> tuple[github.GithubRetry, list[float]]:
    """PyGithub's default retry (``GithubRetry()``, what ``Github()`` uses) that records each
    wait it would sleep instead of sleeping it; urllib3 calls these two hooks to wait."""
    waits: list[float] = []

    class NoSleepRetry(github.GithubRetry):
        def sleep_for_retry(self, response: Any) -> bool:
            seconds = self.get_retry_after(response)
            if seconds:
                waits.append(seconds)
                return True
            return False

        def _sleep_backoff(self) -> None:
            seconds = self.get_backoff_time()
            if seconds > 0:
                waits.append(seconds)

    return NoSleepRetry(), waits


def statuses(fake: FakeGitHub, since: int = 0) -> list[tuple[str, str, int | None]]:
    return [(r.method, r.path, r.status) for r in fake.requests[since:]]


# -- the happy path ----------------------------------------------------------------------------


def test_base_url_is_the_enterprise_api_root(fake_github: FakeGitHub, connect: Connect) -> None:
    assert fake_github.url == f"http://127.0.0.1:{fake_github.port}/api/v3"

    repo = connect().get_repo(REPO)

    assert (repo.full_name, repo.name, repo.owner.login) == (REPO, "widgets", "acme")
    assert repo.default_branch == "main"
    assert repo.url == f"{fake_github.url}/repos/{REPO}"
    assert repo.html_url == f"{fake_github.web_url}/{REPO}"
    (req,) = fake_github.requests
    assert (req.method, req.path, req.status) == ("GET", f"/repos/{REPO}", 200)
    assert req.headers["authorization"] == "token ***"  # the token itself is never recorded
    assert req.headers["user-agent"] == "PyGithub/Python"


def test_no_open_pull_for_a_new_branch(fake_github: FakeGitHub, repo: Any) -> None:
    assert list(repo.get_pulls(state="open", head="acme:feature", base="main")) == []

    (req,) = fake_github.requests_to(PULLS, "GET")
    assert req.query == {"state": "open", "head": "acme:feature", "base": "main"}


def test_create_a_pull_request(fake_github: FakeGitHub, repo: Any) -> None:
    pr = repo.create_pull(title="Fix parse()", body="Closes task-1.", head="feature", base="main")

    assert (pr.number, pr.state, pr.draft, pr.title, pr.body) == (
        1,
        "open",
        False,
        "Fix parse()",
        "Closes task-1.",
    )
    assert (pr.head.ref, pr.head.label, pr.head.repo.full_name) == ("feature", "acme:feature", REPO)
    assert (pr.base.ref, pr.base.repo.full_name) == ("main", REPO)
    assert pr.html_url == f"{fake_github.web_url}/{REPO}/pull/1"
    assert pr.user.login == "ticketd-bot"
    (req,) = fake_github.requests_to(PULLS, "POST")
    assert req.status == 201
    assert req.body == {
        "title": "Fix parse()",
        "body": "Closes task-1.",
        "head": "feature",
        "base": "main",
    }
    assert fake_github.pulls[1]["head"]["label"] == "acme:feature"
    assert [p["number"] for p in fake_github.open_pulls("feature")] == [1]


def test_create_a_draft_pull_request(fake_github: FakeGitHub, repo: Any) -> None:
    pr = repo.create_pull(title="WIP", body="", head="acme:feature", base="main", draft=True)

    assert pr.draft is True
    assert fake_github.requests_to(PULLS, "POST")[0].body["draft"] is True
    assert fake_github.pulls[pr.number]["draft"] is True


def test_a_second_open_pull_from_the_same_head_is_422(fake_github: FakeGitHub, repo: Any) -> None:
    repo.create_pull(title="First", body="", head="feature", base="main")

    with pytest.raises(github.GithubException) as caught:
        repo.create_pull(title="Again", body="", head="feature", base="main")

    e = caught.value
    assert type(e) is github.GithubException  # no subclass for validation errors
    assert (e.status, e.message) == (422, "Validation Failed")
    assert e.data["errors"] == [
        {"resource": "PullRequest", "code": "custom", "message": already_exists("acme:feature")}
    ]
    assert len(fake_github.pulls) == 1


def test_a_closed_pull_does_not_block_a_new_one(fake_github: FakeGitHub, repo: Any) -> None:
    fake_github.add_pull("feature", title="Old", state="closed")

    pr = repo.create_pull(title="New", body="", head="feature", base="main")

    assert pr.number == 2 and fake_github.pulls[1]["state"] == "closed"


def test_create_validates_like_github(repo: Any) -> None:
    with pytest.raises(github.GithubException) as caught:
        repo.create_pull(title="", body="", head="feature", base="main")
    assert caught.value.status == 422
    assert caught.value.data["errors"][0]["field"] == "title"

    with pytest.raises(github.GithubException) as caught:
        repo.create_pull(title="Nothing", body="", head="main", base="main")
    assert caught.value.data["errors"][0]["message"] == "No commits between main and main"


def test_list_filters_by_head_base_and_state(fake_github: FakeGitHub, repo: Any) -> None:
    fake_github.add_pull("feature", title="open")
    fake_github.add_pull("feature", title="closed", state="closed")
    fake_github.add_pull("other", title="other")
    fake_github.add_pull("feature", base="release", title="to release")

    def titles(**kwargs: str) -> list[str]:
        return [p.title for p in repo.get_pulls(**kwargs)]

    assert titles(state="open", head="acme:feature") == ["to release", "open"]
    assert titles(state="open", head="acme:feature", base="main") == ["open"]
    assert titles(state="closed", head="acme:feature") == ["closed"]
    assert titles(state="all", head="acme:feature", direction="asc") == [
        "open",
        "closed",
        "to release",
    ]
    # As on GitHub, a head without "owner:" is ignored: every open pull request comes back.
    assert titles(state="open", head="feature") == ["to release", "other", "open"]


def test_lists_are_paged_with_link_headers(fake_github: FakeGitHub, connect: Connect) -> None:
    for i in range(5):
        fake_github.add_pull(f"branch-{i}")
    repo = connect(per_page=2).get_repo(REPO)

    assert [p.number for p in repo.get_pulls()] == [5, 4, 3, 2, 1]

    pages = [r.query.get("page") for r in fake_github.requests_to(PULLS)]
    assert pages == [None, "2", "3"]


def test_edit_a_pull_request(fake_github: FakeGitHub, repo: Any) -> None:
    pr = repo.create_pull(title="Old", body="old", head="feature", base="main")

    pr.edit(title="New", body="new body")
    assert (pr.title, pr.body, pr.state) == ("New", "new body", "open")
    pr.edit(state="closed")

    assert pr.state == "closed" and pr.closed_at is not None
    patches = fake_github.requests_to(f"{PULLS}/1", "PATCH")
    assert [r.body for r in patches] == [{"title": "New", "body": "new body"}, {"state": "closed"}]
    assert fake_github.pulls[1]["state"] == "closed"
    assert repo.get_pull(1).title == "New"


def test_add_labels(fake_github: FakeGitHub, repo: Any) -> None:
    pr = repo.create_pull(title="T", body="", head="feature", base="main")

    pr.add_to_labels("ticketd", "needs-review")
    pr.add_to_labels("ticketd")

    assert [label.name for label in pr.get_labels()] == ["ticketd", "needs-review"]
    assert fake_github.labels_of(1) == ["ticketd", "needs-review"]
    (first, _) = fake_github.requests_to(f"/repos/{REPO}/issues/1/labels", "POST")
    assert first.body == ["ticketd", "needs-review"]


def test_labels_may_also_come_as_an_object(fake_github: FakeGitHub) -> None:
    fake_github.add_pull("feature")
    with httpx.Client(base_url=fake_github.url, headers={"Authorization": "Bearer t0k3n"}) as c:
        response = c.post(f"/repos/{REPO}/issues/1/labels", json={"labels": ["bug"]})

    assert response.status_code == 200
    assert [label["name"] for label in response.json()] == ["bug"]
    assert response.headers["X-RateLimit-Limit"] == "5000"


def test_comment_on_a_pull_request(fake_github: FakeGitHub, repo: Any) -> None:
    pr = repo.create_pull(title="T", body="", head="feature", base="main")

    comment = pr.create_issue_comment("Agent finished in 42 s.")

    assert comment.body == "Agent finished in 42 s." and comment.user.login == "ticketd-bot"
    assert [c.body for c in pr.get_issue_comments()] == ["Agent finished in 42 s."]
    assert [c["body"] for c in fake_github.comments[1]] == ["Agent finished in 42 s."]
    (req,) = fake_github.requests_to(f"/repos/{REPO}/issues/1/comments", "POST")
    assert (req.status, req.body) == (201, {"body": "Agent finished in 42 s."})


def test_a_listed_pull_completes_itself_and_has_an_issue(
    fake_github: FakeGitHub, repo: Any
) -> None:
    fake_github.add_pull("feature", title="Seeded")
    (pr,) = repo.get_pulls(head="acme:feature")

    assert pr.mergeable_state == "unknown"  # not in a list: PyGithub fetches the pull request
    assert pr.as_issue().title == "Seeded"

    assert [r.path for r in fake_github.requests][-2:] == [f"{PULLS}/1", f"/repos/{REPO}/issues/1"]


def test_user_and_rate_limit(fake_github: FakeGitHub, connect: Connect) -> None:
    gh = connect()

    assert gh.get_user().login == "ticketd-bot"
    limits = gh.get_rate_limit()

    assert limits.resources.core.limit == 5000
    assert gh.rate_limiting == (5000 - 2, 5000)  # from the X-RateLimit headers


def test_another_repository_is_not_found(connect: Connect) -> None:
    with pytest.raises(github.UnknownObjectException):
        connect().get_repo("acme/gadgets")


# -- the review loop ---------------------------------------------------------------------------


def test_an_unchanged_pull_request_is_not_modified_and_costs_nothing(
    fake_github: FakeGitHub, connect: Connect
) -> None:
    gh = connect()
    fake_github.add_pull("feature")
    pr = gh.get_repo(REPO).get_pull(1)
    remaining, _ = gh.rate_limiting

    assert pr.update() is False

    assert gh.rate_limiting[0] == remaining  # a 304 does not count against the limit
    last = fake_github.requests[-1]
    assert (last.path, last.status, last.headers["if-none-match"]) == (f"{PULLS}/1", 304, pr.etag)

    fake_github.add_issue_comment(1, "Please rename it.")
    assert pr.update() is True
    assert pr.comments == 1 and gh.rate_limiting[0] == remaining - 1
    assert pr.update() is False


def test_a_304_has_no_body_and_the_connection_goes_on(fake_github: FakeGitHub) -> None:
    fake_github.add_pull("feature")
    headers = {"Authorization": "token t0k3n"}
    with httpx.Client(base_url=fake_github.url, headers=headers) as client:
        first = client.get(f"{PULLS}/1")
        etag = first.headers["ETag"]
        again = client.get(f"{PULLS}/1", headers={"If-None-Match": etag})
        listed = client.get(PULLS)  # on the same keep-alive connection

    assert etag.startswith('W/"') and first.status_code == 200
    assert (again.status_code, again.content, again.headers["ETag"]) == (304, b"", etag)
    assert "content-length" not in again.headers and "content-type" not in again.headers
    assert again.headers["X-RateLimit-Remaining"] == first.headers["X-RateLimit-Remaining"]
    assert listed.status_code == 200 and listed.headers["ETag"] != etag


def test_a_pull_request_changes_with_its_conversation(fake_github: FakeGitHub, repo: Any) -> None:
    fake_github.add_pull("feature", at=T0)
    pr = repo.get_pull(1)
    at = [T0 + timedelta(minutes=n) for n in range(1, 6)]

    comment = fake_github.add_issue_comment(1, "Rename it.", at=at[0])
    assert pr.update() and (pr.updated_at, pr.comments) == (at[0], 1)
    fake_github.add_review_comment(1, "Off by one?", at=at[1])
    assert pr.update() and (pr.updated_at, pr.review_comments) == (at[1], 1)
    fake_github.add_review(1, "Nearly.", state="CHANGES_REQUESTED", at=at[2])
    assert pr.update() and pr.updated_at == at[2]
    fake_github.edit_comment(comment["id"], "Rename it, please.", at=at[3])
    assert pr.update() and pr.updated_at == at[3]
    fake_github.close(1, at=at[4])
    assert pr.update() and (pr.state, pr.closed_at, pr.merged) == ("closed", at[4], False)
    assert pr.update() is False


def test_comments_by_others_and_edits(fake_github: FakeGitHub, repo: Any) -> None:
    fake_github.add_pull("feature", at=T0)
    fake_github.set_permission("alice", "write")
    mine = repo.get_pull(1).create_issue_comment("Agent finished.")
    theirs = fake_github.add_issue_comment(1, "Rename it.", at=T0 + timedelta(minutes=1))
    edited = T0 + timedelta(minutes=2)

    fake_github.edit_comment(theirs["id"], "Rename it, please.", at=edited)

    comments = list(repo.get_pull(1).get_issue_comments())
    assert [(c.user.login, c.body) for c in comments] == [
        ("ticketd-bot", "Agent finished."),
        ("alice", "Rename it, please."),
    ]
    assert [c.author_association for c in comments] == ["MEMBER", "COLLABORATOR"]
    assert (comments[1].created_at, comments[1].updated_at) == (T0 + timedelta(minutes=1), edited)
    assert comments[0].id == mine.id
    assert repo.get_pull(1).comments == 2
    with pytest.raises(KeyError):
        fake_github.edit_comment(999, "No such comment.")


def test_review_comments_and_a_reply_in_their_thread(fake_github: FakeGitHub, repo: Any) -> None:
    fake_github.add_pull("feature")
    first = fake_github.add_review_comment(1, "Off by one?", line=3)
    second = fake_github.add_review_comment(1, "Me too.", user="bob", in_reply_to=first["id"])
    pr = repo.get_pull(1)

    reply = pr.create_review_comment_reply(second["id"], "Fixed in the next push.")

    assert reply.in_reply_to_id == first["id"]  # the thread's first comment, as on GitHub
    assert (reply.user.login, reply.path, reply.line, reply.diff_hunk) == (
        "ticketd-bot",
        "app.py",
        3,
        first["diff_hunk"],
    )
    assert reply.commit_id == reply.original_commit_id == pr.head.sha
    comments = list(pr.get_review_comments())
    assert [(c.user.login, c.body, c.in_reply_to_id) for c in comments] == [
        ("alice", "Off by one?", None),  # PyGithub fetched the first one to learn that
        ("bob", "Me too.", first["id"]),
        ("ticketd-bot", "Fixed in the next push.", first["id"]),
    ]
    root = comments[0]
    assert root.html_url == f"{fake_github.web_url}/{REPO}/pull/1#discussion_r{first['id']}"
    assert (root.pull_request_url, root.side, root.subject_type) == (pr.url, "RIGHT", "line")
    assert (root.position, root.original_line, root.start_line) == (2, 3, None)
    assert len(fake_github.requests_to(f"{PULLS}/comments/{first['id']}", "GET")) == 1
    assert repo.get_pull(1).review_comments == 3
    (req,) = fake_github.requests_to(f"{PULLS}/1/comments/{second['id']}/replies", "POST")
    assert (req.status, req.body) == (201, {"body": "Fixed in the next push."})


def test_a_reply_to_a_comment_elsewhere_is_404_and_one_without_a_body_422(
    fake_github: FakeGitHub, repo: Any
) -> None:
    fake_github.add_pull("feature")
    fake_github.add_pull("other")
    elsewhere = fake_github.add_review_comment(2, "On the other one.")
    here = fake_github.add_review_comment(1, "Here.")
    pr = repo.get_pull(1)

    with pytest.raises(github.UnknownObjectException):
        pr.create_review_comment_reply(elsewhere["id"], "Wrong pull.")
    with pytest.raises(github.GithubException) as caught:
        pr.create_review_comment_reply(here["id"], "")

    assert (caught.value.status, caught.value.data["errors"][0]["field"]) == (422, "body")
    assert len(fake_github.review_comments[1]) == 1


def test_comments_since_a_time(fake_github: FakeGitHub, repo: Any) -> None:
    fake_github.add_pull("feature", at=T0)
    old = fake_github.add_review_comment(1, "Old.", at=T0)
    fake_github.add_review_comment(1, "New.", at=T0 + timedelta(hours=1))
    fake_github.edit_comment(old["id"], "Old, edited.", at=T0 + timedelta(hours=2))

    since = [c.body for c in repo.get_pull(1).get_review_comments(since=T0 + timedelta(hours=1))]

    assert since == ["Old, edited.", "New."]  # updated at or after, oldest first
    later = repo.get_pull(1).get_review_comments(since=T0 + timedelta(minutes=90))
    assert [c.body for c in later] == ["Old, edited."]


def test_reviews_are_listed_with_their_state(fake_github: FakeGitHub, repo: Any) -> None:
    fake_github.add_pull("feature")
    fake_github.add_review(1, "Please split it.", user="bob", state="CHANGES_REQUESTED")
    fake_github.add_review(1, "Looks good.", state="APPROVED", at=T0)
    comment = fake_github.add_review_comment(1, "Nit.")

    reviews = list(repo.get_pull(1).get_reviews())

    assert [(r.user.login, r.state, r.body) for r in reviews] == [
        ("bob", "CHANGES_REQUESTED", "Please split it."),
        ("alice", "APPROVED", "Looks good."),
        ("alice", "COMMENTED", ""),  # GitHub makes a review of a single inline comment
    ]
    changes, approval, single = reviews
    assert (approval.submitted_at, approval.commit_id) == (T0, fake_github.pulls[1]["head"]["sha"])
    assert single.id == comment["pull_request_review_id"]
    assert changes.html_url == f"{fake_github.web_url}/{REPO}/pull/1#pullrequestreview-{changes.id}"
    with pytest.raises(ValueError, match="PENDING"):
        fake_github.add_review(1, "Draft.", state="PENDING")


def test_reactions_on_comments_and_review_comments(fake_github: FakeGitHub, repo: Any) -> None:
    fake_github.add_pull("feature")
    fake_github.add_issue_comment(1, "Rename it.")
    fake_github.add_review_comment(1, "Off by one?")
    pr = repo.get_pull(1)
    (comment,) = pr.get_issue_comments()
    (review_comment,) = pr.get_review_comments()

    eyes = comment.create_reaction("eyes")
    again = comment.create_reaction("eyes")
    rocket = review_comment.create_reaction("rocket")
    with pytest.raises(github.GithubException) as caught:
        comment.create_reaction("thumbsup")

    assert (eyes.content, eyes.user.login, again.id) == ("eyes", "ticketd-bot", eyes.id)
    assert rocket.content == "rocket" and rocket.id != eyes.id
    assert (caught.value.status, caught.value.message) == (422, "Validation Failed")
    answered = [r.status for r in fake_github.requests if r.path.endswith("/reactions")]
    assert answered == [201, 200, 201, 422]
    assert [r["content"] for r in fake_github.reactions[comment.id]] == ["eyes"]
    assert [r["content"] for r in fake_github.reactions[review_comment.id]] == ["rocket"]


def test_a_reaction_to_an_unknown_comment_is_404(fake_github: FakeGitHub) -> None:
    headers = {"Authorization": "token t0k3n"}
    with httpx.Client(base_url=fake_github.url, headers=headers) as client:
        response = client.post(
            f"/repos/{REPO}/issues/comments/42/reactions", json={"content": "eyes"}
        )

    assert response.status_code == 404


def test_collaborator_permission(fake_github: FakeGitHub, repo: Any) -> None:
    fake_github.set_permission("alice", "write")
    fake_github.set_permission("carol", "maintain")

    assert repo.get_collaborator_permission("ticketd-bot") == "admin"  # the token's user
    assert repo.get_collaborator_permission("alice") == "write"
    assert repo.get_collaborator_permission("carol") == "write"
    assert repo.get_collaborator_role_name("carol") == "maintain"
    assert repo.get_collaborator_permission("mallory") == "none"  # the repository is private
    with pytest.raises(ValueError, match="owner"):
        fake_github.set_permission("bob", "owner")


def test_merged_and_closed_pull_requests(fake_github: FakeGitHub, repo: Any) -> None:
    for branch in ("merged", "closed", "open"):
        fake_github.add_pull(branch)

    fake_github.merge(1, by="alice", at=T0)
    fake_github.close(2, at=T0)

    merged, closed = repo.get_pull(1), repo.get_pull(2)
    assert (merged.state, merged.merged, merged.merged_at, merged.merged_by.login) == (
        "closed",
        True,
        T0,
        "alice",
    )
    assert merged.merge_commit_sha and merged.closed_at == T0
    assert (closed.state, closed.merged, closed.merged_at, closed.closed_at) == (
        "closed",
        False,
        None,
        T0,
    )
    assert repo.get_pull(3).merged is False
    listed = {p.number: p.merged_at for p in repo.get_pulls(state="all")}
    assert listed == {3: None, 2: None, 1: T0}
    assert merged.as_issue().pull_request.merged_at == T0
    with pytest.raises(ValueError, match="closed"):
        fake_github.merge(2)


# -- failures ----------------------------------------------------------------------------------


def test_a_wrong_token_is_bad_credentials(fake_github: FakeGitHub, connect: Connect) -> None:
    with pytest.raises(github.BadCredentialsException) as caught:
        connect("wrong").get_repo(REPO)

    assert caught.value.status == 401 and caught.value.data["message"] == BAD_CREDENTIALS
    assert fake_github.requests[0].headers["authorization"] == "token ***"


def test_no_token_is_a_plain_401(connect: Connect) -> None:
    with pytest.raises(github.GithubException) as caught:
        connect(None).get_repo(REPO)

    assert type(caught.value) is github.GithubException
    assert (caught.value.status, caught.value.message) == (401, NEEDS_AUTH)


def test_a_scripted_502_raises_github_exception_once(fake_github: FakeGitHub, repo: Any) -> None:
    fake_github.fail(502, "Server Error", method="POST", path_contains="/pulls")
    assert list(repo.get_pulls()) == []  # a GET does not match

    with pytest.raises(github.GithubException) as caught:
        repo.create_pull(title="T", body="", head="feature", base="main")
    assert type(caught.value) is github.GithubException
    assert (caught.value.status, caught.value.message) == (502, "Server Error")
    assert fake_github.pulls == {}

    assert repo.create_pull(title="T", body="", head="feature", base="main").number == 1


@pytest.mark.parametrize(
    ("status", "retry_after", "raised", "message"),
    [
        (403, 1, github.RateLimitExceededException, SECONDARY_LIMIT),
        (403, None, github.RateLimitExceededException, PRIMARY_LIMIT),
        (429, 1, github.GithubException, SECONDARY_LIMIT),  # PyGithub maps only 403
        (429, None, github.GithubException, PRIMARY_LIMIT),
    ],
)
def test_a_rate_limit_without_retries_raises(
    fake_github: FakeGitHub,
    repo: Any,
    status: int,
    retry_after: int | None,
    raised: type[Exception],
    message: str,
) -> None:
    fake_github.rate_limit(retry_after=retry_after, status=status)

    with pytest.raises(github.GithubException) as caught:
        repo.get_pulls().get_page(0)

    e = caught.value
    assert type(e) is raised
    assert (e.status, e.data["message"]) == (status, message)
    headers = e.headers or {}
    if retry_after is None:
        assert headers["x-ratelimit-remaining"] == "0" and int(headers["x-ratelimit-reset"]) > 0
    else:
        assert headers["retry-after"] == "1"
    assert repo.get_pulls().get_page(0) == []  # then normal again


# -- PyGithub's default retry ------------------------------------------------------------------


def test_the_recording_retry_is_configured_as_the_default() -> None:
    default, (ours, _) = github.Github.default_retry, no_sleep_retry()

    assert type(default) is github.GithubRetry
    for attr in ("total", "backoff_factor", "status_forcelist", "allowed_methods"):
        assert getattr(ours, attr) == getattr(default, attr), attr
    assert default.total == 10 and default.backoff_factor == 0
    allowed = set(default.allowed_methods or ())
    assert "PATCH" not in allowed and {"GET", "POST"} <= allowed
    assert set(default.status_forcelist or ()) == {403, *range(500, 600)}
    assert 429 in Retry.RETRY_AFTER_STATUS_CODES  # retried only when Retry-After is sent


def test_the_default_retry_retries_a_rate_limit_by_itself(
    fake_github: FakeGitHub, connect: Connect
) -> None:
    repo = connect(retry=github.Github.default_retry).get_repo(REPO)
    fake_github.rate_limit(retry_after=0)  # the real default, with nothing to wait

    assert repo.get_pulls().get_page(0) == []

    assert statuses(fake_github, 1) == [("GET", PULLS, 403), ("GET", PULLS, 200)]


@pytest.mark.parametrize(("status", "method"), [(403, "GET"), (429, "GET"), (429, "POST")])
def test_the_default_retry_waits_retry_after_then_retries(
    fake_github: FakeGitHub, connect: Connect, status: int, method: str
) -> None:
    retry, waits = no_sleep_retry()
    repo = connect(retry=retry).get_repo(REPO)
    fake_github.rate_limit(retry_after=7, status=status, method=method)

    if method == "GET":
        assert repo.get_pulls().get_page(0) == []
    else:
        assert repo.create_pull(title="T", body="", head="f", base="main").number == 1

    assert waits == [7]
    assert [s for _, _, s in statuses(fake_github, 1)] == [status, 201 if method == "POST" else 200]


def test_the_default_retry_waits_for_the_primary_reset(
    fake_github: FakeGitHub, connect: Connect
) -> None:
    retry, waits = no_sleep_retry()
    repo = connect(retry=retry).get_repo(REPO)
    fake_github.rate_limit(retry_after=None, reset_in=30)

    assert repo.get_pulls().get_page(0) == []

    (wait,) = waits  # until X-RateLimit-Reset, plus one second
    assert 29 < wait <= 32


def test_the_default_retry_does_not_retry_patch(fake_github: FakeGitHub, connect: Connect) -> None:
    retry, waits = no_sleep_retry()
    pr = connect(retry=retry).get_repo(REPO).create_pull(title="T", body="", head="f", base="main")
    fake_github.rate_limit(retry_after=7, status=429, method="PATCH")
    fake_github.fail(502, "Server Error", method="PATCH")

    for status in (429, 502):
        with pytest.raises(github.GithubException) as caught:
            pr.edit(title="New")
        assert type(caught.value) is github.GithubException and caught.value.status == status

    assert waits == []


def test_the_default_retry_retries_a_5xx_at_once_then_gives_up_with_requests_retry_error(
    fake_github: FakeGitHub, connect: Connect
) -> None:
    retry, waits = no_sleep_retry()
    repo = connect(retry=retry).get_repo(REPO)
    fake_github.fail(502, "Server Error", method="POST")

    assert repo.create_pull(title="T", body="", head="f", base="main").number == 1
    assert waits == []  # backoff_factor 0: no wait between attempts

    fake_github.fail(502, "Server Error", method="POST", times=11)
    with pytest.raises(requests.exceptions.RetryError):  # not a GithubException
        repo.create_pull(title="T", body="", head="g", base="main")
    assert len(fake_github.requests_to(PULLS, "POST")) == 2 + 11  # the first try and 10 retries


def test_a_403_that_is_not_a_rate_limit_is_not_retried(
    fake_github: FakeGitHub, connect: Connect
) -> None:
    retry, _ = no_sleep_retry()
    repo = connect(retry=retry).get_repo(REPO)
    fake_github.fail(403, "Resource not accessible by integration")

    with pytest.raises(github.GithubException) as caught:
        repo.get_pulls().get_page(0)

    assert type(caught.value) is github.GithubException and caught.value.status == 403
    assert len(fake_github.requests_to(PULLS)) == 1


# -- the fake itself ---------------------------------------------------------------------------


def test_an_unimplemented_endpoint_is_reported() -> None:
    with FakeGitHub() as fake:
        auth = github.Auth.Token(fake.token)
        gh = github.Github(base_url=fake.url, auth=auth, retry=None, seconds_between_requests=None)
        try:
            with pytest.raises(github.UnknownObjectException):
                gh.get_repo(REPO).get_branch("main")
        finally:
            gh.close()

    assert fake.problems() == [f"GET /repos/{REPO}/branches/main: not implemented by the fake"]


def test_a_path_outside_the_api_root_is_unimplemented() -> None:
    with FakeGitHub() as fake, httpx.Client() as client:
        response = client.get(
            f"{fake.web_url}/repos/{REPO}", headers={"Authorization": "token t0k3n"}
        )

    assert response.status_code == 404
    assert fake.unimplemented[0].path == f"/repos/{REPO}"
    assert not fake.unimplemented[0].path.startswith(API_PREFIX)


def test_wait_for_requests_from_another_thread(fake_github: FakeGitHub, repo: Any) -> None:
    worker = threading.Thread(
        target=lambda: repo.create_pull(title="T", body="", head="f", base="main")
    )
    worker.start()
    try:
        fake_github.wait_for_requests(1, timeout=10, path=PULLS, method="POST")
    finally:
        worker.join()

    with pytest.raises(AssertionError, match="got 1 matching requests"):
        fake_github.wait_for_requests(2, timeout=0.01, path=PULLS)


def test_stop_refuses_connections_and_start_listens_again(
    fake_github: FakeGitHub, connect: Connect
) -> None:
    gh = connect()
    port = fake_github.port
    fake_github.stop()

    with pytest.raises(requests.exceptions.ConnectionError):
        gh.get_repo(REPO)

    fake_github.start()
    assert fake_github.port == port
    assert gh.get_repo(REPO).full_name == REPO
