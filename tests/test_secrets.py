"""The secret scanner (daemon/secrets): rule families, look-alike filters, allowlist comments,
the baseline, diffs, folders, redaction, and precision/recall on the shared dev corpus.

Every secret here is generated at run time (seeded, so runs repeat) in the format of the
rule under test; no corpus line is copied into this file.
"""

from __future__ import annotations

import base64
import json
import random
import string
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import git

from daemon.errors import ConfigError
from daemon.secrets import (
    Finding,
    load_baseline,
    redact,
    scan_added,
    scan_paths,
    scan_text,
    write_baseline,
)

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "secrets-dev.jsonl"
ALNUM = string.ascii_letters + string.digits
LOWER = string.ascii_lowercase + string.digits
HEX = "0123456789abcdef"
SYMBOLS = "!#$%&*+?@^~"


@pytest.fixture
def rnd(request: pytest.FixtureRequest) -> Callable[[str, int], str]:
    """``rnd(alphabet, n)``: a random string, seeded by the test's name."""
    rng = random.Random(request.node.name)

    def make(alphabet: str, n: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(n))

    return make


def rules(text: str, path: str = "settings.py") -> set[str]:
    return {f.rule for f in scan_text(text, path)}


# --- the dev corpus ---------------------------------------------------------------------------


def test_precision_and_recall_on_the_dev_corpus() -> None:
    if not CORPUS.is_file():
        pytest.skip(f"the shared corpus is absent ({CORPUS})")
    rows = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line]
    tp = fp = fn = 0
    for row in rows:
        found = bool(scan_text(row["text"], row["file"]))
        secret = row["label"] == "secret"
        tp += found and secret
        fp += found and not secret
        fn += secret and not found
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert precision >= 0.95, f"precision {precision:.3f} (fp {fp})"
    assert recall >= 0.95, f"recall {recall:.3f} (fn {fn})"


# --- rule families ----------------------------------------------------------------------------


def test_vendor_token_formats(rnd: Callable[[str, int], str]) -> None:
    cases = {
        "github-pat": f'token = "ghp_{rnd(ALNUM, 36)}"',
        "github-fine-grained-pat": f"GH=github_pat_{rnd(ALNUM + '_', 82)}",
        "gitlab-pat": f"glpat-{rnd(ALNUM, 20)}",
        "aws-access-token": f"key_id: AKIA{rnd('ABCDEFGHIJKLMNOPQRSTUVWXYZ234567', 16)}",
        "stripe-access-token": f"STRIPE = 'sk_live_{rnd(ALNUM, 32)}'",
        "anthropic-api-key": f"sk-ant-api03-{rnd(ALNUM + '-_', 93)}AA",
        "gcp-api-key": f"maps: AIza{rnd(ALNUM + '-_', 35)}",
        "npm-access-token": f"//registry.npmjs.org/:_authToken=npm_{rnd(LOWER, 36)}",
        "sendgrid-api-token": f"SG.{rnd(ALNUM, 22)}.{rnd(ALNUM, 43)}",
        "heroku-api-key": f'heroku_api_key = "{uuid.UUID(rnd(HEX, 32))}"',
        "slack-webhook-url": (
            f"https://hooks.slack.com/services/T{rnd(ALNUM, 8)}/B{rnd(ALNUM, 10)}/{rnd(ALNUM, 24)}"
        ),
    }
    for rule_id, line in cases.items():
        assert rule_id in rules(line), (rule_id, rules(line))


def test_detect_secrets_plugins_add_bare_tokens(rnd: Callable[[str, int], str]) -> None:
    bot = f"{rnd(string.digits, 10)}:AA{rnd(ALNUM + '_-', 33)}"
    assert rules(bot, "notes.txt") == {"TelegramBotTokenDetector"}
    discord = f"M{rnd(ALNUM, 23)}.{rnd(ALNUM, 6)}.{rnd(ALNUM, 27)}"
    assert rules(discord, "notes.txt") == {"DiscordBotTokenDetector"}


def private_key(rnd: Callable[[str, int], str], kind: str = "RSA PRIVATE KEY") -> str:
    body = base64.b64encode(rnd(ALNUM, 240).encode()).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join([f"-----BEGIN {kind}-----", *lines, f"-----END {kind}-----"])


