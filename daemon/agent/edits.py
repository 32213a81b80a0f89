"""SEARCH/REPLACE edit blocks: read them from a model's answer and apply them to a worktree.

``parse`` is tolerant of what small local models get slightly wrong, much as aider is (fences
or none, 5 to 9 marker characters, decorated paths, '=======' ending a block); a '=======' line
never lands in SEARCH or REPLACE, and a stray line before a block ("...", a fence, a language
tag) is never taken for its path. ``apply`` matches each SEARCH exactly, then ignoring trailing
whitespace, then under a uniform indentation shift, then (as aider) without a spurious leading
blank line or a fence wrapped round it, and refuses a SEARCH that matches more than one place.
A block whose SEARCH is only the head of a new function (REPLACE starts with it, and nothing
of it is in the file) adds REPLACE at the end of the file; one whose SEARCH is, or starts
with, the head of a function and whose REPLACE rewrites that whole function replaces it.
A block that cannot be applied becomes a ``Failure`` that shows the model the closest real
lines. The worktree is hostile: only regular files of at most 1 MiB are read, and a path
outside the worktree, into ``.git`` or through a symlink refuses the whole answer
(UNSAFE_EDIT) before anything is written.
"""

from __future__ import annotations

import codecs
import difflib
import heapq
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from daemon import files
from daemon.agent import merge
from daemon.errors import TicketdError
from daemon.files import atomic_write


@dataclass(frozen=True)
class Edit:
    path: str  # as written by the model (relative)
    search: str  # "\n"-joined lines with a final "\n" when non-empty; "" creates a file
    replace: str
    index: int  # 1-based position among the answer's blocks
    whole: bool = False  # replace: the whole file, or a part of it (merge.whole)


@dataclass(frozen=True)
class Failure:
    edit: Edit
    reason: str  # one line
    closest: str  # the closest real lines of the file, numbered; "" if none


@dataclass(frozen=True)
class Applied:
    changed: tuple[str, ...]  # relative (posix) paths written, in the order first changed
    failures: tuple[Failure, ...]
    fuzzy: int  # blocks that matched only after a tolerance (whitespace, indentation, repair)


_SEARCH = re.compile(r"^\s*<{5,9}\s*SEARCH\s*$", re.IGNORECASE)
_DIVIDER = re.compile(r"^\s*={5,9}\s*$")
_REPLACE = re.compile(r"^\s*>{5,9}\s*REPLACE\s*$", re.IGNORECASE)
_MARKERS = (_SEARCH, _DIVIDER, _REPLACE)
_FENCE = re.compile(r"^\s*(?:`{3,}|~{3,})\s*([\w+#./-]*)\s*$")
_CLOSING_FENCE = re.compile(r"^\s*(?:`{3,}|~{3,})\s*$")
_PATH_PREFIX = re.compile(r"^(?:#+\s+|(?:file(?:name)?|path)\s*:\s*)", re.IGNORECASE)
_LANGUAGES = frozenset(
    "bash c cpp csharp css diff go html java javascript js json markdown md php plaintext py "
    "python python3 ruby rust sh shell sql text toml ts typescript txt xml yaml yml".split()
)
_LINE = re.compile(r"[^\n]*\n|[^\n]+\Z")
_NUMBERED = re.compile(r"^\s*\d+ \|(?: |$)")  # a line as ``_numbered`` shows it
# the head of a function, class or type: "def f", "async def f", "class C", "fn f", "struct S"
DEFINITION = r"(?:async\s+)?(?:def|class|function|fn|func|struct|interface|type)\s+"
_DEFINED = re.compile(rf"\b{DEFINITION}(\w+)")
_WORD = re.compile(r"\w+|[^\w\s]")
_CONTEXT = 2  # lines shown around the closest match
_SHOWN = 12  # at most this many lines shown
_SCORED = 40  # SEARCH lines that rank the windows
_CANDIDATES = 5  # best-ranked windows that difflib compares
_MAX_BYTES = 1 << 20  # a larger file is not read

NO_PATH = "no file path before it; put the path on its own line"

Shift = tuple[str, str]  # (indentation to add, indentation to remove) on REPLACE lines


