"""The one redactor (daemon/redact.py): known values and their encodings, URL credentials and
every secret the detector finds, in texts and JSON-like data; the secret gate's known values.

Every secret here is generated at run time (seeded, so runs repeat) in the format of the
rule that should catch it.
"""

from __future__ import annotations

import base64
import hashlib
import random
import string
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from loguru import logger

from daemon import gates, logs
from daemon.redact import Redactor
from daemon.secrets import KNOWN_RULE, mask, scan_added, scan_text, spans

ALNUM = string.ascii_letters + string.digits
AWS_CHARS = string.ascii_uppercase + "234567"
SYMBOLS = "!#$%&*+?@^~"

Rnd = Callable[[str, int], str]


@pytest.fixture
def rnd(request: pytest.FixtureRequest) -> Rnd:
    """``rnd(alphabet, n)``: a random string, seeded by the test's name."""
    rng = random.Random(request.node.name)

    def make(alphabet: str, n: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(n))

    return make


def pieces(secret: str, size: int = 8) -> Iterator[str]:
    """Every ``size``-character piece of ``secret`` (the whole of a shorter one)."""
    yield from {secret[i : i + size] for i in range(max(1, len(secret) - size + 1))}


def assert_hidden(secret: str, text: str) -> None:
    left = [p for p in pieces(secret) if p in text]
    assert not left, f"pieces of the secret left: {left}"


def private_key(rnd: Rnd) -> str:
    body = base64.b64encode(rnd(ALNUM, 240).encode()).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    kind = "RSA PRIVATE KEY"
    return "\n".join([f"-----BEGIN {kind}-----", *lines, f"-----END {kind}-----"])


def leaks(rnd: Rnd) -> dict[str, tuple[str, str, str]]:
    """``name: (secret, log text holding it, expected mask)``."""
    aws = "AKIA" + rnd(AWS_CHARS, 16)
    pat = "ghp_" + rnd(ALNUM, 36)
    key = private_key(rnd)
    team, bot = rnd(string.ascii_uppercase, 8), rnd(string.ascii_uppercase, 10)
    webhook = f"https://hooks.slack.com/services/T{team}/B{bot}/{rnd(ALNUM, 24)}"
    password = rnd(ALNUM, 10) + rnd(SYMBOLS, 4)
    generic = rnd(ALNUM, 10) + rnd(SYMBOLS, 4)
    return {
        "aws": (aws, f"agent: export AWS_ACCESS_KEY_ID={aws} done", "***(aws-access-token)"),
        "github": (pat, f"stage agent: using {pat} to push", "***(github-pat)"),
        "private key": (key, f"agent printed:\n{key}\nand went on", "***(private-key)"),
        "slack": (webhook, f"notify: POST {webhook} -> 200", "***(slack-webhook-url)"),
        "url": (password, f"cloning https://deploy:{password}@git.internal.net/r.git", "***@"),
        "generic": (generic, f'stage checks: db password = "{generic}" in log', "***("),
    }


@pytest.mark.parametrize("name", ["aws", "github", "private key", "slack", "url", "generic"])
def test_each_kind_of_secret_is_masked_whole(rnd: Rnd, name: str) -> None:
    secret, text, shown = leaks(rnd)[name]
    clean = Redactor()(text)
    assert shown in clean
    assert_hidden(secret, clean)
    assert Redactor()(clean) == clean  # masking again changes nothing


def test_masks_name_the_rule_and_keep_the_text_around(rnd: Rnd) -> None:
    key = private_key(rnd)
    assert Redactor()(f"agent printed:\n{key}\nand went on") == (
        "agent printed:\n***(private-key)\nand went on"
    )
    pat = "ghp_" + rnd(ALNUM, 36)
    text = f"pushing with {pat} now"
    assert mask(text) == "pushing with ***(github-pat) now"
    assert spans(text) == [(13, 13 + len(pat), "github-pat")]