def test_private_key_blocks(rnd: Callable[[str, int], str]) -> None:
    block = private_key(rnd)
    found = scan_text(f"# key below\n{block}\n", "deploy.pem")
    assert [(f.rule, f.line) for f in found] == [("private-key", 2)]
    escaped = private_key(rnd, "PRIVATE KEY").replace("\n", "\\n")
    assert rules(f'{{"private_key": "{escaped}"}}', "sa.json") >= {"private-key"}
    assert not scan_text('if line.startswith("-----BEGIN RSA PRIVATE KEY-----"):', "keys.py")


def test_credentials_in_urls(rnd: Callable[[str, int], str]) -> None:
    password = rnd(ALNUM, 16)
    assert rules(f"DATABASE_URL=postgres://app:{password}@db.internal:5432/app", ".env") == {
        "url-credentials"
    }
    assert rules(f'REDIS = "redis://:{password}@cache:6379/0"') == {"url-credentials"}
    for clean in (
        "https://user:password@git.internal/repo.git",  # a placeholder word
        "https://deploy:${DEPLOY_TOKEN}@git.internal/repo.git",  # a reference
        "postgres://postgres:postgres@localhost/app",  # the user name again
        f"https://someone:{password}@example.com/",  # a documentation host
        "http://proxy.internal:8080@gateway",  # a port, not a password
    ):
        assert not scan_text(clean, "notes.md"), clean


def test_generic_assignments_need_a_secret_name_and_entropy(rnd: Callable[[str, int], str]) -> None:
    symbolic = rnd(ALNUM, 10) + rnd(SYMBOLS, 4)
    assert rules(f'DB_PASSWORD = "{symbolic}"') == {"generic-secret"}
    assert rules(f"smtp_password: {symbolic}", "mail.yaml") == {"generic-secret"}
    assert rules(f"<password>{symbolic}</password>", "settings.xml") == {"generic-secret"}
    assert rules(f'client_secret = "{rnd(ALNUM, 32)}"')  # gitleaks' generic-api-key
    # detect-secrets' keyword syntaxes: C arrays, reversed comparisons.
    assert rules(f'char db_password[32] = "{symbolic}";', "login.c") == {"KeywordDetector"}
    assert rules(f'if ("{symbolic}" == user_password) {{', "login.js") == {"KeywordDetector"}
    for clean in (
        f'password_field = "{symbolic}"',  # names a field, does not hold a password
        'password = "Password123"',  # too little entropy
        f'secret_name = "prod/{rnd(LOWER, 6)}/db-password"',
        'API_KEY_HEADER = "X-Api-Key"',
        f'password = read_password("{rnd(LOWER, 8)}.txt")',  # computed
    ):
        assert not scan_text(clean, "settings.py"), clean
    # In source files an unquoted right-hand side is an expression; in config it is a value.
    assert not scan_text(f"password = {symbolic}", "app.py")
    assert scan_text(f"password = {symbolic}", "app.ini")


def test_pass_at_the_end_of_a_longer_word_names_no_password(
    rnd: Callable[[str, int], str],
) -> None:
    # The standard library's proxy tests: host:port strings handed to *bypass* functions.
    for clean in (
        "self.assertTrue(bypass('newdomain.com:1234'))",
        "self.assertFalse(urllib.request.proxy_bypass_environment('anotherdomain.com:8888'))",
        f"heading = compass('{rnd(ALNUM, 10)}:{rnd(SYMBOLS, 3)}')",
    ):
        assert not scan_text(clean, "test_urllib.py"), clean
    # "pass" as a word of the name still names a password, and a token is still a token.
    symbolic = rnd(ALNUM, 10) + rnd(SYMBOLS, 4)
    assert rules(f"mail.set_pass('{symbolic}')") == {"generic-secret"}
    assert rules(f'bypass_password = "{symbolic}"') == {"generic-secret"}
    assert rules(f"bypass('ghp_{rnd(ALNUM, 36)}')") == {"github-pat"}


# --- look-alike filters -----------------------------------------------------------------------


