"""A ticket's YAML frontmatter, read so that no file can take unbounded time, memory or
stack: the node graph is composed first (by libyaml when it is there), walked once to measure
its depth and its size with every alias expanded, and only then built into values.

Limits: ``MAX_YAML_DEPTH`` levels, ``MAX_YAML_VALUES`` keys and values, ``MAX_YAML_TEXT``
characters of scalars, numbers of at most ``MAX_NUMBER_CHARS`` characters (all with aliases
expanded). ``key: @value``, which Backlog.md writes although it is not YAML, is read as
Backlog.md reads it back.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.nodes import CollectionNode, MappingNode, Node, ScalarNode

from daemon.errors import InvalidTicket

MAX_YAML_DEPTH = 32  # nested values, aliases expanded
MAX_YAML_VALUES = 10_000  # keys and values, each alias counted every time it is used
MAX_YAML_TEXT = 1024 * 1024  # characters of all scalars, aliases expanded
MAX_NUMBER_CHARS = 64  # an int or float scalar; longer ones are slow to build or to print
_AT_SCALAR = re.compile(r"^([ \t]*(?:[^\s#:][^:\r\n]*:|-)[ \t]+)(@[^\r\n]*)(\r?)$", re.M)
_AT_FLOW = re.compile(r"^([ \t]*[^\s#:][^:\r\n]*:[ \t]*\[)([^\r\n\]]*)(\])", re.M)


def load(source: str) -> dict[str, Any]:
    """The frontmatter's keys and values; InvalidTicket for broken YAML (with its line), YAML
    past the limits, or anything but a mapping."""
    try:
        data = _safe_load(source)
    except (yaml.YAMLError, ValueError) as exc:
        data = _load_quoting_at_signs(source, exc)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidTicket(f"YAML frontmatter is a {type(data).__name__}, not a mapping of keys")
    return {str(key): value for key, value in data.items()}


def _load_quoting_at_signs(source: str, error: Exception) -> Any:
    """Retry with ``key: @value`` quoted: Backlog.md wrote such invalid YAML and reads it back."""
    fixed = _AT_SCALAR.sub(_quote_at_scalar, source)
    fixed = _AT_FLOW.sub(_quote_at_flow, fixed)
    if fixed != source:
        try:
            return _safe_load(fixed)
        except (yaml.YAMLError, ValueError):
            pass
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        raise InvalidTicket(
            f"broken YAML frontmatter on line {_line(error.problem_mark)}: {error.problem}"
        ) from error
    raise InvalidTicket(f"broken YAML frontmatter: {error}") from error


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _quote_at_scalar(match: re.Match[str]) -> str:
    value = match[2].rstrip(" \t")
    return match[1] + _quote(value) + match[2][len(value) :] + match[3]


def _quote_at_flow(match: re.Match[str]) -> str:
    if "@" not in match[2]:
        return match[0]
    return match[1] + ", ".join(map(_quote_at, match[2].split(","))) + match[3]


def _quote_at(item: str) -> str:
    return _quote(item.strip()) if item.strip().startswith("@") else item.strip()


# -- bounded YAML --------------------------------------------------------------------------


class _PyLoader(yaml.SafeLoader):
    """PyYAML's own loader, whose composer recurses once per level: it stops at
    ``MAX_YAML_DEPTH``, long before Python's recursion limit. (libyaml stops at 1000 levels,
    in C.)"""

    depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        if self.depth >= MAX_YAML_DEPTH:
            event = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in the stubs
            raise _too_deep(event.start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


_C_LOADER: type[yaml.CSafeLoader] | None = getattr(yaml, "CSafeLoader", None)
_TAG = "tag:yaml.org,2002:"
_CHECKED_TAGS = frozenset(("int", "float", "bool", "timestamp"))  # built from text we check


def _safe_load(source: str) -> Any:
    """``yaml.safe_load`` that refuses what would take unbounded time, memory or stack: see
    ``_check_graph``. Raises ``yaml.YAMLError`` or ``ValueError`` for broken YAML (with the
    messages PyYAML has always given), ``InvalidTicket`` for YAML past the limits."""
    loader, node = _compose(source)
    try:
        if node is None:
            return None
        _check_graph(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _compose(source: str) -> tuple[yaml.CSafeLoader | _PyLoader, Node | None]:
    """The node graph, composed by libyaml when it is there. A document libyaml refuses is
    composed again by PyYAML, so that its errors read as they always have."""
    if _C_LOADER is not None:
        c_loader = _C_LOADER(source)
        try:
            return c_loader, c_loader.get_single_node()
        except yaml.YAMLError:
            c_loader.dispose()
    loader = _PyLoader(source)
    try:
        return loader, loader.get_single_node()
    except BaseException:
        loader.dispose()
        raise


def _check_graph(root: Node) -> None:
    """Refuse a frontmatter whose values, every alias expanded each time it is used, nest
    deeper than ``MAX_YAML_DEPTH``, count more than ``MAX_YAML_VALUES`` or more than
    ``MAX_YAML_TEXT`` characters, or contain themselves; and values PyYAML would build
    slowly or crash on: a number over ``MAX_NUMBER_CHARS``, a value that does not fit its
    explicit tag (``!!bool maybe``, ``!!timestamp`` on a mapping).

    One iterative depth-first walk; each node is measured once (memoized on its identity),
    so an alias bomb costs what its text costs.
    """
    measured: dict[int, tuple[int, int, int]] = {}  # id(node) -> height, values, characters
    on_path: set[int] = set()  # the node in hand and its ancestors
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        if finished:
            on_path.discard(id(node))
            kids = _children(node)
            height = 1 + max((measured[id(k)][0] for k in kids), default=0)
            values = 1 + sum(measured[id(k)][1] for k in kids)
            chars = sum(measured[id(k)][2] for k in kids)
            if isinstance(node, ScalarNode):
                chars += len(node.value)
            if values > MAX_YAML_VALUES:
                raise _too_many(node)
            if chars > MAX_YAML_TEXT:
                raise InvalidTicket(
                    f"YAML frontmatter has more than {MAX_YAML_TEXT} characters with its "
                    f"aliases expanded (line {_line(node.start_mark)})"
                )
            measured[id(node)] = (height, values, chars)
            continue
        depth = len(on_path) + 1
        if id(node) in measured:  # an alias: its parent counts it again, perhaps deeper
            if depth + measured[id(node)][0] - 1 > MAX_YAML_DEPTH:
                raise _too_deep(_deepest(node, depth, measured).start_mark)
            continue
        if id(node) in on_path:
            raise InvalidTicket(
                f"YAML frontmatter: the value on line {_line(node.start_mark)} contains itself"
            )
        if depth > MAX_YAML_DEPTH:
            raise _too_deep(node.start_mark)
        if len(measured) + len(on_path) >= MAX_YAML_VALUES:  # distinct ones: no need to go on
            raise _too_many(node)
        _check_tag(node)
        on_path.add(id(node))
        stack.append((node, True))
        stack.extend((k, False) for k in reversed(_children(node)))


def _children(node: Node) -> list[Node]:
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, CollectionNode):
        return list(node.value)
    return []


def _deepest(node: Node, depth: int, measured: dict[int, tuple[int, int, int]]) -> Node:
    """The first node below ``node`` (at ``depth``) that lies past ``MAX_YAML_DEPTH``."""
    while depth <= MAX_YAML_DEPTH:
        need = MAX_YAML_DEPTH - depth  # the height a child needs to reach past the limit
        node = next(k for k in _children(node) if measured[id(k)][0] > need)
        depth += 1
    return node


def _too_many(node: Node) -> InvalidTicket:
    return InvalidTicket(
        f"YAML frontmatter has more than {MAX_YAML_VALUES} values with its aliases expanded "
        f"(line {_line(node.start_mark)})"
    )


def _too_deep(mark: yaml.Mark) -> InvalidTicket:
    return InvalidTicket(
        f"YAML frontmatter nests deeper than {MAX_YAML_DEPTH} levels (line {_line(mark)})"
    )


def _check_tag(node: Node) -> None:
    tag = node.tag.removeprefix(_TAG)
    if not isinstance(node, ScalarNode):
        if tag in _CHECKED_TAGS:  # PyYAML takes the text from a ``=`` key, unchecked
            raise InvalidTicket(
                f"broken YAML frontmatter on line {_line(node.start_mark)}: "
                f"a !!{tag} must be a scalar, not a {_kind(node)}"
            )
        return
    if tag in ("int", "float") and len(node.value) > MAX_NUMBER_CHARS:
        raise InvalidTicket(
            f"YAML frontmatter: the number on line {_line(node.start_mark)} has "
            f"{len(node.value)} characters; at most {MAX_NUMBER_CHARS}"
        )
    if tag == "bool":
        valid = node.value.lower() in _PyLoader.bool_values
    elif tag == "timestamp":
        valid = _PyLoader.timestamp_regexp.match(node.value) is not None
    elif tag in ("int", "float"):
        valid = node.value.replace("_", "") not in ("", "+", "-")
    else:
        return
    if not valid:  # an explicit tag on a value PyYAML fails on with KeyError, IndexError...
        raise InvalidTicket(
            f"broken YAML frontmatter on line {_line(node.start_mark)}: "
            f"{_clip(node.value)!r} is not a valid !!{tag}"
        )


def _kind(node: Node) -> str:
    return "mapping" if isinstance(node, MappingNode) else "sequence"


def _line(mark: yaml.Mark) -> int:
    """The line in the ticket file of a mark in its frontmatter."""
    return mark.line + 2  # + the opening --- line, + 1-based


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