def parse(answer: str, *, pathless: bool = False) -> list[Edit]:
    """The answer's edit blocks in order; [] when it has none.

    Raises EDIT_PARSE_FAILED naming the block and the answer's line when a block is malformed,
    or has no path (with ``pathless``, its path is "": the caller finds the file).
    """
    lines = answer.replace("\r\n", "\n").split("\n")
    edits: list[Edit] = []
    path: str | None = None
    start = 0  # the first line after the previous block
    i = 0
    while i < len(lines):
        index, where = len(edits) + 1, i + 1
        if _REPLACE.match(lines[i]):
            raise _malformed(index, where, "'>>>>>>> REPLACE' without '<<<<<<< SEARCH' before it")
        if not _SEARCH.match(lines[i]):
            i += 1
            continue
        path = _path_before(lines, start, i) or path or ("" if pathless else None)
        if path is None:
            raise _malformed(index, where, NO_PATH)
        divider = _marker(lines, i + 1)
        if divider == len(lines) or not _DIVIDER.match(lines[divider]):
            raise _malformed(index, where, "missing '=======' between SEARCH and REPLACE")
        replace, end = _replace_part(lines, divider, index, where)
        edits.append(Edit(path, join_lines(lines[i + 1 : divider]), join_lines(replace), index))
        start = i = end + 1
    return edits


def _malformed(index: int, line: int, problem: str) -> TicketdError:
    return TicketdError(
        f"block {index} (line {line} of the answer): {problem}", code="EDIT_PARSE_FAILED"
    )


def _marker(lines: list[str], i: int) -> int:
    """The index of the first SEARCH, '=======' or REPLACE line from ``i``; len(lines) if none."""
    found = (j for j in range(i, len(lines)) if any(m.match(lines[j]) for m in _MARKERS))
    return next(found, len(lines))


def _replace_part(lines: list[str], divider: int, index: int, at: int) -> tuple[list[str], int]:
    """The REPLACE lines after ``divider`` and the index of the line that ends the block. As
    in aider, a second '=======' ends it unless a '>>>>>>> REPLACE' follows before the next
    SEARCH; then the one part between the dividers and that end that is not blank is REPLACE
    (two are ambiguous). A '=======' line never lands in REPLACE."""
    dividers = [divider]
    end = _marker(lines, divider + 1)
    while end < len(lines) and _DIVIDER.match(lines[end]):
        dividers.append(end)
        end = _marker(lines, end + 1)
    if end == len(lines) or _SEARCH.match(lines[end]):
        if len(dividers) == 1:
            raise _malformed(index, at, "missing '>>>>>>> REPLACE' at its end")
        return lines[divider + 1 : dividers[1]], dividers[1]
    parts = [lines[a + 1 : b] for a, b in zip(dividers, [*dividers[1:], end], strict=True)]
    filled = [part for part in parts if any(line.strip() for line in part)]
    if len(filled) > 1:
        where = ", ".join(str(d + 1) for d in dividers)
        problem = f"'=======' on lines {where}; put exactly one between SEARCH and REPLACE"
        raise _malformed(index, at, problem)
    return (filled or parts)[0], end


def _path_before(lines: list[str], start: int, i: int) -> str | None:
    """The path on the last non-blank line before line ``i``, looking back past up to two
    fences (whose info string may be the path); behind two it needs a ``.`` or ``/``, since it
    may as well be the last line of a code block. None when that line is not a path."""
    fences = 0
    for line in reversed(lines[start:i]):
        if not line.strip():
            continue
        fence = _FENCE.match(line)
        if fence is None or "." in fence[1] or "/" in fence[1]:
            path = as_path(fence[1] if fence else line)
            return path if fences < 2 or (path and re.search(r"[./]", path)) else None
        if fences == 2:
            return None
        fences += 1
    return None


