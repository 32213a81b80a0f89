"""Keep secrets out of logs, ``.error.json`` and ``.review.json`` files, ``/status`` and messages.

One :class:`Redactor` masks, in every text it is given:

- the known secret values (the forge and server tokens) and their encodings: base64
  (standard and URL-safe, at each of the three byte alignments, so the token is found inside
  a longer base64 blob), hex (lower and upper case) and percent-encoding. These become ``***``;
- the credentials of any ``scheme://user:password@host`` URL: ``scheme://***@host``;
- every secret the detector (:func:`daemon.secrets.spans`) finds: vendor tokens, private key
  blocks (masked whole, across lines), generic ``password = "…"`` assignments. Each becomes
  ``***(<rule>)``, naming the rule that hid it (``***(github-pat)``, ``***(private-key)``).
  Inline allowlist comments (``gitleaks:allow``…) are ignored here: in a log line anyone could
  write one.

Where masks overlap they become one, shown as the first of known value, URL credentials,
detector rule. The detector's rules are compiled on first use, not at import: start-up time
matters, and this module is imported by everything that logs.

:class:`KnownSecrets` (the values and their encodings) is shared with the secret gate, which
reports them in a change as ``ticketd-known-secret``.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/\s:@]+(?::[^/\s@]*)?@", re.I)
MASK = "***"
# An encoded form shorter than this is not looked for: it would mask unrelated text.
MIN_ENCODED = 8
_URLSAFE = str.maketrans("+/", "-_")

_T = TypeVar("_T")


def rule_mask(rule: str) -> str:
    """The mask of a secret found by the detector's rule ``rule``: ``***(rule)``."""
    return f"{MASK}({rule})"


