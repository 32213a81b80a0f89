"""GitHub webhook deliveries over real HTTP: signed, deduplicated, bounded, fail closed."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import captured_log
from prometheus_client import CollectorRegistry

from daemon.server import Probes, Server
from daemon.webhook import MAX_BODY, PATH, PER_MINUTE, Webhook, signature

SECRET = "webhook-s3cret"
ON_A_PULL = {
    "action": "created",
    "issue": {"number": 7, "pull_request": {"url": "https://api.github.com/repos/o/r/pulls/7"}},
    "comment": {"id": 1, "body": "@ticketd hi"},
}


def ok() -> tuple[int, dict[str, Any]]:
    return 200, {"ok": True}


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


def signed(body: bytes, event: str, delivery: str, secret: str = SECRET) -> dict[str, str]:
    return {
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery,
        "X-Hub-Signature-256": signature(secret, body),
    }


def request(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """POST ``body`` (GET when None) and return the status and the JSON answer."""
    sent = urllib.request.Request(url, data=body, headers=headers or {})
    if body is not None:
        sent.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(sent, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


class Hooked:
    """A started server with a webhook whose pokes are recorded."""

    def __init__(self, secret: str | None, token: str | None) -> None:
        self.secret = secret
        self.pokes: list[int] = []
        hook = Webhook(lambda: self.secret, self.pokes.append)
        self.server = Server(
            "127.0.0.1", 0, Probes(ok, ok, ok, ok), CollectorRegistry(), token, webhook=hook.handle
        )
        self.server.start()
        self.url = self.server.url + PATH

    def deliver(self, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        return request(self.url, body, headers)


@pytest.fixture
def serve() -> Iterator[Callable[..., Hooked]]:
    started: list[Hooked] = []

    def start(secret: str | None = SECRET, token: str | None = None) -> Hooked:
        started.append(Hooked(secret, token))
        return started[-1]

    yield start
    for hooked in started:
        hooked.server.stop()


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """Every line logged while the test runs, with its bound extras."""
    with captured_log("DEBUG", "{message} {extra}") as found:
        yield found


def test_signature_matches_githubs_documented_example() -> None:
    assert (
        signature("It's a Secret to Everybody", b"Hello, World!")
        == "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    )


def test_a_comment_on_a_pull_request_pokes_that_pull(serve: Callable[..., Hooked]) -> None:
    hooked = serve()
    body = encode(ON_A_PULL)
    assert hooked.deliver(body, signed(body, "issue_comment", "d-1")) == (
        202,
        {"ok": True, "pull": 7},
    )
    review = encode({"action": "created", "pull_request": {"number": 3}, "comment": {"id": 2}})
    status, _ = hooked.deliver(review, signed(review, "pull_request_review_comment", "d-2"))
    assert status == 202
    assert hooked.pokes == [7, 3]


def test_forged_deliveries_are_refused_and_the_payload_is_never_logged(
    serve: Callable[..., Hooked], logged: list[str]
) -> None:
    hooked = serve()
    body = encode({**ON_A_PULL, "comment": {"id": 9, "body": "SECRET-PAYLOAD-TEXT"}})
    wrong = signed(body, "issue_comment", "forged-1", secret="not-the-secret")
    missing = {k: v for k, v in signed(body, "issue_comment", "forged-2").items() if "Hub" not in k}
    other_body = signed(encode(ON_A_PULL), "issue_comment", "forged-3")
    for headers in (wrong, missing, other_body):
        status, answer = hooked.deliver(body, headers)
        assert status == 401 and answer == {"error": "bad or missing X-Hub-Signature-256"}
    assert hooked.pokes == []
    refusals = [line for line in logged if "refused" in line]
    assert len(refusals) == 3 and "forged-1" in refusals[0]
    assert not any("SECRET-PAYLOAD-TEXT" in line for line in logged)


@pytest.mark.parametrize("secret", [None, ""])
def test_without_a_secret_every_delivery_is_refused(
    serve: Callable[..., Hooked], secret: str | None
) -> None:
    hooked = serve(secret=secret)
    body = encode(ON_A_PULL)
    status, _ = hooked.deliver(body, signed(body, "issue_comment", "d-1", secret=""))
    assert status == 403
    assert hooked.pokes == []


def test_a_redelivery_is_acknowledged_but_pokes_once(serve: Callable[..., Hooked]) -> None:
    hooked = serve()
    body = encode(ON_A_PULL)
    headers = signed(body, "issue_comment", "same-id")
    assert hooked.deliver(body, headers)[0] == 202
    assert hooked.deliver(body, headers) == (200, {"ok": True, "duplicate": True})
    assert hooked.pokes == [7]


def test_plain_issues_and_other_events_are_ignored(serve: Callable[..., Hooked]) -> None:
    hooked = serve()
    plain = encode({"action": "created", "issue": {"number": 5}, "comment": {"id": 1}})
    assert hooked.deliver(plain, signed(plain, "issue_comment", "d-1")) == (
        202,
        {"ok": True, "ignored": "not about a pull request"},
    )
    push = encode({"ref": "refs/heads/main", "pull_request": {"number": 4}})
    assert hooked.deliver(push, signed(push, "push", "d-2")) == (
        202,
        {"ok": True, "ignored": "push"},
    )
    assert hooked.pokes == []


def test_a_body_over_the_limit_is_refused_before_it_is_read(
    serve: Callable[..., Hooked],
) -> None:
    hooked = serve()
    host, port = hooked.server.url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.putrequest("POST", PATH)
        connection.putheader("Content-Length", str(MAX_BODY + 1))
        for name, value in signed(b"", "issue_comment", "big").items():
            connection.putheader(name, value)
        connection.endheaders()  # and no body: the answer must not wait for it
        response = connection.getresponse()
        assert response.status == 413
        assert json.loads(response.read()) == {"error": "body too large"}
    finally:
        connection.close()
    assert hooked.pokes == []


def test_past_the_rate_limit_deliveries_wait_for_the_next_minute() -> None:
    now = [1000.0]
    pokes: list[int] = []
    hook = Webhook(lambda: SECRET, pokes.append, monotonic=lambda: now[0])
    body = encode(ON_A_PULL)

    def deliver(n: int) -> int:
        headers = signed(body, "issue_comment", f"d-{n}")
        return hook.handle({k.lower(): v for k, v in headers.items()}, body)[0]

    assert {deliver(n) for n in range(PER_MINUTE)} == {202}
    assert deliver(PER_MINUTE) == 429
    now[0] += 61
    assert deliver(PER_MINUTE + 1) == 202
    assert len(pokes) == PER_MINUTE + 1


def test_the_webhook_needs_its_signature_not_the_server_token(
    serve: Callable[..., Hooked],
) -> None:
    hooked = serve(token="s3rv3r-t0k3n")
    body = encode(ON_A_PULL)
    assert hooked.deliver(body, signed(body, "issue_comment", "d-1"))[0] == 202
    assert request(hooked.server.url + "/status")[0] == 401
    assert hooked.pokes == [7]


def test_without_a_webhook_the_route_is_not_found() -> None:
    server = Server("127.0.0.1", 0, Probes(ok, ok, ok, ok), CollectorRegistry())
    server.start()
    try:
        body = encode(ON_A_PULL)
        status, _ = request(server.url + PATH, body, signed(body, "issue_comment", "d-1"))
        assert status == 404
    finally:
        server.stop()