def as_path(line: str) -> str | None:
    """``line`` as a file path without decorations (``**``, backticks, a trailing colon, a
    heading mark, ``File:``), or None when it reads as prose. A label (a bare word with a
    trailing colon and no ``.`` or ``/``: "Changes:"), a fence's language tag ("python") and a
    line without a letter or digit ("...", "----") are not paths."""
    text, before, label = line.strip(), "", False
    while text != before:
        before = text
        label = label or text.endswith(":")
        text = _PATH_PREFIX.sub("", text).rstrip(":").strip("*`'\" \t")
    if not text or any(c.isspace() for c in text) or (label and not re.search(r"[./]", text)):
        return None
    return text if any(c.isalnum() for c in text) and text.casefold() not in _LANGUAGES else None


def join_lines(lines: list[str]) -> str:
    return "".join(f"{line}\n" for line in lines)


def resolve(root: Path, rel: str) -> Path:
    """The absolute path inside ``root`` for a model-written path; UNSAFE_EDIT for anything
    absolute, outside ``root``, under a ``.git`` component (any case) or through a symlink."""
    if "\x00" in rel:
        raise _refuse(rel, "the path contains a NUL byte")
    if rel.startswith(("/", "\\")) or re.match(r"[A-Za-z]:[/\\]", rel):
        raise _refuse(rel, "the path is absolute")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts:
        raise _refuse(rel, "the path names no file")
    if parts[0].startswith("~"):
        raise _refuse(rel, "a path may not start with ~")
    if ".." in parts:
        raise _refuse(rel, "the path goes up with ..")
    if any(p.rstrip(". ").casefold() == ".git" for p in parts):
        raise _refuse(rel, "files under .git are not editable")
    base = root.resolve()
    path = base
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise _refuse(rel, f"{path.relative_to(base).as_posix()} is a symbolic link")
    if not path.resolve().is_relative_to(base):  # unreachable after the checks above
        raise _refuse(rel, "the path leaves the worktree")
    return path


def _refuse(rel: str, why: str) -> TicketdError:
    return TicketdError(f"refusing to edit {rel!r}: {why}", code="UNSAFE_EDIT")


@dataclass
class _File:
    text: str | None  # None: does not exist (yet)
    original: str | None
    error: str = ""  # why it cannot be edited
    bom: bool = False
    mode: int | None = None


def apply(root: Path, edits: Sequence[Edit]) -> Applied:
    """Apply ``edits`` in order (each sees the result of the ones before) and write the files
    that changed. UNSAFE_EDIT for any unsafe path, before anything is written."""
    base = root.resolve()
    targets: list[Path] = []
    files: dict[Path, _File] = {}
    for edit in edits:
        try:
            targets.append(resolve(base, edit.path))
            if targets[-1] not in files:
                files[targets[-1]] = _load(targets[-1], edit.path)
        except TicketdError as e:
            raise TicketdError(f"block {edit.index}: {e.message}", code=e.code) from e
    failures: list[Failure] = []
    fuzzy = 0
    for edit, target in zip(edits, targets, strict=True):
        file = files[target]
        creating = file.text is None and not edit.search.strip()
        outcome = _apply_one(edit, file, creating and _blocked(base, target, files))
        if isinstance(outcome, Failure):
            failures.append(outcome)
        else:
            file.text, fuzzy = outcome[0], fuzzy + outcome[1]
    changed: list[str] = []
    for target, file in files.items():
        if file.text is not None and file.text != file.original:
            _write(target, file.text, file)
            changed.append(target.relative_to(base).as_posix())
    return Applied(tuple(changed), tuple(failures), fuzzy)