def test_known_values_and_url_credentials_read_as_before(rnd: Rnd) -> None:
    token = rnd(ALNUM, 40)
    redact = Redactor([token])
    text = f"leaked {token} and https://bot:{token}@example.invalid/r.git"
    assert redact(text) == "leaked *** and https://***@example.invalid/r.git"
    assert redact.secrets == (token,)


def test_allowlist_comments_do_not_prevent_masking(rnd: Rnd) -> None:
    aws = "AKIA" + rnd(AWS_CHARS, 16)
    pat = "ghp_" + rnd(ALNUM, 36)
    for text in (
        f"key {aws}  # gitleaks:allow",
        f"key {aws}  # pragma: allowlist secret",
        f"# pragma: allowlist nextline secret\ntoken {pat}",
    ):
        assert not scan_text(text, "notes.txt")  # the gate honours them in a change
        clean = Redactor()(text)
        assert aws not in clean and pat not in clean, clean


def test_plain_lines_and_look_alikes_are_left_alone(rnd: Rnd) -> None:
    sha = hashlib.sha1(rnd(ALNUM, 12).encode()).hexdigest()
    digest = hashlib.sha256(rnd(ALNUM, 12).encode()).hexdigest()
    for text in (
        "stage push done in 0.31s",
        "claimed task-12 - Fix the login page (title)",
        "task-12 done in 41.2s: https://github.com/acme/app/pull/17",
        "watching /srv/app/backlog/todo (pid 4242)",
        "AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE",
        f"commit {sha} pushed to ticketd/task-12",
        f"HEAD is now at {sha[:7]} Fix the login page",
        f"merge {sha} into main",
        f"image app@sha256:{digest}",
        f"run {uuid.UUID(int=random.Random(rnd(ALNUM, 8)).getrandbits(128), version=4)} started",
        "password = ${DB_PASSWORD}",
        "token: <your-token>",
    ):
        assert Redactor()(text) == text


def known_token(rnd: Rnd) -> str:
    """A token whose base64 differs between the standard and the URL-safe alphabets at
    every byte alignment (it holds '+' or '/' each time)."""
    while True:
        token = rnd(ALNUM + "~?>", 40)
        raw = token.encode()
        if all(
            set("+/") & set(base64.b64encode(bytes(pad) + raw).decode()[2:-4]) for pad in range(3)
        ):
            return token


