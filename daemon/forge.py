"""Pull requests through PyGithub (github.com, or GitHub Enterprise with ``base_url``).

Idempotent: an open pull request for the branch is updated, never duplicated. Rate limits
(403 with ``X-RateLimit-*``, 403/429 with ``Retry-After``) are waited out by PyGithub's
``GithubRetry`` up to ``max_rate_limit_wait_s``; 5xx answers are retried a few times. Any
failure left is ``PR_FAILED`` (retryable). The token never appears in a message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import github
from github import Auth, GithubException, GithubRetry

from daemon.errors import TicketdError


class PRFailed(TicketdError):
    code = "PR_FAILED"


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

    def close(self) -> None:
        self._gh.close()

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


def _describe(e: GithubException) -> str:
    data = e.data if isinstance(e.data, dict) else {}
    message = str(data.get("message") or e.message or "")
    details = "; ".join(str(x.get("message", x)) for x in data.get("errors", []) if x)
    return f"{e.status} {message}{': ' + details if details else ''}".strip()
