"""What small local models answer, read as edits, and the files their paths mean.

Asked for SEARCH/REPLACE blocks, a small model often answers otherwise: a unified diff, the
whole file in a fence under its path, or only the function it changed in a fence. ``read``
takes the answer in whichever of these it is: SEARCH/REPLACE blocks when it has any, else
the hunks of a unified diff (each hunk an edit from its old lines to its new ones, so it
matches as tolerantly as a block), else the fenced files. A fenced Python file that lacks
some of the file's functions is a part of it: ``merge_python`` puts each of its definitions
in place of the one of the same name (inside a class too) and adds the new ones, instead of
dropping the rest of the file as a whole-file rewrite would.

``place`` maps each edit to a real file: a path copied from an example or decorated by the
model (``path/to/textkit/inventory.py``, ``inventory.py``) is the listed file it ends with,
or the one listed file of that name; a fence without a path is the shown file whose
definitions it shares, a block without one the shown file holding its SEARCH. A placeholder
path (``path/to/...``, ``<path>``) or the system prompt's example file is never created, and
a fence holding another shown file's code under this path is refused.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import PurePosixPath

from daemon.agent import edits, merge
from daemon.agent.edits import Edit, Failure

SEARCH_REPLACE, UDIFF, WHOLE = "search-replace", "udiff", "whole"
FORMATS = (SEARCH_REPLACE, WHOLE, UDIFF)

_OPEN = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+#./-]*)\s*$")
_NOT_FILES = frozenset(
    "bash sh shell console zsh powershell cmd bat text txt plaintext output log diff patch".split()
)
_DIFF_OLD = re.compile(r"^---\s+(\S.*)$")
_DIFF_NEW = re.compile(r"^\+\+\+\s+(\S.*)$")
_HUNK = re.compile(r"^@@.*@@")
_PATHLIKE = re.compile(r"[\w.-]*[\w-](?:/[\w.-]+)*\.[A-Za-z0-9]{1,8}\b|[\w.-]+(?:/[\w.-]+)+")
_COMMENT_PATH = re.compile(r"^\s*(?:#|//|--)\s*(?:file(?:name)?\s*:\s*)?(\S+)\s*$", re.IGNORECASE)
EXAMPLE_PATH = "greeting.py"  # the system prompt's example file: another project's
_PLACEHOLDER = re.compile(r"^(?:path/to/|your[_/-])|[<>{}]|(?:^|/)(?:file|filename)\.\w+$")


@dataclass(frozen=True)
class Answer:
    edits: list[Edit]
    format: str  # the format the answer was in (one of FORMATS); "" when it had no edits


def read(answer: str) -> Answer:
    """The answer's edits and their format. EDIT_PARSE_FAILED for a malformed SEARCH/REPLACE
    block (``edits.parse``); an answer with no edits in any format gives ``Answer([], "")``."""
    found = edits.parse(answer, pathless=True)
    if found:
        return Answer(found, SEARCH_REPLACE)
    lines = answer.replace("\r\n", "\n").split("\n")
    hunks = _diff(lines)
    if hunks:
        return Answer(hunks, UDIFF)
    fenced = _fenced(lines)
    return Answer(fenced, WHOLE if fenced else "")


def _diff(lines: list[str]) -> list[Edit]:
    """One edit per hunk of the unified diffs in ``lines``; the @@ line numbers are ignored."""
    found: list[Edit] = []
    path: str | None = None
    i = 0
    while i < len(lines):
        old, new = _DIFF_OLD.match(lines[i]), i + 1 < len(lines) and _DIFF_NEW.match(lines[i + 1])
        if old and new:
            a, b = _diff_path(old[1]), _diff_path(new[1])
            path = a if b == "/dev/null" else b
            i += 2
            continue
        if path is None or not _HUNK.match(lines[i]):
            i += 1
            continue
        before: list[str] = []
        after: list[str] = []
        i += 1
        while i < len(lines) and not _HUNK.match(lines[i]) and not _DIFF_OLD.match(lines[i]):
            line = lines[i]
            if line.startswith("-"):
                before.append(line[1:])
            elif line.startswith("+"):
                after.append(line[1:])
            elif line.startswith(" ") or not line:
                before.append(line[1:])
                after.append(line[1:])
            elif not line.startswith("\\"):  # "\ No newline at end of file"; else: prose
                break
            i += 1
        while before and after and not before[-1].strip() and not after[-1].strip():
            before.pop()  # the blank line after the diff is no context
            after.pop()
        if before != after:
            found.append(
                Edit(path, edits.join_lines(before), edits.join_lines(after), len(found) + 1)
            )
    return found


def _diff_path(text: str) -> str:
    path = text.split("\t")[0].strip()
    return path[2:] if path.startswith(("a/", "b/")) else path


def _fenced(lines: list[str]) -> list[Edit]:
    """Each fenced block that may be a file: its path is the line above it (as a path, or a
    path-like word of a sentence), the fence's info string, or a comment on its first line."""
    found: list[Edit] = []
    i = 0
    while i < len(lines):
        opening = _OPEN.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, info = opening[1], opening[2]
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence), None)
        if end is None:
            break
        body = lines[i + 1 : end]
        path = _path_above(lines, i) or (info if re.search(r"[./]", info) else "")
        if info.casefold() in _NOT_FILES:  # a command or its output, unless a path heads it
            path = path if path == edits.as_path(_above(lines, i)) else ""
            body = body if path else []
        if any(line.strip() for line in body):
            comment = _COMMENT_PATH.match(body[0])
            if comment and _PATHLIKE.fullmatch(comment[1]):  # "# textkit/strings.py"
                path, body = path or comment[1], body[1:]
            found.append(Edit(path, "", edits.join_lines(body), len(found) + 1, whole=True))
        i = end + 1
    return found


