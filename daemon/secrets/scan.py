"""Scanning texts, diffs and folders; findings, spans to mask, redaction and the baseline file."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from daemon.errors import ConfigError, TicketdError
from daemon.redact import KnownSecrets, apply_masks, merge_spans, rule_mask
from daemon.secrets import ds, filters, ours, prefilter
from daemon.secrets.gitleaks_rules import GLOBAL_ALLOW, RULES
from daemon.secrets.prefilter import Text
from daemon.secrets.regex import shannon_entropy
from daemon.secrets.rules import Candidate, line_span, match_rule

MAX_FILE_BYTES = 1024 * 1024
# detect-secrets' patterns carry no entropy threshold; gitleaks puts most vendor tokens at 3.
DS_MIN_ENTROPY = 3.2
_ALLOW_COMMENT = re.compile(r"gitleaks:allow|pragma: ?allowlist[ -]secret|trufflehog:ignore", re.I)
_ALLOW_NEXT_LINE = re.compile(r"pragma: ?allowlist[ -]nextline[ -]secret", re.I)
_NAME_IN_MATCH = re.compile(r"[\w.:-]+")
# The rule of a known value (the daemon's own tokens) or one of its encodings.
KNOWN_RULE = "ticketd-known-secret"


@dataclass(frozen=True)
class Finding:
    """One secret found. Holds no secret: ``redacted`` shows at most its first 4 characters."""

    file: str
    line: int
    rule: str
    redacted: str
    fingerprint: str


def redact(value: str) -> str:
    """The first characters of ``value`` (4 at most, fewer for short values), then ``…``."""
    return value[: min(4, len(value) // 3)] + "…"


def fingerprint(file: str, rule_id: str, secret: str) -> str:
    return hashlib.sha256("\0".join((file, rule_id, secret)).encode()).hexdigest()


@dataclass(frozen=True)
class _Hit:
    rule: str
    secret: str
    start: int  # offsets of the secret in the scanned text
    end: int


def _line_starts(text: str) -> list[int]:
    return [0, *(m.end() for m in re.finditer("\n", text))]


def _line_index(starts: Sequence[int], offset: int) -> int:
    lo, hi = 0, len(starts) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if starts[mid] <= offset:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _allowed_inline(lines: Sequence[str], first: int, last: int) -> bool:
    """``gitleaks:allow`` / ``pragma: allowlist secret`` on a line of the finding, or
    ``pragma: allowlist nextline secret`` on the line before it."""
    if any(_ALLOW_COMMENT.search(lines[i]) for i in range(first, last + 1)):
        return True
    return first > 0 and bool(_ALLOW_NEXT_LINE.search(lines[first - 1]))


def _accept(c: Candidate, text: str) -> bool:
    line = line_span(text, c.start, c.end)
    if filters.is_placeholder(c.secret, line):
        return False
    if c.rule.id == "url-credentials":
        user = text[c.match_start : c.start - 1].rsplit("://", 1)[-1]
        host = text[c.end + 1 : c.match_end]
        return ours.accept_url_password(user, c.secret, host)
    if not c.rule.generic:
        return True
    if filters.is_lookalike(c.secret, line):
        return False
    if c.rule.id == "generic-secret":
        name = _NAME_IN_MATCH.search(text[c.match_start : c.start])
        return name is not None and ours.accept_generic_secret(name.group(0), c.secret)
    return True


# Every rule, in the order their hits rank (see ``_hits``); ``ours.applies`` says which
# run on a file.
_RULES = (*RULES, ours.URL_CREDENTIALS, *ours.GENERIC_SECRET)


@cache
def patterns_index() -> prefilter.Index:
    """The rules' patterns, then detect-secrets', and the literals of the rules' keywords."""
    patterns = [r.regex for r in _RULES] + [p for _, p in ds.patterns()]
    return prefilter.Index(patterns, [k for r in _RULES for k in r.keywords])


def _rule_hits(scanned: Text, path: str) -> Iterator[_Hit]:
    """The rules' hits, in rule order, from the rules that can match in the text."""
    text = scanned.text
    for i in scanned.possible:
        if i >= len(_RULES):
            break  # detect-secrets' patterns
        rule_ = _RULES[i]
        if ours.applies(rule_, path):
            for c in match_rule(rule_, scanned, path, GLOBAL_ALLOW):
                if _accept(c, text):
                    yield _Hit(rule_.id, c.secret, c.start, c.end)


