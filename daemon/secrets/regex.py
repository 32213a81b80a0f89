"""Regex helpers for rules ported from gitleaks (MIT, https://github.com/gitleaks/gitleaks).

gitleaks writes its rules for Go's RE2. Python's ``re`` reads nearly all of them the same way;
:func:`go` translates the three constructs it does not: a flag group such as ``(?i)`` in the
middle of a pattern (Go scopes it to the rest of the enclosing group, Python 3.11 refuses it),
``\\z`` and POSIX classes such as ``[[:alnum:]]``. :func:`semi_generic` and :func:`unique_token`
build the same patterns as gitleaks' ``utils.GenerateSemiGenericRegex`` and
``utils.GenerateUniqueTokenRegex``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_POSIX = {
    "[:alnum:]": "a-zA-Z0-9",
    "[:alpha:]": "a-zA-Z",
    "[:digit:]": "0-9",
    "[:lower:]": "a-z",
    "[:upper:]": "A-Z",
    "[:xdigit:]": "0-9A-Fa-f",
}
_FLAG_GROUP = re.compile(r"\(\?([a-z]+)\)")

# Pieces of gitleaks' generated patterns (cmd/generate/config/utils/generate.go).
_OPERATOR = r"(?:=|>|:{1,3}=|\|\||:|=>|\?=|,)"
_VALUE_HEAD = r"[\x60'\"\s=]{0,5}("
_VALUE_TAIL = r")(?:[\x60'\"\s;]|\\[nr]|$)"


def _group_end(pattern: str, start: int) -> tuple[int, list[int]]:
    """End of the group enclosing ``start`` and the positions of its top-level ``|``."""
    depth = 0
    bars: list[int] = []
    i = start
    in_class = False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            if pattern.startswith("[]", i) or pattern.startswith("[^]", i):
                i += 2 if pattern[i + 1] == "]" else 3
                continue
        elif c == "(":
            depth += 1
        elif c == ")":
            if depth == 0:
                return i, bars
            depth -= 1
        elif c == "|" and depth == 0:
            bars.append(i)
        i += 1
    return len(pattern), bars


def _scope_inline_flags(pattern: str) -> str:
    """Rewrite ``X(?i)Y|Z`` (flags up to the end of the group) as ``X(?i:Y)|(?i:Z)``."""
    while True:
        found = None
        for m in _FLAG_GROUP.finditer(pattern):
            if m.start() > 0 and pattern[m.start() - 1] != "\\":
                found = m
                break
        if found is None:
            return pattern
        flags, body_start = found.group(1), found.end()
        end, bars = _group_end(pattern, body_start)
        pieces = []
        cut = body_start
        for bar in [*bars, end]:
            pieces.append(f"(?{flags}:{pattern[cut:bar]})")
            cut = bar + 1
        pattern = pattern[: found.start()] + "|".join(pieces) + pattern[end:]


def go(pattern: str) -> str:
    """Translate a Go RE2 pattern to an equivalent Python pattern."""
    for posix, chars in _POSIX.items():
        pattern = pattern.replace(posix, chars)
    pattern = pattern.replace(r"\z", r"\Z")
    if pattern.startswith("(?i)"):
        return "(?i)" + _scope_inline_flags(pattern[4:])
    return _scope_inline_flags(pattern)


def compile_go(pattern: str) -> re.Pattern[str]:
    return re.compile(go(pattern))


def semi_generic(identifiers: Sequence[str], secret: str, *, case_insensitive: bool = True) -> str:
    """gitleaks' ``GenerateSemiGenericRegex``: ``<identifier> <operator> <secret>``."""
    names = r"[\w.-]{0,50}?(?:" + "|".join(identifiers) + r")(?:[ \t\w.-]{0,20})[\s'\"]{0,3}"
    head = "(?i)" + names if case_insensitive else r"[\w.-]{0,50}?(?i:" + names + ")"
    return head + _OPERATOR + _VALUE_HEAD + secret + _VALUE_TAIL


def unique_token(secret: str, *, case_insensitive: bool = False) -> str:
    """gitleaks' ``GenerateUniqueTokenRegex``: a token with a distinctive prefix."""
    return ("(?i)" if case_insensitive else "") + r"\b(" + secret + _VALUE_TAIL


def shannon_entropy(value: str) -> float:
    """Bits per character, as gitleaks computes it."""
    if not value:
        return 0.0
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in Counter(value).values())