def _path_above(lines: list[str], fence: int) -> str:
    """The path on the last non-blank line above a fence, or the last path-like word of it."""
    above = _above(lines, fence)
    if _OPEN.match(above):
        return ""
    path = edits.as_path(above)
    if path and re.search(r"[./]", path):
        return path
    words = _PATHLIKE.findall(above.replace("`", " ").replace("*", " "))
    return words[-1] if words else ""


def _above(lines: list[str], i: int) -> str:
    return next((line for line in reversed(lines[:i]) if line.strip()), "")


def place(
    found: Sequence[Edit], listing: Sequence[str], shown: Mapping[str, str]
) -> tuple[list[Edit], list[Failure]]:
    """The edits with the paths they mean (see the module's doc), and those that name no file
    ticketd may create. ``listing``: the repository's files; ``shown``: the files shown to
    the model, path -> text."""
    placed: list[Edit] = []
    failures: list[Failure] = []
    for edit in found:
        if edit.path:
            path = locate(edit.path, listing)
        else:
            path = _by_content(edit.replace, shown) if edit.whole else _by_search(edit, shown)
        if not path:
            failures.append(Failure(edit, edits.NO_PATH, ""))
        elif path not in listing and _PLACEHOLDER.search(path):
            why = f"{path} is a placeholder, not a file; use a path from the file list"
            failures.append(Failure(edit, why, ""))
        elif path == EXAMPLE_PATH and path not in listing:
            why = f"{path} is the example's file, another project's; change this repository's"
            failures.append(Failure(edit, why, ""))
        elif edit.whole and (other := _elsewhere(path, edit.replace, shown)):
            why = f"the code given for {path} is {other}'s, not {path}'s"
            failures.append(Failure(edit, why, ""))
        else:
            placed.append(replace(edit, path=path))
    return placed, failures


def locate(path: str, listing: Sequence[str]) -> str:
    """The listed file ``path`` means: itself, the longest listed path it ends with, the one
    listed path that ends with it, or the one listed file of its name; else ``path``."""
    path = path.strip().removeprefix("./")
    if path in listing:
        return path
    within = [p for p in listing if path.endswith("/" + p)]
    if within:
        return max(within, key=len)
    ending = [p for p in listing if p.endswith("/" + path)]
    name = PurePosixPath(path).name
    same = [p for p in listing if PurePosixPath(p).name == name]
    if len(ending) == 1:
        return ending[0]
    return same[0] if len(same) == 1 and _PLACEHOLDER.search(path) else path


def _by_content(text: str, shown: Mapping[str, str]) -> str:
    """The shown Python file sharing the most top-level names with ``text``; "" if none."""
    names = _names(text)
    if not names:
        return ""
    scores = {p: len(names & _names(body)) for p, body in shown.items() if p.endswith(".py")}
    best = max(scores.values(), default=0)
    hits = [p for p, score in scores.items() if score == best]
    return hits[0] if best and len(hits) == 1 else ""


def _by_search(edit: Edit, shown: Mapping[str, str]) -> str:
    """The one shown file holding the block's SEARCH lines (ignoring trailing whitespace)."""
    want = [line.rstrip() for line in edit.search.splitlines()]
    if not any(want):
        return ""
    hits = [p for p, body in shown.items() if _holds([x.rstrip() for x in body.splitlines()], want)]
    return hits[0] if len(hits) == 1 else ""


def _holds(lines: list[str], want: list[str]) -> bool:
    return any(lines[i : i + len(want)] == want for i in range(len(lines) - len(want) + 1))


def _elsewhere(path: str, text: str, shown: Mapping[str, str]) -> str:
    """The other shown file whose definitions ``text`` repeats, when it shares none with
    ``path``'s: a model that wrote out the wrong file under this path. "" if none."""
    owner = _by_content(text, shown)
    if not owner or owner == path or _names(text) & _names(shown.get(path, "")):
        return ""
    return owner


def _names(text: str) -> set[str]:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return set()
    return {node.name for node in tree.body if isinstance(node, merge.DEFS)}
