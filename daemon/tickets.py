"""Backlog.md task files: read them, render new ones, edit their frontmatter in place.

A ticket is a Backlog.md task file (YAML frontmatter between ``---`` lines, then markdown
sections) or a plain markdown file without frontmatter. Sections are read the way Backlog.md
reads them (``src/markdown/structured-sections.ts``): a known ``## `` section runs until the
next known one, so unknown headings such as ``## Resolution`` belong to the section above;
text inside ``<!-- SECTION:...:BEGIN/END -->`` markers wins over text around them; checkboxes
inside ``<!-- AC:BEGIN/END -->`` win over legacy unmarked ones. Section texts come back with
``\\n`` line endings.

Edits never re-serialize a file: ``update_frontmatter`` swaps the lines of the keys it is
given and leaves every other byte as it was.

Nothing in a file can hurt the reader. ``read_bytes`` reads regular files only: it never
follows a symbolic link, never blocks on a FIFO and never reads past ``MAX_TICKET_BYTES``.
The frontmatter is read by ``daemon/frontmatter.py``, which bounds its depth and its size
with every alias expanded before any value is built. No pattern backtracks over a long line.
Whatever a file holds, ``parse_file`` raises ``InvalidTicket`` with a reason, or
``FileNotFoundError`` when the file has moved away, and nothing else.
"""

from __future__ import annotations

import codecs
import functools
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from daemon import files
from daemon.errors import InvalidTicket
from daemon.frontmatter import load as load_frontmatter

MAX_TICKET_BYTES = 1024 * 1024
MAX_ID_CHARS = 100  # ids become file and branch names
PRIORITIES = ("high", "medium", "low")
_MAX_FILENAME_BYTES = 255
_NO_WRAP = 1 << 30

_OPENING = re.compile(r"---[ \t]*\r?\n")
_FRONTMATTER = re.compile(r"---[ \t]*\r?\n(.*?)^---[ \t]*(?:\r?\n|\Z)", re.S | re.M)
# Patterns match a whole line; trailing blanks are stripped in code, never by a lazy group
# followed by ``[ \t]*``, which backtracks quadratically over a long run of blanks.
_KEY_LINE = re.compile(r"([^\s#'\"{}\[\]?:|>!&*%@`,-][^:\r\n]*):(?=[ \t\r\n]|$)")
_FENCE = re.compile(r" {0,3}(?:```|~~~)")
_H1 = re.compile(r"#[ \t]+(.+)")
_H2 = re.compile(r"##[ \t]+(.*)")
_MARKER = re.compile(r"<!--[ \t]*(SECTION:\w+|AC|DOD|COMMENTS):(BEGIN|END)[ \t]*-->", re.I)
_MODEL_LABEL = "model:"
_CHECKBOX = re.compile(r"- \[([ xX])\][ \t]+(?:#(\d+)[ \t]+)?(.+)")
_FILE_ID = re.compile(r"[A-Za-z][\w-]*?-\d+(?:\.\d+)*(?=$|[\s._-])")
_ID_PARTS = re.compile(r"(?:(.*)-)?(\d+(?:\.\d+)*)")
_SECTIONS = frozenset(  # Backlog.md's known ``## `` titles, lower-cased, "(Optional)" dropped
    (
        "description",
        "acceptance criteria",
        "implementation plan",
        "implementation notes",
        "definition of done",
        "final summary",
        "comments",
    )
)


@dataclass(frozen=True)
class Criterion:
    text: str
    checked: bool
    index: int | None  # the #N number when the file has one


@dataclass(frozen=True)
class Ticket:
    path: Path
    text: str  # the whole file as decoded, line endings untouched
    frontmatter: dict[str, Any]  # {} for plain markdown; values may be dates, ints, lists
    id: str
    title: str
    status: str | None
    priority: str | None  # "high", "medium", "low" or None
    labels: tuple[str, ...]
    dependencies: tuple[str, ...]
    models: tuple[str, ...]
    description: str
    acceptance_criteria: tuple[Criterion, ...]
    plan: str
    notes: str
    newline: str  # "\r\n" if the file uses CRLF else "\n"
    definition_of_done: tuple[Criterion, ...] = ()
    references: tuple[str, ...] = ()
    documentation: tuple[str, ...] = ()
    assignees: tuple[str, ...] = ()
    ordinal: float | None = None

    @functools.cached_property
    def words(self) -> frozenset[str]:
        """The distinct words of the title and description, for duplicate detection:
        computed once per parse (the backlog keeps a parsed ticket while its file is
        unchanged), not at every claim."""
        return frozenset(re.findall(r"\w+", f"{self.title} {self.description}".lower()))


