"""Filters for values that look like secrets but are not.

Two kinds. :func:`is_placeholder` holds for every finding: documentation placeholders
(``AKIAIOSFODNN7EXAMPLE``, ``xxxx…``, ``<your-token>``, ``changeme``), values made of one
repeated character or a repeated short unit, ascending runs such as ``abc123…``, templates
(``${VAR}``, ``{{ var }}``, ``$(cmd)``, ``%s``) and public keys. :func:`is_lookalike` holds only
for generic findings, whose value could be anything: hashes and git SHAs in a hash-like
context, UUIDs, variable references and values read from the environment.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter

_PLACEHOLDER = re.compile(
    r"(?i)example|placeholder|change[_-]?(?:me|it)\b|replace[_-]?(?:me|this)|dummy|fake|redacted"
    r"|your[_-]?(?:own|api|access|secret|token|key|pass|client|app)|<[^<>]*>|x{5}|\*{4}|#{4}"
    r"|\.{4}|0{8}|_here\b"
)
# The whole value is a reference: ${VAR}, ${{ x }}, {{ x }}, {x}, <x>, $(cmd), `cmd`, %VAR%,
# %s, @VAR@ (detect-secrets' is_templated_secret and gitleaks' global allowlist, combined).
_TEMPLATE = re.compile(
    r"""^(?:\$?\{.*\}|<.*>|\$\(.*|`.*|%[\w.]+%|%\(?\w*\)?[sdrvqx]|@\w+@|\[\w*\])$"""
)
# A regular expression (``[a-z0-9]{40}``, ``\d+``, ``(?i)``): a pattern for secrets, not one.
_REGEX = re.compile(r"\[[^\]]+\][*+?{]|\\[dwsDWS][*+?{]|\(\?[:=!<i]")
_PUBLIC_KEY = re.compile(
    r"(?:ssh-(?:rsa|dss|ed25519)|ecdsa-sha2-nistp\d+|sk-(?:ssh|ecdsa)-[\w@.-]+)\s+AAAA"
    r"|-----BEGIN (?:[A-Z0-9 ]+ )?(?:PUBLIC KEY|CERTIFICATE)-----"
)
_SSH_KEY_BLOB = re.compile(r"^AAAA(?:B3NzaC1|C3NzaC1|E2VjZHNh|B3NzaC1kc3)")
_HEX = re.compile(r"^[0-9a-fA-F]+$")
_HASH_PREFIX = re.compile(r"(?i)^(?:sha(?:1|224|256|384|512)|md5|blake2b?|crc32)[:=-]")
# Words around a hash (short ones only as whole words: "shared" and "transparent" are not).
_HASH_CONTEXT = re.compile(
    r"(?i)md5|hash|checksum|digest|integrity|fingerprint|commit|revision|version"
    r"|(?<![a-z])(?:sha(?:-?\d{1,3})?|etag|rev|ref|parent|tree|crc(?:32)?|sum)(?![a-z])"
)
_UUID = re.compile(r"(?i)^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_ENV_LOOKUP = re.compile(
    r"(?i)os\.environ|getenv|process\.env|\bENV\[|\$ENV\{|GetEnvironmentVariable|env\(|os\.Getenv"
    r"|getpass|secrets?\.get\(|vault\(|lookup\("
)
# detect-secrets' indirect reference heuristic: the value is a call or an index expression.
_INDIRECT = re.compile(r"([^\v=!:]*)\s*(:=?|[!=]{1,3})\s*([\w.-]+[\[\(][^\v]*[\]\)])")
# ``module.attr:func``, ``Foo::Bar``, ``obj.field`` : a name in code, not a value.
_QUALIFIED_NAME = re.compile(r"^[A-Za-z_$][\w$]*(?:(?:\.|::?|->|#)[A-Za-z_$][\w$]*)+(?:\(\))?$")
_HASH_LENGTHS = {32, 40, 56, 64, 96, 128}
_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def _sequential_share(value: str) -> float:
    """Share of characters in runs of four or more that step through ``0-9a-z`` one by one,
    up or down (``1234``, ``abcd``, ``789abc``, ``9876``)."""
    ranks = [_ALPHABET.index(c) for c in value.lower() if c in _ALPHABET]
    if not ranks:
        return 0.0
    covered = 0
    run, step = 1, 0
    for prev, cur in itertools.pairwise(ranks):
        if cur - prev in (1, -1) and (run == 1 or cur - prev == step):
            run, step = run + 1, cur - prev
            continue
        covered += run if run >= 4 else 0
        run, step = (2, cur - prev) if cur - prev in (1, -1) else (1, 0)
    covered += run if run >= 4 else 0
    return covered / len(ranks)


def _repeats_unit(value: str) -> bool:
    """``abcd1234abcd1234…``: the value is one short unit repeated three times or more."""
    core = re.sub(r"[^0-9A-Za-z]", "", value)
    n = len(core)
    return any(n % size == 0 and core[:size] * (n // size) == core for size in range(1, n // 3 + 1))


def is_low_diversity(value: str) -> bool:
    """One character makes up half the value, or one short unit repeats."""
    core = re.sub(r"[^0-9A-Za-z]", "", value)
    if len(core) < 6:
        return False
    top = Counter(core.lower()).most_common(1)[0][1]
    return top * 2 >= len(core) or _repeats_unit(core)


def is_sequential(value: str) -> bool:
    return _sequential_share(value) >= 0.5


def is_template(value: str) -> bool:
    return bool(_TEMPLATE.search(value))


def is_placeholder(value: str, line: str) -> bool:
    """Documentation placeholders, templates, public keys: never a live secret."""
    return (
        bool(_PLACEHOLDER.search(value))
        or is_low_diversity(value)
        or is_sequential(value)
        or is_template(value)
        or bool(_SSH_KEY_BLOB.match(value))
        or (bool(_PUBLIC_KEY.search(line)) and "PRIVATE KEY" not in line)
    )


def is_hash_like(value: str, line: str) -> bool:
    if _HASH_PREFIX.match(value):
        return True
    return (
        len(value) in _HASH_LENGTHS and bool(_HEX.match(value)) and bool(_HASH_CONTEXT.search(line))
    )


def is_uuid(value: str) -> bool:
    return bool(_UUID.match(value))


def is_lookalike(value: str, line: str) -> bool:
    """For generic findings: hashes, git SHAs, UUIDs, references and environment lookups."""
    if is_hash_like(value, line) or is_uuid(value) or value.startswith("$"):
        return True
    if _QUALIFIED_NAME.match(value) or _REGEX.search(value):
        return True
    computed = bool(_ENV_LOOKUP.search(line)) or (
        len(line) <= 1000 and bool(_INDIRECT.search(line))
    )
    return computed and value not in _literals(line)


def _literals(line: str) -> set[str]:
    """Quoted strings of ``line`` (a secret passed as a literal argument is still a secret)."""
    return {m.group(2) for m in re.finditer(r"""(["'`])(.*?)\1""", line)}