def base64_cores(raw: bytes) -> set[str]:
    """The base64 text of ``raw`` wherever it sits in a longer byte string.

    Base64 packs 3 bytes into 4 characters, so ``raw`` encodes differently at each of the 3
    byte alignments. For each, encode ``raw`` after that many filler bytes and keep the
    characters made of ``raw``'s bits alone (6 bits each: from bit ``8 * pad`` to bit
    ``8 * (pad + len(raw))``); the others depend on the neighbours. Standard and URL-safe."""
    cores: set[str] = set()
    for pad in range(3):
        encoded = base64.b64encode(bytes(pad) + raw).decode("ascii")
        first = -(-8 * pad // 6)  # the first character holding no filler bit
        last = 8 * (pad + len(raw)) // 6  # past the last character holding only raw's bits
        core = encoded[first:last]
        cores |= {core, core.translate(_URLSAFE)}
    return cores


def encodings(value: str) -> set[str]:
    """``value`` and the forms it takes encoded: base64 (see :func:`base64_cores`), hex in
    lower and upper case, percent-encoding. Encoded forms under :data:`MIN_ENCODED`
    characters are left out."""
    raw = value.encode("utf-8")
    forms = {raw.hex(), raw.hex().upper(), quote(value, safe=""), *base64_cores(raw)}
    return {value} | {f for f in forms if len(f) >= MIN_ENCODED}


class KnownSecrets:
    """Known secret values and their encodings, and where they occur in a text."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        unique = {v for v in values if v}
        forms = {form for v in unique for form in encodings(v)}
        self.values: tuple[str, ...] = tuple(sorted(unique, key=len, reverse=True))
        self.forms: tuple[str, ...] = tuple(sorted(forms, key=len, reverse=True))

    def __bool__(self) -> bool:
        return bool(self.values)

    def spans(self, text: str) -> Iterator[tuple[int, int]]:
        """``(start, end)`` of every occurrence of a value or an encoding, overlaps included."""
        for form in self.forms:
            at = text.find(form)
            while at >= 0:
                yield at, at + len(form)
                at = text.find(form, at + 1)


def merge_spans(spans: Iterable[tuple[int, int, _T]]) -> list[tuple[int, int, _T]]:
    """Overlapping spans joined into one, labelled as the first of them given (the order of
    ``spans`` is their priority); the result is sorted and disjoint."""
    ranked = sorted(
        ((start, end, rank, label) for rank, (start, end, label) in enumerate(spans)),
        key=lambda s: s[0],
    )
    merged: list[tuple[int, int, int, _T]] = []
    for start, end, rank, label in ranked:
        if merged and start < merged[-1][1]:
            m_start, m_end, m_rank, m_label = merged[-1]
            best = (rank, label) if rank < m_rank else (m_rank, m_label)
            merged[-1] = (m_start, max(end, m_end), *best)
        else:
            merged.append((start, end, rank, label))
    return [(start, end, label) for start, end, _, label in merged]


def apply_masks(text: str, spans: Sequence[tuple[int, int, str]]) -> str:
    """``text`` with each of the sorted, disjoint ``spans`` replaced by its mask."""
    if not spans:
        return text
    out: list[str] = []
    at = 0
    for start, end, mask in spans:
        out += (text[at:start], mask)
        at = end
    out.append(text[at:])
    return "".join(out)


def _url_credentials(text: str) -> Iterator[tuple[int, int]]:
    if "://" not in text:
        return
    for m in URL_CREDENTIALS.finditer(text):
        yield m.end("scheme"), m.end() - 1


def _detector(text: str) -> list[tuple[int, int, str]]:
    from daemon.secrets import spans  # ~200 compiled rules cost start-up time: load on first use

    return spans(text)


class Redactor:
    """Masks secrets in texts and in JSON-like data; see the module's docstring.

    ``secrets`` holds the known values; assigning it (or calling :meth:`update`) replaces
    them, as a configuration reload does. Safe to share between threads."""

    def __init__(self, known: Iterable[str] = ()) -> None:
        self._known = KnownSecrets(known)

    @property
    def secrets(self) -> tuple[str, ...]:
        return self._known.values

    @secrets.setter
    def secrets(self, known: Iterable[str]) -> None:
        self.update(known)

    def update(self, known: Iterable[str]) -> None:
        """Replace the known values (one assignment: a concurrent call sees old or new)."""
        self._known = KnownSecrets(known)

    def spans(self, text: str) -> list[tuple[int, int, str]]:
        """``(start, end, mask)`` of every secret in ``text``, sorted and disjoint."""
        known = self._known
        found: list[tuple[int, int, str]] = [(s, e, MASK) for s, e in known.spans(text)]
        found += [(s, e, MASK) for s, e in _url_credentials(text)]
        found += [(s, e, rule_mask(rule)) for s, e, rule in _detector(text)]
        return merge_spans(found)

    def __call__(self, text: str) -> str:
        return apply_masks(text, self.spans(text))

    def data(self, obj: _T) -> _T:
        """A copy of ``obj`` (dicts, lists, tuples, strings, numbers…) with every string in
        it, dictionary keys included, redacted; other values are returned as they are.

        A string value is also read after its key, as ``key = "value"``, since a value alone
        has lost its name: ``{"DB_PASSWORD": "…"}`` holds a password."""
        return self._data(obj)  # type: ignore[no-any-return]

    def _data(self, obj: Any) -> Any:
        if isinstance(obj, str):
            return self(obj)
        if isinstance(obj, dict):
            return {self._data(k): self._entry(k, v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._data(v) for v in obj]
        if isinstance(obj, tuple):
            return tuple(self._data(v) for v in obj)
        return obj

    def _entry(self, key: Any, value: Any) -> Any:
        if not (isinstance(key, str) and key and isinstance(value, str)):
            return self._data(value)
        head = f'{key} = "'
        start, end = len(head), len(head) + len(value)
        named = [
            (max(s, start) - start, min(e, end) - start, mask)
            for s, e, mask in self.spans(f'{head}{value}"')
            if s < end and e > start
        ]
        return apply_masks(value, merge_spans([*self.spans(value), *named]))