def read_bytes(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``MAX_TICKET_BYTES``, read
    without following a link, blocking on a FIFO or reading past the limit.

    Raises InvalidTicket saying why for anything else: a link, a directory, a FIFO, a socket,
    a device, a file over the limit, one that cannot be opened or read. ``FileNotFoundError``
    passes through: the file has moved away.
    """
    try:
        return files.read_regular(path, MAX_TICKET_BYTES)
    except files.NotAFile as e:
        raise InvalidTicket(f"{e.kind}, not a file") from e
    except files.TooLarge as e:
        raise InvalidTicket(f"file is {e.size} bytes, over the 1 MiB limit") from e
    except FileNotFoundError:
        raise
    except OSError as e:
        raise InvalidTicket(os_reason(e)) from e


def os_reason(error: OSError) -> str:
    """An ``OSError`` met while reading a ticket, as the reason it is invalid."""
    return f"cannot read the file: {error.strerror or error}"


def read_text(path: Path) -> str:
    """Return the file decoded as UTF-8 (BOM dropped, newlines untouched).

    Raises InvalidTicket for what ``read_bytes`` refuses, a binary file or one that is not
    UTF-8; ``FileNotFoundError`` when the file has moved away.
    """
    data = read_bytes(path).removeprefix(codecs.BOM_UTF8)
    nul = data.find(b"\0")
    if nul >= 0:
        raise InvalidTicket(f"binary file: NUL byte on line {_line_of(data, nul)}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        byte, line = data[exc.start], _line_of(data, exc.start)
        raise InvalidTicket(f"not UTF-8: invalid byte 0x{byte:02x} on line {line}") from exc


def parse_file(path: Path) -> Ticket:
    return parse_text(read_text(path), path)


def parse_text(text: str, path: Path) -> Ticket:
    """Parse a ticket; ``path`` supplies the id and title when the file itself has none.

    ``description`` is the ``## Description`` section; a file without one (plain markdown, or
    frontmatter over free text) gets its whole body instead, less the heading used as title.
    """
    if not text.lstrip("\ufeff").strip():
        raise InvalidTicket("the file is empty")
    match = _match_frontmatter(text)
    frontmatter = load_frontmatter(match[1]) if match else {}
    lines = text[match.end() if match else 0 :].replace("\r\n", "\n").split("\n")
    sections = _scan(lines)
    title = _text(frontmatter.get("title"))
    title_line = None
    heading = None if title else _title_heading(lines)
    if heading is not None:
        title_line, title = heading
    description = _section_text(sections, "description")
    if match is None or not any(s.name == "description" for s in sections):
        description = "\n".join(ln for i, ln in enumerate(lines) if i != title_line).strip()
    priority = _text(frontmatter.get("priority")).lower()
    labels = _strings(frontmatter.get("labels"))
    models = _strings(frontmatter.get("model")) + _strings(frontmatter.get("models"))
    models += tuple(x[len(_MODEL_LABEL) :].strip() for x in labels if _is_model_label(x))
    ticket_id = _text(frontmatter.get("id")) or id_from_filename(path)
    if len(ticket_id) > MAX_ID_CHARS:
        raise InvalidTicket(f"id is {len(ticket_id)} characters; at most {MAX_ID_CHARS}")
    return Ticket(
        path=path,
        text=text,
        frontmatter=frontmatter,
        id=ticket_id,
        title=title or path.stem,
        status=_text(frontmatter.get("status")) or None,
        priority=priority if priority in PRIORITIES else None,
        labels=labels,
        dependencies=_strings(frontmatter.get("dependencies")),
        models=tuple(m for m in dict.fromkeys(models) if m),
        description=description,
        acceptance_criteria=_criteria(sections, "acceptance criteria"),
        plan=_section_text(sections, "implementation plan"),
        notes=_section_text(sections, "implementation notes"),
        newline=_newline(text),
        definition_of_done=_criteria(sections, "definition of done"),
        references=_strings(frontmatter.get("references")),
        documentation=_strings(frontmatter.get("documentation")),
        assignees=_strings(frontmatter.get("assignee")),
        ordinal=_number(frontmatter.get("ordinal")),
    )


def _is_model_label(label: str) -> bool:
    """``model:qwen2.5-coder:7b``: a label that names a model (labels survive every edit
    Backlog.md's CLI makes; an unknown frontmatter key such as ``model`` does not)."""
    return label.lower().startswith(_MODEL_LABEL)


def append_note(text: str, line: str) -> str:
    """Add ``line`` at the end of the ticket's Implementation Notes (Backlog.md's
    ``SECTION:NOTES`` block), making the section where there is none; every other byte stays.
    A line already there is not added twice."""
    newline = _newline(text)
    line = " ".join(line.split()).replace("<!--", "<!\u200b--")
    match = _match_frontmatter(text)
    start = match.end() if match else 0
    lines = _lines(text[start:])
    if any(ln.rstrip("\r\n") == line for ln in lines):
        return text
    names = [_section_name(ln) for ln in lines]
    at = next((i for i, n in enumerate(names) if n == "implementation notes"), None)
    if at is None:  # a new section, before the final summary when there is one
        end = next((i for i, n in enumerate(names) if n == "final summary"), len(lines))
        block = (
            f"## Implementation Notes{newline}{newline}<!-- SECTION:NOTES:BEGIN -->{newline}"
            f"{line}{newline}<!-- SECTION:NOTES:END -->{newline}"
        )
        head = "".join(lines[:end])
        if head and not head.endswith("\n"):
            head += newline
        gap = newline if head.strip() and not head.endswith(newline * 2) else ""
        tail = "".join(lines[end:])
        return text[:start] + head + gap + block + (newline if tail else "") + tail
    end = next((i for i in range(at + 1, len(lines)) if names[i]), len(lines))
    close = next(
        (i for i in range(at + 1, end) if lines[i].strip().upper() == "<!-- SECTION:NOTES:END -->"),
        None,
    )
    if close is None:  # no markers: after the section's last line of text
        close = end
        while close > at + 1 and not lines[close - 1].strip():
            close -= 1
    before = "".join(lines[:close])
    if before and not before.endswith("\n"):
        before += newline
    return text[:start] + before + line + newline + "".join(lines[close:])


def _section_name(line: str) -> str:
    """The known section a ``## `` heading line opens, or ""."""
    heading = _H2.fullmatch(line.rstrip("\r\n"))
    name = heading[1].rstrip(" \t").lower().removesuffix(" (optional)") if heading else ""
    return name if name in _SECTIONS else ""


def update_frontmatter(text: str, updates: Mapping[str, str | Sequence[str]]) -> str:
    """Set top-level frontmatter keys, keeping every other byte of ``text`` as it was.

    A key already present has its whole value replaced (scalar, block or flow list, folded
    block); a missing key is appended before the closing ``---``. Strings are written as
    scalars, sequences as block lists, all with the file's own newline. A file without
    frontmatter gets a new block holding just these keys in front of its text.
    """
    newline = _newline(text)
    match = _match_frontmatter(text)
    if match is None:
        block = "".join(_render_key(key, value, newline) for key, value in updates.items())
        return f"---{newline}{block}---{newline}{text}"
    lines = _lines(match[1])
    out: list[str] = []
    done: set[str] = set()
    i = 0
    while i < len(lines):
        key = _key_of(lines[i])
        if key is None or key not in updates:
            out.append(lines[i])
            i += 1
            continue
        end = i + 1
        while end < len(lines) and _key_of(lines[end]) is None:
            end += 1
        while end > i + 1 and lines[end - 1].strip()[:1] in ("", "#"):
            end -= 1  # blank lines and comments after the value stay
        out.append(_render_key(key, updates[key], newline))
        done.add(key)
        i = end
    out.extend(
        _render_key(key, value, newline) for key, value in updates.items() if key not in done
    )
    start, stop = match.span(1)
    return text[:start] + "".join(out) + text[stop:]


def render_new(
    ticket_id: str,
    title: str,
    *,
    description: str = "",
    priority: str | None = None,
    labels: Sequence[str] = (),
    acceptance_criteria: Sequence[str] = (),
    status: str = "To Do",
    assignee: Sequence[str] = (),
    created: datetime,
) -> str:
    """A new task file laid out as Backlog.md writes one.

    Like Backlog.md, an empty description or criteria list leaves its section out.
    """
    if priority is not None and priority.lower() not in PRIORITIES:
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")
    head = [
        _render_key("id", ticket_id, "\n"),
        _render_key("title", " ".join(title.split()), "\n"),
        _render_key("status", status, "\n"),
        _render_key("assignee", list(assignee), "\n"),
        _render_key("created_date", created.strftime("%Y-%m-%d %H:%M"), "\n"),
        _render_key("labels", list(labels), "\n"),
        "dependencies: []\n",
    ]
    if priority is not None:
        head.append(_render_key("priority", priority.lower(), "\n"))
    blocks = []
    body = description.replace("\r\n", "\n").strip()
    if body:
        blocks.append(
            "## Description\n\n<!-- SECTION:DESCRIPTION:BEGIN -->\n"
            f"{body}\n<!-- SECTION:DESCRIPTION:END -->"
        )
    items = [" ".join(item.split()) for item in acceptance_criteria if item.strip()]
    if items:
        checks = "".join(f"- [ ] #{n} {item}\n" for n, item in enumerate(items, start=1))
        blocks.append(f"## Acceptance Criteria\n<!-- AC:BEGIN -->\n{checks}<!-- AC:END -->")
    text = "---\n" + "".join(head) + "---\n"
    return text + "\n" + "\n\n".join(blocks) + "\n" if blocks else text


def filename_for(ticket_id: str, title: str) -> str:
    """``task-42 - Fix-login-redirect.md``: Backlog.md's file name, at most 255 bytes."""
    name = re.sub(r'[<>:"/\\|?*]', "-", title)
    name = re.sub(r"['(),!@#$%^&+=\[\]{};]", "", name)
    name = re.sub(r"\s+", "-", name)
    name = re.sub(r"[\x00-\x1f\x7f]", "", name)
    name = re.sub(r"-+", "-", name).strip("-")
    prefix = ticket_id.strip().lower()
    budget = _MAX_FILENAME_BYTES - len(f"{prefix} - .md".encode())
    name = name.encode()[: max(budget, 0)].decode("utf-8", "ignore").rstrip("-")
    return f"{prefix} - {name}.md" if name else f"{prefix}.md"


def slug(text: str, max_len: int = 40) -> str:
    """Lower-case ASCII ``[a-z0-9-]`` for branch names; accents dropped, never empty."""
    if max_len < 1:
        raise ValueError("max_len must be at least 1")
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    words = re.findall(r"[a-z0-9]+", ascii_text.lower())
    return "-".join(words)[:max_len].strip("-") or "ticket"[:max_len]


def next_id(existing_ids: Iterable[str], prefix: str = "task", width: int = 0) -> str:
    """The number after the largest ``<prefix>-N`` (``task-4.2`` counts as 4), zero padding
    kept (or ``width`` digits at least)."""
    pattern = re.compile(rf"{re.escape(prefix)}-(\d+)(?:\.\d+)*", re.I)
    largest, padded = 0, 0
    for ticket_id in existing_ids:
        found = pattern.fullmatch(ticket_id.strip())
        if found and int(found[1]) >= largest:
            largest = int(found[1])
            padded = len(found[1]) if found[1].startswith("0") else 0
    return f"{prefix}-{str(largest + 1).zfill(max(width, padded))}"


def id_key(ticket_id: str) -> tuple[str, tuple[int, ...], str]:
    """Sort key: prefix, then each dotted number (``task-2`` < ``task-10`` < ``task-10.1``)."""
    folded = ticket_id.strip().casefold()
    parts = _ID_PARTS.fullmatch(folded)
    if parts is None:
        return (folded, (), folded)
    return (parts[1] or "", tuple(int(n) for n in parts[2].split(".")), folded)


def same_id(a: str, b: str) -> bool:
    return a.strip().casefold() == b.strip().casefold()


def _match_frontmatter(text: str) -> re.Match[str] | None:
    start = 1 if text.startswith("\ufeff") else 0
    if not _OPENING.match(text, start):
        return None
    match = _FRONTMATTER.match(text, start)
    if match is None:
        raise InvalidTicket("unclosed YAML frontmatter: the --- on line 1 has no closing ---")
    return match


def _key_of(line: str) -> str | None:
    match = _KEY_LINE.match(line)
    return match[1].rstrip(" \t") if match else None


def _render_key(key: str, value: str | Sequence[str], newline: str) -> str:
    if isinstance(value, str):
        return f"{key}: {_scalar(value)}{newline}"
    if not value:
        return f"{key}: []{newline}"
    return f"{key}:{newline}" + "".join(f"  - {_scalar(item)}{newline}" for item in value)


def _scalar(value: str) -> str:
    """One line of YAML that reads back as ``value``; quoted like Backlog.md when it has a colon."""
    style = '"' if not value.isprintable() else ("'" if ":" in value else None)
    dumped = yaml.safe_dump(value, default_style=style, allow_unicode=True, width=_NO_WRAP)
    return dumped.removesuffix("\n...\n").removesuffix("\n")


@dataclass
class _Section:
    name: str
    loose: list[str] = field(default_factory=list)  # lines outside markers
    marked: list[str] = field(default_factory=list)  # lines between BEGIN/END markers
    has_markers: bool = False


def _scan(lines: list[str]) -> list[_Section]:
    """Split body lines into known ``## `` sections, honouring code fences and markers."""
    last_end: dict[str, int] = {}
    for i, line in enumerate(lines):
        marker = _MARKER.fullmatch(line.strip())
        if marker and marker[2].upper() == "END":
            last_end[marker[1].upper()] = i
    sections: list[_Section] = []
    current: _Section | None = None
    inside: str | None = None  # the marker whose END closes the open block
    fenced = False
    for i, line in enumerate(lines):
        marker = _MARKER.fullmatch(line.strip())
        if inside is not None:
            if marker and marker[1].upper() == inside and marker[2].upper() == "END":
                inside = None
            elif current is not None:
                current.marked.append(line)
            continue
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            name = _section_name(line)
            if name:
                current = _Section(name)
                sections.append(current)
                continue
            if marker and marker[2].upper() == "BEGIN" and last_end.get(marker[1].upper(), -1) > i:
                inside = marker[1].upper()
                if current is not None:
                    current.has_markers = True
                continue
        if current is not None:
            current.loose.append(line)
    return sections


def _section_text(sections: list[_Section], name: str) -> str:
    for section in sections:
        if section.name == name:
            return "\n".join(section.marked).strip() or "\n".join(section.loose).strip()
    return ""


def _criteria(sections: list[_Section], name: str) -> tuple[Criterion, ...]:
    marked: list[Criterion] = []
    legacy: list[Criterion] = []
    for section in sections:
        if section.name == name:
            if section.has_markers:
                marked.extend(_checkboxes(section.marked))
            else:
                legacy.extend(_checkboxes(section.loose))
    return tuple(marked or legacy)


def _checkboxes(lines: list[str]) -> list[Criterion]:
    found = (_CHECKBOX.fullmatch(line) for line in lines)
    return [
        Criterion(
            text=m[3].rstrip(" \t") or m[3], checked=m[1] != " ", index=int(m[2]) if m[2] else None
        )
        for m in found
        if m
    ]


def _title_heading(lines: list[str]) -> tuple[int, str] | None:
    """The first ``# `` heading outside code fences: its line index and text."""
    fenced = False
    for i, line in enumerate(lines):
        heading = None if fenced else _H1.fullmatch(line)
        if _FENCE.match(line):
            fenced = not fenced
        elif heading:
            return i, _closing_hashes_dropped(heading[1]).strip()
    return None


def _closing_hashes_dropped(text: str) -> str:
    """``Title ##`` -> ``Title``: an ATX heading's closing run of ``#``, after a blank."""
    text = text.rstrip(" \t")
    bare = text.rstrip("#")
    if bare != text and bare[-1:] in (" ", "\t") and bare.strip(" \t"):
        return bare.rstrip(" \t")
    return text


def id_from_filename(path: Path) -> str:
    found = _FILE_ID.match(path.stem)
    return found[0] if found else path.stem


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _strings(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list | tuple) else [value]
    return tuple(text for text in (_text(item) for item in items) if text)


def _number(value: Any) -> float | None:
    try:
        return float(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def _newline(text: str) -> str:
    first = text.find("\n")
    return "\r\n" if first > 0 and text[first - 1] == "\r" else "\n"


def _lines(text: str) -> list[str]:
    """Lines with their endings, split on ``\\n`` only (``str.splitlines`` splits on more)."""
    return re.findall(r"[^\n]*\n|[^\n]+", text)


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1
