"""A fenced answer for an existing file: the whole file, or a part of it merged by name.

A small model asked to change one function often answers with that function alone, in a
fence under the file's path. Written as the file, that drops the rest of it (aider's
whole-file misses). ``whole`` tells the two apart; ``merge_python`` puts each definition of
the part in place of the file's one of the same name (a class's methods one by one) and
adds the new ones, and the imports the part adds go after the file's.
"""

from __future__ import annotations

import ast

DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def whole(path: str, original: str, new: str) -> str | None:
    """The file's text after a fenced answer for it: the merge when it is a part of a Python
    file, else ``new`` when it reads as the whole file (the file is short, or ``new`` has
    most of its length), else None: a part of a file that cannot be merged."""
    merged = merge_python(original, new) if path.endswith(".py") else None
    if merged is not None:
        return merged
    short = original.count("\n") < 10
    return new if short or len(new) >= 0.6 * len(original) else None


def merge_python(original: str, new: str) -> str | None:
    """``new`` when it is the whole file: it keeps every definition of ``original``, a
    class's methods too (``_drops``). Else a part: ``new``'s definitions merged into
    ``original`` by name, a class's methods one by one, and its missing imports added after
    the file's; what it lacks is kept, never dropped. None when either does not parse."""
    try:
        a, b = ast.parse(original), ast.parse(new)
    except (SyntaxError, ValueError):
        return None
    first = next((line for line in original.splitlines() if line.strip()), "")
    if not _drops(a.body, b.body, renamed=new.lstrip().startswith(first)):
        return new
    old_lines, new_lines = original.splitlines(keepends=True), new.splitlines(keepends=True)
    changes = _merge(a.body, b.body, new_lines, len(old_lines))
    imports = [
        "".join(new_lines[n.lineno - 1 : n.end_lineno])
        for n in b.body
        if isinstance(n, ast.Import | ast.ImportFrom)
    ]
    missing = [i for i in imports if i.strip() not in {line.strip() for line in old_lines}]
    if missing:
        last = max(
            (n.end_lineno or 0 for n in a.body if isinstance(n, ast.Import | ast.ImportFrom)),
            default=_after_docstring(a),
        )
        changes.append((last, last, "".join(missing)))
    for start, end, text in sorted(changes, key=lambda c: (c[0], c[1]), reverse=True):
        old_lines[start:end] = [text]
    merged = "".join(old_lines)
    return merged if merged.endswith("\n") else merged + "\n"


def _drops(mine: list[ast.stmt], theirs: list[ast.stmt], *, renamed: bool = False) -> bool:
    """Whether ``theirs`` lacks a definition of ``mine`` (at the top or in a class both
    have). Lacking one but having as many is a rename, where ``renamed`` allows it (at the
    top: the text starts as the file does)."""
    a = {n.name: n for n in mine if isinstance(n, DEFS)}
    b = {n.name: n for n in theirs if isinstance(n, DEFS)}
    if set(a) - set(b) and not (renamed and len(b) >= len(a)):
        return True
    both = a.keys() & b.keys()
    return any(
        _drops(x.body, y.body, renamed=True)
        for x, y in ((a[k], b[k]) for k in both)
        if isinstance(x, ast.ClassDef) and isinstance(y, ast.ClassDef)
    )


Change = tuple[int, int, str]  # replace old lines [start, end) (0-based) with text


def _merge(
    mine: list[ast.stmt], theirs: list[ast.stmt], new_lines: list[str], end: int
) -> list[Change]:
    """The changes that put each definition of ``theirs`` in place of ``mine``'s of the same
    name (a class present in both: method by method), new ones at ``end``."""
    by_name = {n.name: n for n in mine if isinstance(n, DEFS)}
    changes: list[Change] = []
    added: list[str] = []
    for node in theirs:
        if not isinstance(node, DEFS):
            continue
        text = "".join(new_lines[_start(node) : node.end_lineno])
        old = by_name.get(node.name)
        if old is None:
            added.append(text)
        elif (
            isinstance(old, ast.ClassDef)
            and isinstance(node, ast.ClassDef)
            and not (
                {n.name for n in old.body if isinstance(n, DEFS)}
                <= {n.name for n in node.body if isinstance(n, DEFS)}
            )
        ):
            changes += _merge(old.body, node.body, new_lines, old.end_lineno or end)
        else:
            changes.append((_start(old), old.end_lineno or end, text))
    if added:
        indent = "\n\n" if not mine or mine[0].col_offset == 0 else "\n"
        changes.append((end, end, "".join(indent + text for text in added)))
    return changes


def _start(node: ast.stmt) -> int:
    decorators: list[ast.expr] = getattr(node, "decorator_list", [])
    return min([node.lineno, *(d.lineno for d in decorators)]) - 1


def _after_docstring(tree: ast.Module) -> int:
    first = tree.body[0] if tree.body else None
    doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    return (first.end_lineno or 0) if doc and first is not None else 0
