"""GitHub webhook deliveries: ``POST /webhooks/github`` on ticketd's server.

A delivery only says "look at pull request N now": ticketd then reads what happened from the
API, as when it polls, so nothing in a payload is trusted. Every delivery must carry
``X-Hub-Signature-256``, the HMAC-SHA256 of the raw body keyed with the secret in the
variable ``github.webhook_secret_env`` names; with no secret set every delivery is refused
(fail closed). A delivery id (``X-GitHub-Delivery``) seen before is acknowledged and
ignored, bodies over ``MAX_BODY`` are refused before they are read, and past ``PER_MINUTE``
requests a minute the answer is 429. A payload never reaches the log.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from loguru import logger

PATH = "/webhooks/github"
MAX_BODY = 1 << 20  # the events ticketd reads are a few KiB
PER_MINUTE = 120
REMEMBERED = 1000  # delivery ids kept to spot a redelivery
EVENTS = ("issue_comment", "pull_request_review", "pull_request_review_comment", "pull_request")

Answer = tuple[int, dict[str, Any]]


def signature(secret: str, body: bytes) -> str:
    """The ``X-Hub-Signature-256`` value GitHub sends for ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Webhook:
    def __init__(
        self,
        secret: Callable[[], str | None],
        poke: Callable[[int], None],
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.secret = secret
        self.poke = poke
        self.monotonic = monotonic
        self._recent: collections.deque[float] = collections.deque()
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._lock = threading.Lock()

    def handle(self, headers: Mapping[str, str], body: bytes) -> Answer:
        """Answer one delivery (headers by lower-case name)."""
        delivery = headers.get("x-github-delivery", "")[:64]
        event = headers.get("x-github-event", "")[:64]
        if not self._allowed():
            return 429, {"error": "too many deliveries; try again in a minute"}
        secret = self.secret()
        if not secret:
            logger.warning("webhook delivery {} refused: no webhook secret is set", delivery)
            return 403, {"error": "no webhook secret is configured (github.webhook_secret_env)"}
        given = headers.get("x-hub-signature-256", "")
        if not hmac.compare_digest(given.encode(), signature(secret, body).encode()):
            logger.warning(
                "webhook delivery {} ({}) refused: bad or missing signature", delivery, event
            )
            return 401, {"error": "bad or missing X-Hub-Signature-256"}
        with self._lock:
            if delivery in self._seen:
                return 200, {"ok": True, "duplicate": True}
            self._seen[delivery] = None
            while len(self._seen) > REMEMBERED:
                self._seen.popitem(last=False)
        if event not in EVENTS:
            return 202, {"ok": True, "ignored": event}
        number = _pull_number(body)
        if number is None:
            return 202, {"ok": True, "ignored": "not about a pull request"}
        self.poke(number)
        logger.info("webhook: {} on pull request #{}", event, number)
        return 202, {"ok": True, "pull": number}

    def _allowed(self) -> bool:
        now = self.monotonic()
        with self._lock:
            while self._recent and self._recent[0] < now - 60:
                self._recent.popleft()
            if len(self._recent) >= PER_MINUTE:
                return False
            self._recent.append(now)
            return True


def _pull_number(body: bytes) -> int | None:
    """The pull request a (verified) payload is about: ``pull_request.number``, or an issue
    comment's ``issue.number`` when that issue is a pull request."""
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    pr, issue = payload.get("pull_request"), payload.get("issue")
    if isinstance(pr, dict):
        number = pr.get("number")
    elif isinstance(issue, dict) and issue.get("pull_request"):
        number = issue.get("number")
    else:
        return None
    return number if isinstance(number, int) and number > 0 else None