@pytest.mark.parametrize("encode", [base64.b64encode, base64.urlsafe_b64encode])
def test_base64_of_a_known_token_is_masked(rnd: Rnd, encode: Callable[[bytes], bytes]) -> None:
    token = known_token(rnd)
    redact = Redactor([token])
    standalone = encode(token.encode()).decode()
    # The last characters of a lone encoding also hold padding bits: the rest goes.
    assert redact(f"pushed {standalone}") == f"pushed ***{standalone[53:]}"
    for pad in range(6):  # the token after 0, 1, 2 (and 3, 4, 5) bytes of a longer blob
        before = rnd(ALNUM, pad).encode()
        blob = encode(before + token.encode() + rnd(ALNUM, 7).encode()).decode()
        # Characters made of the token's bits alone, from bit 8*pad to bit 8*(pad+40).
        first, last = -(-8 * pad // 6), 8 * (pad + 40) // 6
        assert redact(f"data: {blob}") == f"data: {blob[:first]}***{blob[last:]}", pad
        assert_hidden(blob[first:last], redact(blob))


def test_hex_of_a_known_token_is_masked(rnd: Rnd) -> None:
    token = rnd(ALNUM, 32)
    redact = Redactor([token])
    for form in (token.encode().hex(), token.encode().hex().upper()):
        assert redact(f"dump {form} end") == "dump *** end"


def test_a_reload_replaces_the_known_values(rnd: Rnd) -> None:
    old, new = rnd(ALNUM, 32), rnd(ALNUM, 32)
    redact = Redactor([old])
    redact.secrets = Redactor([new]).secrets  # what the supervisor does on reload
    assert redact(f"{old} {new}") == f"{old} ***"
    redact.update([old])
    assert redact(f"{old} {new}") == f"*** {new}"
    assert redact.secrets == (old,)


def test_data_redacts_every_string_of_nested_json(rnd: Rnd) -> None:
    token = rnd(ALNUM, 40)
    pat = "ghp_" + rnd(ALNUM, 36)
    password = rnd(ALNUM, 10) + rnd(SYMBOLS, 4)
    record = {
        "taskId": "task-12",
        "attempts": [{"error": f"push failed: {token}", "durationS": 1.5, "retry": True}],
        "details": {"env": {"DB_PASSWORD": password, "PLAIN": "plain"}, "n": None},
        "argv": ("git", "push", f"https://bot:{password}@git.internal.net/r.git"),
        pat: [pat, 3],
    }
    clean = Redactor([token]).data(record)
    assert clean == {
        "taskId": "task-12",
        "attempts": [{"error": "push failed: ***", "durationS": 1.5, "retry": True}],
        "details": {
            "env": {"DB_PASSWORD": clean["details"]["env"]["DB_PASSWORD"], "PLAIN": "plain"},
            "n": None,
        },
        "argv": ("git", "push", "https://***@git.internal.net/r.git"),
        "***(github-pat)": ["***(github-pat)", 3],
    }
    # A value alone is read after its name: DB_PASSWORD holds a password.
    assert clean["details"]["env"]["DB_PASSWORD"].startswith("***(")
    assert record["attempts"][0]["error"] == f"push failed: {token}"  # a copy: input untouched
    for secret in (token, pat, password):
        assert_hidden(secret, repr(clean))


def diff_adding(line: str, path: str = "deploy/notes.txt") -> str:
    return (
        f"diff --git a/{path} b/{path}\n--- a/{path}\n+++ b/{path}\n"
        f"@@ -1,1 +1,2 @@\n context\n+{line}\n"
    )


def test_the_gate_finds_a_base64_encoded_known_token(rnd: Rnd, tmp_path: Path) -> None:
    token = "ghp_" + rnd(ALNUM, 36)
    encoded = base64.b64encode(f"oauth2:{token}".encode()).decode()  # at byte 7
    diff = diff_adding(f"AUTH={encoded}  # gitleaks:allow")
    assert not scan_added(diff)  # the detector is told to allow the line
    baseline = tmp_path / "baseline.json"
    findings = scan_added(diff, known=[token])
    assert [(f.file, f.line, f.rule) for f in findings] == [("deploy/notes.txt", 2, KNOWN_RULE)]
    baseline.write_text(f'["{findings[0].fingerprint}"]')  # nor does the baseline excuse it

    with pytest.raises(gates.Held) as held:
        gates.scan_secrets(diff, baseline=baseline, on_finding="review", known=[token])
    assert held.value.code == "SECRET_DETECTED" and held.value.folder == "review"
    (finding,) = held.value.details["findings"]
    assert finding["rule"] == KNOWN_RULE and finding["line"] == 2
    shown = f"{held.value.message} {held.value.details} {findings}"
    for secret in (token, encoded):
        assert_hidden(secret, shown)
    gates.scan_secrets(
        diff_adding("AUTH=${TOKEN}"), baseline=None, on_finding="review", known=[token]
    )


def test_logged_exceptions_are_redacted(rnd: Rnd, tmp_path: Path) -> None:
    token = rnd(ALNUM, 40)
    pat = "ghp_" + rnd(ALNUM, 36)
    logs.setup(
        directory=tmp_path,
        level="DEBUG",
        json_format=False,
        rotation="1 MB",
        retention="1 day",
        compression="none",
        redactor=Redactor([token]),
        stderr=False,
    )
    try:
        try:
            raise RuntimeError(f"push refused for {token} ({pat})")
        except RuntimeError as e:
            logger.opt(exception=e).error("unexpected error in stage {}", "push")
    finally:
        logger.remove()
    text = (tmp_path / "ticketd.log").read_text()
    assert "RuntimeError: push refused for *** (***(github-pat))" in text
    assert token not in text and pat not in text