def test_placeholders_are_not_secrets(rnd: Callable[[str, int], str]) -> None:
    for clean in (
        "AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE",
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "token: ghp_" + "x" * 36,
        'api_key = "XXXXXXXXXXXXXXXXXXXXXXXX"',
        "API_TOKEN=<your-token>",
        'password = "changeme-please-0"',
        'client_secret = "your_client_secret_here"',
        "AKIA" + "Z" * 16,  # one repeated character
        'secret_key = "' + "ab12" * 8 + '"',  # one repeated unit
        'api_secret = "abcdef0123456789abcdef0123"',  # an ascending run
        'auth_token = "' + "1234567890" * 3 + '"',
    ):
        assert not scan_text(clean, "settings.py"), clean


def test_templates_and_environment_lookups_are_not_secrets() -> None:
    for clean in (
        "password: ${DB_PASSWORD}",
        'token: "{{ vault_token }}"',
        "token: ${{ secrets.DEPLOY_TOKEN }}",
        "SECRET_KEY=$(cat /run/secrets/key)",
        'api_key = "%s" % key',
        '<add key="ApiKey" value="%API_KEY%" />',
        'api_key = os.environ["SERVICE_API_KEY"]',
        "const token = process.env.SERVICE_TOKEN;",
        'String secret = System.getenv("SERVICE_SECRET");',
    ):
        assert not scan_text(clean, "settings.yaml"), clean


def test_hashes_and_git_shas_in_hash_contexts(rnd: Callable[[str, int], str]) -> None:
    sha1, sha256 = rnd(HEX, 40), rnd(HEX, 64)
    for clean in (
        f'token_sha256 = "{sha256}"',
        f"auth_commit = {sha1}",
        f'api_key_checksum: "{rnd(HEX, 32)}"',
        f"image: registry.local/app@sha256:{sha256}",
    ):
        assert not scan_text(clean, "build.yaml"), clean
    # The same value without a hash-like context is a credential.
    assert scan_text(f'auth_value = "{sha1}"', "build.yaml")


def test_uuids_are_not_generic_secrets(rnd: Callable[[str, int], str]) -> None:
    value = str(uuid.UUID(rnd(HEX, 32)))
    assert not scan_text(f'api_secret = "{value}"', "settings.py")
    assert not scan_text(f'"tenantId": "{value}",', "azure.json")
    # A vendor format that is a UUID still counts.
    assert rules(f'HEROKU_API_KEY = "{value}"') == {"heroku-api-key"}


def test_public_keys_are_not_secrets(rnd: Callable[[str, int], str]) -> None:
    blob = "AAAAC3NzaC1lZDI1NTE5AAAAI" + rnd(ALNUM, 43)
    assert not scan_text(f"ssh-ed25519 {blob} deploy@ci", "id_ed25519.pub")
    assert not scan_text(f'public_key = "{blob}"', "settings.py")
    assert not scan_text(private_key(rnd, "PUBLIC KEY"), "key.pem")


# --- allowlists and the baseline --------------------------------------------------------------


def test_inline_allowlist_comments(rnd: Callable[[str, int], str]) -> None:
    token = "ghp_" + rnd(ALNUM, 36)
    assert scan_text(f'TOKEN = "{token}"', "a.py")
    assert not scan_text(f'TOKEN = "{token}"  # gitleaks:allow', "a.py")
    assert not scan_text(f'TOKEN = "{token}"  # pragma: allowlist secret', "a.py")
    assert not scan_text(f'// pragma: allowlist nextline secret\nTOKEN = "{token}";', "a.js")
    # The comment covers its own line only.
    found = scan_text(f'A = "{token}"  # gitleaks:allow\nB = "{token}"', "a.py")
    assert [f.line for f in found] == [2]