def _embedded(text: str, start: int) -> bool:
    """The value starts inside a longer word, so it is not the token it resembles."""
    return start > 0 and text[start - 1].isalnum()


def _accept_plugin_value(plugin: str, text: str, start: int, end: int) -> bool:
    """detect-secrets' patterns carry no entropy threshold nor allowlists: a value must be
    random enough, mix in digits, hold no blank, start on a word boundary and be no
    look-alike."""
    secret = text[start:end]
    line = line_span(text, start, end)
    return not (
        _embedded(text, start)
        or shannon_entropy(secret) < DS_MIN_ENTROPY
        or not any(c.isdigit() for c in secret)
        or any(c.isspace() for c in secret)
        or filters.is_placeholder(secret, line)
        or filters.is_hash_like(secret, line)
        or (plugin not in ds.UUID_TOKENS and filters.is_uuid(secret))
    )


def _plugin_hits(scanned: Text) -> Iterator[_Hit]:
    text = scanned.text
    for name, start, end in ds.scan(scanned):
        if _accept_plugin_value(name, text, start, end):
            yield _Hit(name, text[start:end], start, end)


def _keyword_hits(scanned: Text, path: str) -> Iterator[_Hit]:
    text = scanned.text
    for start, end, name in ds.keyword_candidates(scanned, path):
        value = text[start:end]
        line = line_span(text, start, end)
        if (
            not any(c.isspace() for c in value)
            and not filters.is_placeholder(value, line)
            and not filters.is_lookalike(value, line)
            and ours.accept_generic_secret(name, value)
        ):
            yield _Hit(ds.KEYWORD, value, start, end)


def _overlaps(a: _Hit, kept: Iterable[_Hit]) -> bool:
    return any(a.start < b.end and b.start < a.end for b in kept)


def _hits(text: str, path: str, known: KnownSecrets | None = None) -> Iterator[_Hit]:
    """Every secret the detector accepts in ``text``, the most specific rules first: the
    known values, then the rules, then detect-secrets' keyword and token plugins."""
    if known:
        yield from (_Hit(KNOWN_RULE, text[s:e], s, e) for s, e in known.spans(text))
    scanned = Text(text, patterns_index())
    yield from _rule_hits(scanned, path)
    yield from _keyword_hits(scanned, path)
    yield from _plugin_hits(scanned)


def scan_text(
    text: str, path: str, *, first_line: int = 1, known: KnownSecrets | None = None
) -> list[Finding]:
    """Every secret in ``text`` (the content of ``path``, its first line numbered
    ``first_line``), and every occurrence of a ``known`` value or its encodings (rule
    ``ticketd-known-secret``, which no allowlist comment hides). Where hits overlap, the
    first (most specific) one reports."""
    starts = _line_starts(text)
    lines = text.split("\n")
    kept: list[_Hit] = []
    for hit in _hits(text, path, known):
        if _overlaps(hit, kept):
            continue
        first = _line_index(starts, hit.start)
        last = _line_index(starts, max(hit.start, hit.end - 1))
        if hit.rule != KNOWN_RULE and _allowed_inline(lines, first, last):
            continue
        kept.append(hit)
    kept.sort(key=lambda h: h.start)
    return [
        Finding(
            file=path,
            line=first_line + _line_index(starts, h.start),
            rule=h.rule,
            redacted=redact(h.secret),
            fingerprint=fingerprint(path, h.rule, h.secret),
        )
        for h in kept
    ]


def spans(text: str, path: str = "") -> list[tuple[int, int, str]]:
    """``(start, end, rule)`` of every secret in ``text`` (a log line, an agent's output, a
    message; or the content of the file ``path``): the hits of :func:`scan_text`, but with
    inline allowlist comments ignored, since anyone who writes the text can add one, and
    overlapping hits joined into one span named after the most specific rule, so that
    nothing of a secret is left outside. Sorted and disjoint."""
    return merge_spans((h.start, h.end, h.rule) for h in _hits(text, path))


def mask(text: str, path: str = "") -> str:
    """``text`` with each of its :func:`spans` replaced by ``***(<rule>)``."""
    return apply_masks(text, [(s, e, rule_mask(rule)) for s, e, rule in spans(text, path)])


