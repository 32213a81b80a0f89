"""The rule model and how one rule is matched against a text, following gitleaks' detector.

A rule runs only when the lower-cased text holds one of its keywords (or it has none), and
only on files its ``path`` pattern accepts. Each regex match (found through ``prefilter``,
the same matches as ``finditer``) yields a candidate whose secret is the rule's ``group`` (or
the first non-empty capture group); the candidate is dropped when its entropy is at or below
the rule's threshold or when any allowlist accepts it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from daemon.secrets.prefilter import Text, finditer
from daemon.secrets.regex import compile_go, shannon_entropy


@dataclass(frozen=True)
class Allow:
    """A rule allowlist: a candidate is allowed when a regex or stopword matches (or, with
    ``all_of``, when every defined condition does)."""

    regexes: tuple[re.Pattern[str], ...] = ()
    target: str = "secret"  # "secret", "match" or "line"
    stopwords: tuple[str, ...] = ()
    paths: tuple[re.Pattern[str], ...] = ()
    all_of: bool = False

    def allows(self, secret: str, match: str, line: str, path: str) -> bool:
        target = {"match": match, "line": line}.get(self.target, secret)
        checks: list[bool] = []
        if self.paths:
            checks.append(any(p.search(path) for p in self.paths))
        if self.regexes:
            checks.append(any(r.search(target) for r in self.regexes))
        if self.stopwords:
            low = secret.lower()
            checks.append(any(w in low for w in self.stopwords))
        if self.all_of:
            return bool(checks) and all(checks)
        return any(checks)


def allow(
    *regexes: str,
    target: str = "secret",
    stopwords: Sequence[str] = (),
    paths: Sequence[str] = (),
    all_of: bool = False,
) -> Allow:
    return Allow(
        regexes=tuple(compile_go(r) for r in regexes),
        target=target,
        stopwords=tuple(w.lower() for w in stopwords),
        paths=tuple(compile_go(p) for p in paths),
        all_of=all_of,
    )


@dataclass(frozen=True)
class Rule:
    id: str
    regex: re.Pattern[str]
    keywords: tuple[str, ...] = ()
    entropy: float = 0.0
    group: int = 0
    path: re.Pattern[str] | None = None
    allowlists: tuple[Allow, ...] = ()
    # Generic rules match any high-entropy value; the look-alike filters (hashes, UUIDs, git
    # SHAs, references) apply to them only, since a vendor format already says what it is.
    generic: bool = False


@dataclass(frozen=True)
class Candidate:
    rule: Rule
    secret: str
    start: int  # offset of the secret in the scanned text
    end: int
    match_start: int
    match_end: int


def rule(
    rule_id: str,
    pattern: str,
    keywords: str = "",
    *,
    entropy: float = 0.0,
    group: int = 0,
    path: str | None = None,
    allowlists: Sequence[Allow] = (),
    generic: bool = False,
) -> Rule:
    """Build a rule from a Go pattern; ``keywords`` is a comma-separated list."""
    return Rule(
        id=rule_id,
        regex=compile_go(pattern),
        keywords=tuple(k.lower() for k in keywords.split(",") if k),
        entropy=entropy,
        group=group,
        path=compile_go(path) if path else None,
        allowlists=tuple(allowlists),
        generic=generic,
    )


def line_span(text: str, start: int, end: int) -> str:
    """The full line(s) of ``text`` holding ``text[start:end]``."""
    first = text.rfind("\n", 0, start) + 1
    last = text.find("\n", max(end - 1, start))
    return text[first : len(text) if last < 0 else last]


def _secret_of(rule_: Rule, m: re.Match[str]) -> tuple[str, int, int]:
    if m.re.groups == 0:
        return m.group(0), m.start(), m.end()
    if rule_.group:
        return m.group(rule_.group) or "", m.start(rule_.group), m.end(rule_.group)
    for g in range(1, m.re.groups + 1):
        value = m.group(g)
        if value:
            return value, m.start(g), m.end(g)
    return m.group(0), m.start(), m.end()


def match_rule(
    rule_: Rule, scanned: Text, path: str, global_allow: Sequence[Allow]
) -> Iterator[Candidate]:
    """Every candidate ``rule_`` finds in ``scanned`` that survives entropy and allowlists."""
    if rule_.keywords and not scanned.holds(rule_.keywords):
        return
    if rule_.path is not None and not rule_.path.search(path):
        return
    text = scanned.text
    for m in finditer(rule_.regex, scanned):
        raw = m.group(0)
        whole = raw.strip("\n")
        if not whole:
            continue
        first = m.start() + len(raw) - len(raw.lstrip("\n"))
        secret, start, end = _secret_of(rule_, m)
        if not secret:
            continue
        if rule_.entropy and shannon_entropy(secret) <= rule_.entropy:
            continue
        line = line_span(text, first, first + len(whole))
        lists = (*global_allow, *rule_.allowlists)
        if any(a.allows(secret, whole, line, path) for a in lists):
            continue
        yield Candidate(rule_, secret, start, end, first, first + len(whole))
