"""What the builtin agent shows the model about the repository, within a token budget.

The base commit's file list (trimmed), the files the ticket names, and the files where the
ticket's identifiers and keywords occur (``git grep`` of the base commit, in ticketd's own
repository: never git inside the checkout), chosen most relevant first and shown most
relevant last, nearest the question (small models follow what they read last). A file is
shown whole or not at all: a SEARCH block can only copy lines the model has seen. Only
regular files are read from the checkout.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from daemon import files
from daemon.agent.edits import DEFINITION
from daemon.llm.client import estimate_tokens
from daemon.repo import Workspace

MAX_FILE_BYTES = 200_000
MAX_KEYWORDS = 12
STOPWORDS = frozenset(
    (
        "the and for with that this from into when then than have has are was were will "
        "should must can not but all any each only also make made use used using add added "
        "adds fix fixed fixes file files code test tests ticket task description criteria "
        "acceptance implementation plan notes change changes new old value values return "
        "returns work "
    ).split()
)
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
TEST = re.compile(r"(^|/)(tests?|spec|__tests__)/|(^|/)test_[^/]*$|_test\.\w+$|\.(test|spec)\.\w+$")
OUTLINE = re.compile(rf"^\s*(?:@\w|{DEFINITION})")
PATHLIKE = re.compile(r"[\w./-]+\.[A-Za-z0-9]{1,8}")


@dataclass(frozen=True)
class Context:
    tree: str  # the file list: the same for every ticket on one base, so it goes first
    text: str  # the files shown whole
    files: tuple[str, ...]  # shown whole
    dropped: tuple[str, ...]  # relevant but over the budget
    tokens: int
    bodies: dict[str, str] = field(default_factory=dict)  # the files shown, path -> text
    listing: tuple[str, ...] = ()  # the base commit's files


def keywords(text: str) -> list[str]:
    """Identifiers first (snake_case, CamelCase, dotted), then rarer plain words."""
    words = Counter(IDENTIFIER.findall(text))
    scored = []
    for word, count in words.items():
        if len(word) < 4 or word.lower() in STOPWORDS:
            continue
        ident = "_" in word or "." in word or (word[0].islower() and any(c.isupper() for c in word))
        ident = ident or (word[0].isupper() and any(c.isupper() for c in word[1:]))
        scored.append((not ident, -count, word))
    return [w for _, _, w in sorted(scored)][:MAX_KEYWORDS]


def gather(
    workspace: Workspace, ticket_text: str, budget_tokens: int, max_files: int, whole: int = 3
) -> Context:
    """The ``max_files`` most relevant files: the first ``whole`` of them whole, the others
    as outlines (their definition lines), within ``budget_tokens``."""
    worktree = workspace.path
    listing = workspace.files()
    tracked = set(listing)
    ranked: Counter[str] = Counter()
    named: set[str] = set()
    for token in PATHLIKE.findall(ticket_text):
        for path in listing:
            if path == token or path.endswith("/" + token) or Path(path).name == token:
                ranked[path] += 110  # named by the ticket: first
                named.add(token)
    words = [w.split(".")[-1] for w in keywords(ticket_text) if w not in named]
    for word in words:  # a file name was matched above: not a word to search for
        for path, count in workspace.grep(word).items():
            if path in tracked:
                ranked[path] += min(count, 10)
    bodies = {path: _read(worktree / path) for path, _ in ranked.most_common(3 * max_files)}
    defining = re.compile(rf"^\s*{DEFINITION}(?:{'|'.join(map(re.escape, words))})\b", re.M)
    for path, body in bodies.items():
        if words and body and defining.search(body):
            ranked[path] += 100  # defines what the ticket names: where the change goes
    for path in ranked:
        if TEST.search(path):
            ranked[path] -= 60  # a test, even one the ticket names, after the code it tests
    tree = _file_tree(listing, max(200, budget_tokens // 8))
    used = estimate_tokens(tree)
    shown: dict[str, str] = {}
    outlines: list[str] = []
    dropped: list[str] = []
    parts: list[str] = []
    for path, _ in ranked.most_common():
        if len(shown) + len(outlines) >= max_files:
            break
        body = bodies[path] if path in bodies else _read(worktree / path)
        if body is None:
            continue
        if len(shown) < whole:
            end = "" if body.endswith("\n") or not body else "\n"
            block = f"{path}\n```\n{body}{end}```\n"
        else:
            heads = [line.rstrip() for line in body.splitlines() if OUTLINE.match(line)]
            if not heads:
                continue
            block = f"{path} (outline: its definitions only)\n" + "\n".join(heads) + "\n"
        cost = estimate_tokens(block)
        if used + cost > budget_tokens:
            dropped.append(path)
            continue
        if len(shown) < whole:
            shown[path] = body
        else:
            outlines.append(path)
        parts.append(block)
        used += cost
    text = "\n".join(reversed(parts))  # the most relevant last, next to the question
    return Context(tree, text, tuple(shown), tuple(dropped), used, shown, tuple(listing))


def _file_tree(listing: list[str], budget_tokens: int) -> str:
    head = "Files in the repository:\n"
    lines: list[str] = []
    used = estimate_tokens(head)
    for path in listing:
        used += estimate_tokens(path) + 1
        if used > budget_tokens:
            lines.append(f"... and {len(listing) - len(lines)} more")
            break
        lines.append(path)
    return head + "\n".join(lines) + "\n"


def _read(path: Path) -> str | None:
    """A regular file's text (not a link, FIFO or device; UTF-8; at most MAX_FILE_BYTES)."""
    try:
        return files.read_regular(path, MAX_FILE_BYTES).decode("utf-8")
    except (files.NotAFile, files.TooLarge, OSError, UnicodeDecodeError):
        return None