_HUNK = re.compile(r"^@@ -\d+(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def _diff_path(header: str) -> str | None:
    """The file name of a ``+++`` line; ``None`` for ``/dev/null`` (a deleted file)."""
    name = header[4:].split("\t")[0]
    if name.startswith('"') and name.endswith('"'):
        raw = name[1:-1].encode("latin-1", "backslashreplace").decode("unicode_escape")
        name = raw.encode("latin-1", "replace").decode("utf-8", "replace")
    if name == "/dev/null":
        return None
    return name[2:] if name.startswith("b/") else name


def _added_blocks(diff: str) -> Iterator[tuple[str, int, list[str]]]:
    """``(file, first new-file line, lines)`` for each run of consecutive added lines.

    Hunk bodies are read by the line counts of their ``@@`` header, so an added line that
    itself starts with ``++`` is never taken for a file header."""
    path: str | None = None
    old_left = new_left = new_line = 0
    block: list[str] = []
    block_start = 0
    for raw in diff.split("\n"):
        if old_left > 0 or new_left > 0:
            tag, body = raw[:1], raw[1:]
            if tag == "+":
                if not block:
                    block_start = new_line
                block.append(body)
                new_line += 1
                new_left -= 1
                continue
            if block and path is not None:
                yield path, block_start, block
            block = []
            if tag == "-":
                old_left -= 1
            elif tag == " " or raw == "":
                old_left -= 1
                new_left -= 1
                new_line += 1
            continue  # "\ No newline at end of file"
        if block and path is not None:
            yield path, block_start, block
        block = []
        hunk = _HUNK.match(raw)
        if hunk:
            old_left = int(hunk.group(1) or 1)
            new_line = int(hunk.group(2))
            new_left = int(hunk.group(3) or 1)
        elif raw.startswith("+++ "):
            path = _diff_path(raw)
        elif raw.startswith("diff --git "):
            path = None
    if block and path is not None:
        yield path, block_start, block


def scan_added(diff: str, *, known: Iterable[str] = ()) -> list[Finding]:
    """Secrets on the added lines of a unified diff (``git diff`` output), numbered as in the
    new file, with the ``known`` values and their encodings (see :func:`scan_text`). A new
    file is all added lines, so it is scanned whole."""
    values = KnownSecrets(known)
    findings: list[Finding] = []
    for path, start, lines in _added_blocks(diff):
        findings.extend(scan_text("\n".join(lines), path, first_line=start, known=values))
    return findings


def _is_binary(head: bytes) -> bool:
    return b"\0" in head


def _files(paths: Sequence[Path]) -> Iterator[Path]:
    for root in paths:
        if root.is_symlink():
            continue
        if root.is_file():
            yield root
            continue
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != ".git")
            for name in sorted(names):
                file = Path(folder, name)
                if not file.is_symlink() and file.is_file():
                    yield file


def texts(paths: Sequence[Path]) -> Iterator[tuple[Path, str]]:
    """``(file, content)`` of each file a scan of ``paths`` reads: files and folders
    (recursively), skipping ``.git/``, symbolic links, binary files and files over 1 MiB."""
    for file in _files(paths):
        try:
            if file.stat().st_size > MAX_FILE_BYTES:
                continue
            data = file.read_bytes()
        except FileNotFoundError:
            continue  # removed while we walked
        except OSError as e:
            raise TicketdError(f"secret scan: cannot read {file} ({e.strerror})") from e
        if not _is_binary(data[:8192]):
            yield file, data.decode("utf-8", errors="replace")


def scan_paths(paths: Sequence[Path], *, baseline: Path | None = None) -> list[Finding]:
    """Secrets in the :func:`texts` of files and folders; drops findings whose fingerprint is
    in ``baseline``."""
    known = load_baseline(baseline) if baseline is not None else set()
    findings: list[Finding] = []
    for file, text in texts(paths):
        findings.extend(f for f in scan_text(text, str(file)) if f.fingerprint not in known)
    return findings


def load_baseline(path: Path) -> set[str]:
    """The fingerprints of a baseline file: a JSON list of sha256 hex strings."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"secrets baseline {path}: cannot read it ({e.__class__.__name__})"
        ) from e
    if not isinstance(data, list) or not all(
        isinstance(x, str) and re.fullmatch(r"[0-9a-f]{64}", x) for x in data
    ):
        raise ConfigError(f"secrets baseline {path}: expected a JSON list of sha256 fingerprints")
    return set(data)


def write_baseline(path: Path, findings: Sequence[Finding]) -> None:
    """Write the fingerprints of ``findings`` (sorted, unique) as a baseline file."""
    fingerprints = sorted({f.fingerprint for f in findings})
    path.write_text(json.dumps(fingerprints, indent=2) + "\n", encoding="utf-8")