def _load(path: Path, rel: str) -> _File:
    """The file as it is now: read only if it is a regular file of at most 1 MiB, opened
    without following a symlink or blocking (the model's code has run in the worktree)."""
    try:
        raw = files.read_regular(path, _MAX_BYTES)
        mode = stat.S_IMODE(os.lstat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return _File(None, None)
    except files.NotAFile as e:
        if e.kind == "a symbolic link":  # put there since resolve()
            raise _refuse(rel, f"{rel} is a symbolic link") from e
        return _File(
            None, None, error="is a folder" if e.kind == "a directory" else "is not a regular file"
        )
    except files.TooLarge:
        return _File(None, None, error="is too large to edit (over 1 MiB)")
    except OSError as e:
        return _File(None, None, error=f"cannot be read ({e.strerror})")
    bom = raw.startswith(codecs.BOM_UTF8)
    try:
        text = raw.removeprefix(codecs.BOM_UTF8).decode("utf-8")
    except UnicodeDecodeError:
        text = "\x00"  # not UTF-8: binary
    if "\x00" in text:
        return _File(None, None, error="is not a text file")
    return _File(text, text, bom=bom, mode=mode)


def _blocked(base: Path, target: Path, files: dict[Path, _File]) -> bool:
    """Whether creating ``target`` would need a folder where a file is (or will be)."""
    above = [p for p in target.parents if p.is_relative_to(base) and p != base]
    if any(p in files and files[p].text is not None for p in above):
        return True
    if any(p.exists() and not p.is_dir() for p in above):
        return True
    return any(target in p.parents for p, f in files.items() if f.text is not None)


def _apply_one(edit: Edit, file: _File, blocked: bool) -> tuple[str, bool] | Failure:
    """The file's new text and whether the match was fuzzy, or why the block fails."""
    if file.error:
        return Failure(edit, f"{edit.path} {file.error}", "")
    if edit.whole and file.text is not None:
        text = merge.whole(edit.path, file.text, edit.replace)
        if text is None:
            why = f"the fenced code for {edit.path} is only a part of it; use SEARCH/REPLACE"
            return Failure(edit, why, "")
        return text, False
    if not edit.search.strip():  # create the file
        inner = _unwrap(_split(edit.replace), edit.path)  # a fence round the whole file
        content = edit.replace if inner is None else join_lines(inner)
        if file.text is None:
            if blocked:
                return Failure(edit, f"cannot create {edit.path}: a file is in the way", "")
            return content, False
        if not file.text or file.text.replace("\r\n", "\n") == content:
            return file.text or content, False
        lines = _LINE.findall(file.text)
        return Failure(
            edit,
            f"{edit.path} already exists; copy lines from it into SEARCH to change it",
            _numbered(lines, 0, _SHOWN),
        )
    if file.text is None:
        return Failure(edit, f"{edit.path} does not exist; an empty SEARCH creates a file", "")
    lines, search, replace = _LINE.findall(file.text), _split(edit.search), _split(edit.replace)
    matches, fuzzy = _find(lines, search)
    if not matches and (repaired := _repair(search, replace, edit.path)):
        search, replace = repaired
        matches, fuzzy = _find(lines, search)[0], True
    if not matches and (added := _addition(lines, search, replace)) is not None:
        return added, True
    if not matches and (rewrite := _by_head(lines, search, replace)) is not None:
        start, size, shift = rewrite
        fuzzy = True
    elif not matches:
        reason = f"SEARCH text not found in {edit.path}"
        return Failure(edit, reason, _closest(lines, search))
    elif len(matches) > 1:
        where = ", ".join(str(i + 1) for i, _ in matches)
        reason = f"SEARCH matches {len(matches)} places in {edit.path} (lines {where}); "
        return Failure(edit, reason + "include more lines so it matches one", "")
    else:
        start, shift = matches[0]
        size = _rewritten(lines, start, search, replace) or len(search)
    eol = _eol(file.text)
    new = "".join(_reindent(line, shift) + eol for line in replace)
    text = "".join(lines[:start]) + new + "".join(lines[start + size :])
    if not file.text.endswith("\n") and text.endswith("\n"):  # keep "no final newline"
        text = text.removesuffix(eol) if text.endswith(eol) else text[:-1]
    return text, fuzzy


def _repair(search: list[str], replace: list[str], path: str) -> tuple[list[str], list[str]] | None:
    """SEARCH and REPLACE as aider repairs a SEARCH that matches nowhere: without a spurious
    leading blank line, and without a fence wrapped round the section (a line naming the file
    may stand above it); REPLACE loses the same only where it has them. Line numbers copied
    from the closest lines a reflection showed ("12 | ...") go too. None if no repair."""
    s, r = search, replace
    if any(_NUMBERED.match(line) for line in s):  # copied from the closest lines we showed
        s, r = [_NUMBERED.sub("", x) for x in s], [_NUMBERED.sub("", x) for x in r]
    if len(s) > 2 and not s[0].strip():
        s, r = s[1:], r[1:] if r and not r[0].strip() else r
    inner = _unwrap(s, path)
    if inner is not None and any(line.strip() for line in inner):
        outer = _unwrap(r, path)
        s, r = inner, r if outer is None else outer
    return None if s == search else (s, r)


def _addition(lines: list[str], search: list[str], replace: list[str]) -> str | None:
    """The file with REPLACE added at its end, when the block only adds lines to a SEARCH that
    names something new: SEARCH is the head of REPLACE, and neither its lines nor a function
    or class it defines are in the file. A small model asked to add a function searches for
    the head of the function it means to write. None when the block is no such addition."""
    if len(replace) <= len(search) or replace[: len(search)] != search:
        return None
    have = {line.strip() for line in lines}
    if any(line.strip() in have for line in search if line.strip()):
        return None
    text = "".join(lines)
    if any(
        re.search(rf"\b{DEFINITION}{re.escape(n)}\b", text)
        for n in _DEFINED.findall("".join(search))
    ):
        return None
    gap = "" if not text else "\n\n" if text.endswith("\n") else "\n\n\n"
    return text + gap + join_lines(replace)


def _rewritten(lines: list[str], start: int, search: list[str], replace: list[str]) -> int:
    """The length of the whole definition at ``start`` when the block rewrites it: SEARCH is
    only its head, and REPLACE, after that head, repeats at least half of its body's lines.
    A small model searches for the head and answers with the whole new function; the old
    body must go, not stay under the new one. 0 when the block is no such rewrite (it adds
    lines after the head: a docstring, a guard)."""
    head = search[0] if len(search) == 1 else ""
    if not _DEFINED.search(head) or not replace or replace[0].strip() != head.strip():
        return 0
    depth = len(head) - len(head.lstrip())
    end = start + 1
    while end < len(lines) and (
        not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > depth
    ):
        end += 1
    if end < len(lines) and lines[end].strip() in ("}", "end"):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1  # the blank lines after the body stay
    body = {line.strip() for line in lines[start + 1 : end] if line.strip()}
    kept = body & {line.strip() for line in replace[1:]}
    return end - start if body and 2 * len(kept) >= len(body) else 0


def _by_head(
    lines: list[str], search: list[str], replace: list[str]
) -> tuple[int, int, Shift] | None:
    """Where a block that matched nowhere rewrites a whole definition: SEARCH starts with the
    head of one (found once in the file, indented alike or not) and REPLACE is that whole
    definition rewritten (``_rewritten``). A small model often writes its new version of a
    function in SEARCH too. (start, length, shift), or None."""
    if not search or not _DEFINED.search(search[0]):
        return None
    heads = [i for i, line in enumerate(lines) if line.strip() == search[0].strip()]
    if len(heads) != 1:
        return None
    start = heads[0]
    shift = _shift([lines[start]], search[:1])
    size = _rewritten(lines, start, [_body(lines[start])], replace)
    return (start, size, shift) if shift is not None and size else None


def _unwrap(lines: list[str], path: str) -> list[str] | None:
    """The lines inside a fence that wraps them all, or None when no fence does."""
    name = as_path(lines[0]) if len(lines) > 2 else None
    if name in (path, path.rsplit("/", 1)[-1]) and _FENCE.match(lines[1]):
        lines = lines[1:]
    if len(lines) > 1 and _FENCE.match(lines[0]) and _CLOSING_FENCE.match(lines[-1]):
        return lines[1:-1]
    return None


def _find(lines: list[str], search: list[str]) -> tuple[list[tuple[int, Shift]], bool]:
    """Where ``search`` matches at the strictest level that matches at all (line-for-line;
    ignoring trailing whitespace; under a uniform indentation shift), and whether that level
    was a tolerant one."""
    size = len(search)
    starts = range(len(lines) - size + 1)
    for key, fuzzy in ((_body, False), (str.rstrip, True)):
        pairs = [(i, zip(lines[i : i + size], search, strict=True)) for i in starts]
        found = [i for i, p in pairs if all(key(line) == key(want) for line, want in p)]
        if found:
            return [(i, ("", "")) for i in found], fuzzy
    shifted = [(i, _shift(lines[i : i + size], search)) for i in starts]
    return [(i, s) for i, s in shifted if s is not None], True


def _shift(window: list[str], search: list[str]) -> Shift | None:
    """The one indentation change that turns every ``search`` line into its ``window`` line."""
    shift: Shift | None = None
    for line, wanted in zip(window, search, strict=True):
        have, want = line.rstrip(), wanted.rstrip()
        if not have or not want:
            if have or want:
                return None
            continue
        if shift is None:
            h, w = _indent(have), _indent(want)
            if h.endswith(w):
                shift = (h[: len(h) - len(w)], "")
            elif w.endswith(h):
                shift = ("", w[: len(w) - len(h)])
            else:
                return None
        add, remove = shift
        if not want.startswith(remove) or add + want[len(remove) :] != have:
            return None
    return shift


def _reindent(line: str, shift: Shift) -> str:
    add, remove = shift
    if not add and not remove:
        return line
    if not line.strip():
        return ""
    return add + (line[len(remove) :] if line.startswith(remove) else line.lstrip())


def _closest(lines: list[str], search: list[str]) -> str:
    """The window of ``lines`` most like ``search``, numbered, with a little context; "" for an
    empty file. Shared words rank the windows; difflib picks among the best few."""
    if not lines:
        return ""
    size = min(len(search), len(lines))
    have = [frozenset(_WORD.findall(line)) for line in lines]
    want = [frozenset(_WORD.findall(line)) for line in search[: min(size, _SCORED)]]

    def overlap(i: int) -> float:
        pairs = zip(have[i : i + len(want)], want, strict=True)
        return sum(2 * len(a & b) / (len(a) + len(b) or 1) for a, b in pairs)

    top = heapq.nlargest(_CANDIDATES, range(len(lines) - size + 1), key=overlap)
    matcher = difflib.SequenceMatcher(None, "", "\n".join(s.strip() for s in search), False)

    def ratio(i: int) -> float:
        matcher.set_seq1("\n".join(s.strip() for s in lines[i : i + size]))
        return matcher.ratio()

    at = max(top, key=ratio)
    lo = max(0, at - _CONTEXT)
    return _numbered(lines, lo, min(len(lines), at + size + _CONTEXT, lo + _SHOWN))


def _numbered(lines: list[str], lo: int, hi: int) -> str:
    hi = min(hi, len(lines))
    width = len(str(hi))
    shown = ((f"{n + 1:>{width}} |", _body(lines[n])) for n in range(lo, hi))
    return "\n".join(f"{number} {text}" if text else number for number, text in shown)


def _body(line: str) -> str:
    return line.removesuffix("\n").removesuffix("\r")


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _split(text: str) -> list[str]:
    return text.removesuffix("\n").split("\n") if text else []


def _eol(text: str) -> str:
    crlf = text.count("\r\n")
    return "\r\n" if crlf > text.count("\n") - crlf else "\n"


def _write(target: Path, text: str, file: _File) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, (codecs.BOM_UTF8 if file.bom else b"") + text.encode("utf-8"))
        if file.mode is not None and file.mode != 0o644:  # atomic_write leaves 0644
            os.chmod(target, file.mode)
    except OSError as e:
        raise TicketdError(
            f"cannot write {target}: {e.strerror or e}", code="EDIT_APPLY_FAILED"
        ) from e


def describe_failures(failures: Sequence[Failure]) -> str:
    """What to tell the model about the blocks that failed; "" when none did."""
    if not failures:
        return ""
    parts = ["These edit blocks could not be applied (blocks not listed here were applied):"]
    for f in failures:
        text = f"Block {f.edit.index} ({f.edit.path}): {f.reason}"
        if f.closest:
            text += f"\nLines of {f.edit.path} as they are now (the numbers are not part of "
            text += f"the file):\n{f.closest}"
        parts.append(text)
    parts.append(
        "Answer with corrected blocks for these only. SEARCH must copy the file's "
        "current lines exactly, with the same indentation, comments and blank lines, "
        "and enough of them to match one place."
    )
    return "\n\n".join(parts)
