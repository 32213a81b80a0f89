"""The secret scanner's prefilter (daemon/secrets/prefilter.py) makes the scan faster and
never changes what it finds.

The scanner reaches its patterns only through ``prefilter.finditer``, the list of patterns a
text makes possible and ``Text.holds`` for rule keywords. So if, for every pattern the
scanner runs, ``prefilter.finditer`` gives exactly the matches of ``pattern.finditer``, no
pattern left out of the possible ones matches, and ``holds`` answers as ``in`` does, every
finding is the one the plain scan makes. That is checked on the labelled corpus (line by
line, and as one long text, since only long texts are scanned range by range) and on
generated texts made of the patterns' own literals, names, operators and values.
"""

from __future__ import annotations

import json
import random
import re
import string
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.secrets import scan_text
from daemon.secrets.prefilter import Text, anchor, finditer
from daemon.secrets.scan import patterns_index

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "secrets-dev.jsonl"


def assert_same_as_plain_scan(text: str) -> None:
    index = patterns_index()
    scanned = Text(text, index)
    possible = set(scanned.possible)
    for i, pattern in enumerate(index.patterns):
        plain = [(m.span(), m.groups()) for m in pattern.finditer(text)]
        fast = [(m.span(), m.groups()) for m in finditer(pattern, scanned)]
        assert fast == plain, pattern.pattern
        assert i in possible or not plain, pattern.pattern
    lowered = text.lower()
    for word in index.literals:
        assert scanned.holds([word]) == (word in lowered), word


def test_the_corpus_lines_match_as_in_a_plain_scan() -> None:
    if not CORPUS.is_file():
        pytest.skip(f"the shared corpus is absent ({CORPUS})")
    lines = [json.loads(row)["text"] for row in CORPUS.read_text(encoding="utf-8").splitlines()]
    for line in lines:
        assert_same_as_plain_scan(line)
    assert_same_as_plain_scan("\n".join(lines))


# Generated texts: pieces a match is made of, in any order and case, a few kilobytes long.
_WORDS = sorted(patterns_index().literals)
_PIECES = st.one_of(
    st.sampled_from(_WORDS),
    st.sampled_from(_WORDS).map(str.upper),
    st.sampled_from(["_", "-", ".", "db", "my", "by", "com", "api_", "ghp_", "xox", "s."]),
    st.sampled_from([" = ", ": ", "=", ":", "=>", "('", "')", '"', "'", "`", " ", "\t", "/"]),
    st.sampled_from(["\n", "\n\n", "://", "@", "-----BEGIN ", " KEY-----", "İ", "ı", "ſ"]),
    st.text(string.ascii_letters + string.digits, min_size=8, max_size=60),
    st.text(string.ascii_letters + string.digits + "+/=!#$%&*", min_size=8, max_size=40),
)


@settings(max_examples=25, deadline=None)
@given(st.lists(_PIECES, min_size=60, max_size=400))
def test_generated_texts_match_as_in_a_plain_scan(pieces: list[str]) -> None:
    assert_same_as_plain_scan("".join(pieces))


def test_the_characters_lower_casing_misplaces_are_scanned_whole() -> None:
    """Positions are read on the lower-cased text: a character that lower-cases to two, or
    that re's case-insensitive matching takes for an ASCII character while str.lower() does
    not, makes a text be scanned whole."""
    every = "".join(chr(c) for c in range(0x80, sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF)
    odd = {c for c in every if len(c.lower()) != 1}
    for ascii_char in map(chr, range(128)):
        found = re.finditer("(?i)" + re.escape(ascii_char), every)
        odd.update(m.group() for m in found if m.group().lower() != ascii_char.lower())
    assert odd
    assert not [c for c in odd if Text(f"password = 'x{c}y'", patterns_index()).aligned]
    assert Text("password = 'xy'", patterns_index()).aligned


def test_anchors_name_the_literals_every_match_holds() -> None:
    token = anchor(re.compile(r"\bghp_[0-9a-zA-Z]{36}"))
    assert token is not None
    assert (token.literals, token.lo, token.hi, token.same_line) == ({"ghp_"}, 0, 0, True)
    name = anchor(re.compile(r"(?i)[\w.-]{0,50}?(?:token|[Ss]ecret)[ \t]*=[ \t]*\S+"))
    assert name is not None
    assert (name.literals, name.lo, name.hi, name.same_line) == ({"token", "secret"}, 0, 50, True)
    ahead = anchor(re.compile(r"(?=\w*?key)\w+=\S+"))  # a lookahead's words count
    assert ahead is not None and ahead.literals == {"key"} and ahead.bounded
    across = anchor(re.compile(r"\s{0,5}key=\S+"))  # a line break may come before "key"
    assert across is not None and (across.hi, across.same_line) == (5, False)
    assert anchor(re.compile(r"(?:ab)?c+def")) is not None
    assert anchor(re.compile(r"[a-f0-9]{40}")) is None
    assert anchor(re.compile(r"(?:key)?[a-f0-9]{40}")) is None
    empty = anchor(re.compile(r"(?=secret)"))  # matches the empty string: never bounded
    assert empty is not None and not empty.bounded


def test_scanning_a_long_text_finds_its_secrets_on_their_lines() -> None:
    """The range-by-range path, through the scanner: a token far down a long file."""
    filler = "\n".join(f"value_{i} = compute({i}, key_size=32)" for i in range(400))
    token = "ghp_" + "".join(random.Random(14).choices(string.ascii_letters + string.digits, k=36))
    found = scan_text(f'{filler}\nGITHUB_TOKEN = "{token}"\n{filler}\n', "settings.py")
    assert [(f.rule, f.line) for f in found] == [("github-pat", 401)]
