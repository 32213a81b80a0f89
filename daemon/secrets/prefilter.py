"""Running a pattern only where it can match, with exactly the matches of ``finditer``.

Python's ``re`` tries a pattern at every position of a text, and most rules look for a word
(``token``, ``api_key``, ``ghp_``) that few positions hold. :func:`anchor` reads a compiled
pattern's parse tree (``re._parser``, the ``re`` module's own parser) and derives literals,
one of which every match holds, with how far after the match's start they stand and whether
a line break can come between. It follows literal runs, alternatives, groups, repeats taken
at least once and lookaheads; anything else counts only for its width.

:func:`finditer` gives the same matches as ``pattern.finditer(text)``. A pattern does not
run on a text without its literals; where they are rare and a match starts at a bounded
distance before them (or on their line), the pattern is tried only at those starts, with
``pattern.match(text, start)``: the attempt ``finditer`` makes there, lookbehinds included.
Positions are read on the lower-cased text, which is exact when lower-casing keeps every
character in its place and agrees with ``re``'s case-insensitive matching: for every text
but those holding ``İ``, ``ı`` or ``ſ``, which are scanned whole.

:class:`Index` finds which of many literals a text holds in one pass (a trie as one regex),
the way gitleaks finds its rules' keywords with Aho-Corasick.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from re import _constants as sre  # type: ignore[attr-defined]
from re import _parser  # type: ignore[attr-defined]
from typing import Any

# Characters that lower-case to two characters (İ) or that re's case-insensitive matching
# takes for an ASCII letter while str.lower() does not (ı for i, ſ for s).
_UNALIGNED = re.compile("[\u0130\u0131\u017f]")
# A pattern is tried start by start only in texts of _SHORT characters or more and while
# the starts to try are under 1/_SPARSE of the text: else finding them costs more.
_SHORT = 256
_SPARSE = 8
_MAX_WIDTH = _parser.MAXWIDTH
_NO_NEWLINE = frozenset(
    {sre.CATEGORY_DIGIT, sre.CATEGORY_NOT_SPACE, sre.CATEGORY_WORD, sre.CATEGORY_NOT_LINEBREAK}
)

Item = tuple[Any, Any]  # a node of re._parser's tree: (opcode, argument)


@dataclass(frozen=True)
class Anchor:
    """Every match holds one of ``literals`` (lower-case) between ``lo`` and ``hi``
    characters after its start (``hi`` None: at any distance), with no line break before
    it when ``same_line``. ``bounded``: a match's start can be told from the literal's."""

    literals: frozenset[str]
    lo: int
    hi: int | None
    same_line: bool

    @cached_property
    def finder(self) -> re.Pattern[str]:
        """Finds the literals in a lower-cased text (overlapping ones aside)."""
        return re.compile("|".join(sorted(map(re.escape, self.literals), key=len, reverse=True)))

    @property
    def bounded(self) -> bool:
        return self.hi is not None or self.same_line


def _union(a: Anchor | None, b: Anchor | None) -> Anchor | None:
    if a is None or b is None:
        return None
    literals = a.literals | b.literals
    # A literal that extends another holds it at the same place: keep the shorter one.
    shortest = frozenset(s for s in literals if not any(s.startswith(t) for t in literals - {s}))
    hi = None if a.hi is None or b.hi is None else max(a.hi, b.hi)
    return Anchor(shortest, min(a.lo, b.lo), hi, a.same_line and b.same_line)


def _rank(a: Anchor | None) -> tuple[int, bool, int]:
    """Rarer first: longer literals, a bounded start, fewer literals."""
    if a is None:
        return (0, False, 0)
    return (min(map(len, a.literals)), a.bounded, -len(a.literals))


def _char(item: Item) -> str | None:
    """The lower-case ASCII character ``item`` always matches, if it is one."""
    op, av = item
    if op is sre.LITERAL:
        chars = {chr(av).lower()}
    elif op is sre.IN and all(o is sre.LITERAL for o, _ in av):
        chars = {chr(c).lower() for _, c in av}
    else:
        return None
    char = chars.pop()
    return char if not chars and char.isascii() else None


def _in_newline(av: list[Item]) -> bool:
    """Whether a character class matches a line break."""
    negate = bool(av) and av[0][0] is sre.NEGATE
    found = False
    for op, arg in av[1:] if negate else av:
        if op is sre.LITERAL:
            found |= arg == 10
        elif op is sre.RANGE:
            found |= arg[0] <= 10 <= arg[1]
        elif op is sre.CATEGORY:
            found |= arg not in _NO_NEWLINE
        else:
            return True  # unknown: assume it can
    return found != negate


def _newline(item: Item) -> bool:
    """Whether ``item`` can match text holding a line break (when unsure: yes)."""
    op, av = item
    if op is sre.LITERAL:
        return bool(av == 10)
    if op is sre.NOT_LITERAL:
        return bool(av != 10)
    if op is sre.IN:
        return _in_newline(av)
    if op in (sre.AT, sre.ASSERT, sre.ASSERT_NOT):
        return False
    if op is sre.BRANCH:
        return any(_newline(i) for branch in av[1] for i in branch)
    if op is sre.SUBPATTERN:
        return any(_newline(i) for i in av[-1])
    if op is sre.ATOMIC_GROUP:
        return any(_newline(i) for i in av)
    if op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
        return av[1] > 0 and any(_newline(i) for i in av[2])
    if op is sre.GROUPREF_EXISTS:
        return any(_newline(i) for branch in av[1:] if branch is not None for i in branch)
    return True


def _item(item: Item) -> Anchor | None:
    """The anchor of one node, relative to where the node starts."""
    op, av = item
    if op is sre.BRANCH:
        branches = [_sequence(branch) for branch in av[1]]
        result = branches[0]
        for other in branches[1:]:
            result = _union(result, other)
        return result
    if op is sre.SUBPATTERN:
        return _sequence(av[-1])
    if op is sre.ATOMIC_GROUP:
        return _sequence(av)
    if op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT) and av[0] >= 1:
        return _sequence(av[2])
    if op is sre.ASSERT and av[0] == 1:  # a lookahead: its text follows this position
        return _sequence(av[1])
    if op is sre.GROUPREF_EXISTS and av[2] is not None:
        return _union(_sequence(av[1]), _sequence(av[2]))
    return None


def _sequence(sub: Any) -> Anchor | None:
    """The best anchor among the nodes of a sequence and its runs of literal characters."""
    best: Anchor | None = None
    lo, hi, newline = 0, 0, False  # width of the nodes so far, whether they hold a newline
    run, at = "", (0, 0, False)

    def keep(found: Anchor | None, lo: int, hi: int, newline: bool) -> None:
        nonlocal best
        if found is not None:
            found = Anchor(
                found.literals,
                lo + found.lo,
                None if hi >= _MAX_WIDTH or found.hi is None else hi + found.hi,
                found.same_line and not newline,
            )
            best = max(best, found, key=_rank)

    for item in sub.data:
        char = _char(item)
        if char is not None:
            run, at = (run + char, at) if run else (char, (lo, hi, newline))
        else:
            if run:
                keep(Anchor(frozenset({run}), 0, 0, True), *at)
            run = ""
            keep(_item(item), lo, hi, newline)
        width = _parser.SubPattern(sub.state, [item]).getwidth()
        lo, hi = lo + width[0], min(hi + width[1], _MAX_WIDTH)
        newline = newline or _newline(item)
    if run:
        keep(Anchor(frozenset({run}), 0, 0, True), *at)
    return best


def anchor(pattern: re.Pattern[str]) -> Anchor | None:
    """Literals every match of ``pattern`` holds, or None when none could be derived. When
    the pattern can match an empty string, its start is never taken as bounded."""
    tree = _parser.parse(pattern.pattern, pattern.flags)
    found = _sequence(tree)
    if found is not None and tree.getwidth()[0] == 0:
        return Anchor(found.literals, found.lo, None, False)
    return found


def _trie(words: Iterable[str]) -> str:
    """One regex for ``words`` whose match at a position is the longest word there."""
    root: dict[str, Any] = {}
    for word in words:
        node = root
        for c in word:
            node = node.setdefault(c, {})
        node[""] = {}

    def pattern(node: dict[str, Any]) -> str:
        branches = [re.escape(c) + pattern(child) for c, child in sorted(node.items()) if c]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if "" in node:
            return f"(?:{body})?"
        return body

    return pattern(root)


class Index:
    """The patterns a scanner runs and the literals it asks about: for each text, in one
    pass, which literals it holds (lower-cased) and so which patterns can match in it.
    Literals of fewer than 3 characters are looked up one by one, as too common for the
    pass."""

    def __init__(self, patterns: Iterable[re.Pattern[str]], literals: Iterable[str]) -> None:
        self.patterns = tuple(patterns)  # kept alive, so that their ids stay theirs
        self.position = {id(p): i for i, p in enumerate(self.patterns)}
        self.anchors = [anchor(p) for p in self.patterns]
        words = set(literals).union(*(a.literals for a in self.anchors if a))
        self.literals = frozenset(words)
        self.short = tuple(sorted(w for w in words if len(w) < 3))
        self._longest = re.compile(f"(?=({_trie(w for w in words if len(w) >= 3)}))")
        self.unanchored = frozenset(i for i, a in enumerate(self.anchors) if a is None)
        self.anchored: dict[str, list[int]] = {}  # literal -> the patterns it anchors
        for i, a in enumerate(self.anchors):
            for w in a.literals if a else ():
                self.anchored.setdefault(w, []).append(i)

    def anchor_of(self, pattern: re.Pattern[str]) -> Anchor | None:
        at = self.position.get(id(pattern))
        return None if at is None else self.anchors[at]

    def present(self, lowered: str) -> frozenset[str]:
        """The literals ``lowered`` holds: every literal that starts the longest one found
        at some position, and the short ones found one by one."""
        found = set(self._longest.findall(lowered))
        return frozenset(
            [w[:n] for w in found for n in range(3, len(w) + 1) if w[:n] in self.literals]
            + [w for w in self.short if w in lowered]
        )


class Text:
    """A text to scan: lower-cased once, with the literals of ``index`` it holds, the
    patterns that can match in it and the positions of each anchor's literals (found on
    first use)."""

    def __init__(self, text: str, index: Index) -> None:
        self.text = text
        self.lowered = text.lower()
        self.aligned = text.isascii() or not _UNALIGNED.search(text)
        self.present = index.present(self.lowered)
        self.index = index
        if self.aligned:
            can = set(index.unanchored).union(*(index.anchored.get(w, ()) for w in self.present))
        else:  # a pattern may match a literal that the lower-cased text does not show
            can = set(range(len(index.patterns)))
        # Positions in index.patterns of the patterns that can match, in order.
        self.possible = sorted(can)
        self._possible = can
        self._at: dict[frozenset[str], list[int]] = {}

    def holds(self, literals: Iterable[str]) -> bool:
        """Whether the lower-cased text holds one of ``literals`` (each one of the index's)."""
        return not self.present.isdisjoint(literals)

    def may_match(self, pattern: re.Pattern[str]) -> bool:
        """False when ``pattern`` cannot match in the text."""
        at = self.index.position.get(id(pattern))
        return at is None or at in self._possible

    def at(self, a: Anchor) -> list[int]:
        """Where ``a``'s literals start in the text, overlaps aside (see :func:`_starts`)."""
        if a.literals not in self._at:
            self._at[a.literals] = [m.start() for m in a.finder.finditer(self.lowered)]
        return self._at[a.literals]


def _starts(a: Anchor, text: Text) -> list[tuple[int, int]] | None:
    """Ranges holding every position where a match could start, merged; None when they
    would cover too much of the text to be worth trying one by one. The finder skips a
    literal that starts inside one it found, so each range reaches further by the length
    of the longest literal."""
    if len(text.text) < _SHORT:
        return None
    if sum(map(text.lowered.count, a.literals)) * _SPARSE > len(text.text):
        return None
    at = text.at(a)
    extra = max(map(len, a.literals)) - 1 - a.lo
    ranges: list[tuple[int, int]] = []
    covered = 0
    for q in at:
        lo = 0 if a.hi is None else max(0, q - a.hi)
        if a.same_line:
            lo = max(lo, text.lowered.rfind("\n", 0, q) + 1)
        hi = min(q + extra, len(text.text) - 1)
        if hi < lo:
            continue
        if ranges and lo <= ranges[-1][1] + 1:
            covered += hi - ranges[-1][1]
            ranges[-1] = (ranges[-1][0], hi)
        else:
            covered += hi - lo + 1
            ranges.append((lo, hi))
    return None if covered * _SPARSE > len(text.text) else ranges


def finditer(pattern: re.Pattern[str], text: Text) -> Iterator[re.Match[str]]:
    """The matches of ``pattern.finditer(text.text)``, for any pattern (one the index does
    not know runs on the whole text)."""
    if not text.may_match(pattern):
        return iter(())
    a = text.index.anchor_of(pattern)
    ranges = _starts(a, text) if a is not None and a.bounded and text.aligned else None
    if ranges is None:
        return pattern.finditer(text.text)
    return _tried(pattern, text.text, ranges)


def _tried(
    pattern: re.Pattern[str], text: str, ranges: list[tuple[int, int]]
) -> Iterator[re.Match[str]]:
    """``finditer``'s matches, trying only the starts within ``ranges``, in order (matches
    are never empty here: an anchor is not bounded when they could be)."""
    end = 0
    for lo, hi in ranges:
        start = max(lo, end)
        while start <= hi:
            m = pattern.match(text, start)
            if m is None:
                start += 1
            else:
                yield m
                start = end = m.end()
