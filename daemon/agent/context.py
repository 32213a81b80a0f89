"""What the builtin agent shows the model about the repository, within a token budget.

The repository's file list (``git ls-files``, trimmed), the files the ticket names, and the
files where the ticket's identifiers and keywords occur (``git grep``), most relevant first.
A file is shown whole or not at all: a SEARCH block can only copy lines the model has seen.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from daemon.errors import GitError
from daemon.llm.client import estimate_tokens

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
PATHLIKE = re.compile(r"[\w./-]+\.[A-Za-z0-9]{1,8}")


@dataclass(frozen=True)
class Context:
    tree: str  # the file list: the same for every ticket on one base, so it goes first
    text: str  # the files shown whole
    files: tuple[str, ...]  # shown whole
    dropped: tuple[str, ...]  # relevant but over the budget
    tokens: int


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
    worktree: Path, ticket_text: str, budget_tokens: int, max_files: int, timeout_s: float = 60
) -> Context:
    listing = _git(worktree, ["ls-files"], timeout_s).splitlines()
    tracked = set(listing)
    ranked: Counter[str] = Counter()
    for token in PATHLIKE.findall(ticket_text):
        for path in listing:
            if path == token or path.endswith("/" + token) or Path(path).name == token:
                ranked[path] += 100
    for word in keywords(ticket_text):
        if PATHLIKE.fullmatch(word):
            continue  # a file name: matched above, not a word to search for
        hits = _git(
            worktree,
            ["grep", "-I", "-c", "-F", "-w", "-e", word.split(".")[-1]],
            timeout_s,
            check=False,
        )
        for line in hits.splitlines():
            path, _, count = line.rpartition(":")
            if path in tracked:
                ranked[path] += min(int(count or 0), 10)
    tree = _file_tree(listing, max(200, budget_tokens // 8))
    used = estimate_tokens(tree)
    shown: list[str] = []
    dropped: list[str] = []
    parts: list[str] = []
    for path, _ in ranked.most_common():
        if len(shown) >= max_files:
            break
        full = worktree / path
        if not full.is_file() or full.is_symlink() or full.stat().st_size > MAX_FILE_BYTES:
            continue
        try:
            body = full.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        block = f"{path}\n```\n{body}{'' if body.endswith(chr(10)) or not body else chr(10)}```\n"
        cost = estimate_tokens(block)
        if used + cost > budget_tokens:
            dropped.append(path)
            continue
        shown.append(path)
        parts.append(block)
        used += cost
    return Context(tree, "\n".join(parts), tuple(shown), tuple(dropped), used)


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


def _git(worktree: Path, args: list[str], timeout_s: float, check: bool = True) -> str:
    result = subprocess.run(
        ["git", *args],
        cwd=worktree,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        errors="replace",
        check=False,
    )
    if check and result.returncode != 0:
        raise GitError(f"git {args[0]} failed: {result.stderr.strip()}")
    return result.stdout