def test_baseline_round_trip(tmp_path: Path, rnd: Callable[[str, int], str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "old.py").write_text(f'TOKEN = "ghp_{rnd(ALNUM, 36)}"\n')
    known = scan_paths([src])
    assert len(known) == 1
    baseline = tmp_path / "baseline.json"
    write_baseline(baseline, known)
    data = json.loads(baseline.read_text())
    assert data == [known[0].fingerprint]
    assert load_baseline(baseline) == {known[0].fingerprint}
    assert scan_paths([src], baseline=baseline) == []
    (src / "new.py").write_text(f'KEY = "glpat-{rnd(ALNUM, 20)}"\n')
    assert [f.rule for f in scan_paths([src], baseline=baseline)] == ["gitlab-pat"]
    baseline.write_text('{"not": "a list"}')
    with pytest.raises(ConfigError, match="baseline"):
        load_baseline(baseline)


# --- diffs and folders ------------------------------------------------------------------------


def test_scan_added_reads_a_real_git_diff(tmp_path: Path, rnd: Callable[[str, int], str]) -> None:
    old, new, fresh = (f"ghp_{rnd(ALNUM, 36)}" for _ in range(3))
    git(tmp_path, "init", "--quiet", "-b", "main")
    git(tmp_path, "config", "user.email", "test@example.invalid")
    git(tmp_path, "config", "user.name", "Test")
    lines = [f"line {i}" for i in range(1, 21)]
    (tmp_path / "app.py").write_text("\n".join([*lines[:5], f'OLD = "{old}"', *lines[5:]]) + "\n")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "--quiet", "-m", "one")
    # Remove the old secret (line 6), add one at new-file line 16, add a whole new file.
    edited = [*lines[:14], f'NEW = "{new}"', *lines[14:]]
    (tmp_path / "app.py").write_text("\n".join(edited) + "\n")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "new file.env").write_text(f"A=1\nB=2\nTOKEN={fresh}\n")
    git(tmp_path, "add", "-A")
    diff = git(tmp_path, "diff", "--cached")
    found = scan_added(diff)
    assert [(f.file, f.line, f.rule) for f in found] == [
        ("app.py", 15, "github-pat"),
        ("conf/new file.env", 3, "github-pat"),
    ]
    assert f'-OLD = "{old}"' in diff  # the removed secret is in the diff, and ignored


def test_scan_added_line_numbers_across_hunks(rnd: Callable[[str, int], str]) -> None:
    token = f"glpat-{rnd(ALNUM, 20)}"
    diff = (
        "diff --git a/x.cfg b/x.cfg\n--- a/x.cfg\n+++ b/x.cfg\n"
        "@@ -1,3 +1,3 @@\n a\n-b\n+b2\n c\n"
        "@@ -40,2 +40,3 @@\n d\n+++ not a header " + token + "\n e\n"
        "diff --git a/gone.cfg b/gone.cfg\n--- a/gone.cfg\n+++ /dev/null\n@@ -1 +0,0 @@\n-"
        + token
        + "\n"
    )
    assert [(f.file, f.line) for f in scan_added(diff)] == [("x.cfg", 41)]


def test_scan_paths_walks_folders_and_skips_binaries(
    tmp_path: Path, rnd: Callable[[str, int], str]
) -> None:
    token = f"ghp_{rnd(ALNUM, 36)}"
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "sub" / "conf.yaml").write_text(f"x: 1\ntoken: {token}\n")
    (tmp_path / "pkg" / "blob.bin").write_bytes(b"\x00\x01" + token.encode() + b"\x00")
    (tmp_path / "pkg" / "big.txt").write_text("a" * (1024 * 1024) + f"\n{token}\n")
    (tmp_path / "pkg" / ".git").mkdir()
    (tmp_path / "pkg" / ".git" / "config").write_text(f"token = {token}\n")
    single = tmp_path / "single.py"
    single.write_text(f'T = "{token}"\n')
    found = scan_paths([tmp_path / "pkg", single])
    assert [(Path(f.file).name, f.line) for f in found] == [("conf.yaml", 2), ("single.py", 1)]


# --- redaction --------------------------------------------------------------------------------


def test_redaction_shows_four_characters_at_most(rnd: Callable[[str, int], str]) -> None:
    assert redact("abcdefghijkl") == "abcd…"
    assert len(redact("abcdef").rstrip("…")) < 4
    assert redact("") == "…"
    secrets = [f"ghp_{rnd(ALNUM, 36)}", rnd(ALNUM, 10) + rnd(SYMBOLS, 4)]
    text = f'TOKEN = "{secrets[0]}"\nDB_PASSWORD = "{secrets[1]}"\n'
    found = scan_text(text, "settings.py")
    assert len(found) == 2
    for f, secret in zip(found, secrets, strict=True):
        shown = f.redacted.rstrip("…")
        assert len(shown) <= 4 and secret.startswith(shown)
        for field in (f.file, f.rule, f.redacted, f.fingerprint, repr(f), str(f)):
            assert secret not in field
            assert secret[4:12] not in field
        assert isinstance(f, Finding)
