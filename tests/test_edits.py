"""SEARCH/REPLACE blocks: tolerant parsing, matching levels, refusing unsafe paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon.agent.edits import Applied, Edit, Failure, apply, describe_failures, parse, resolve
from daemon.errors import TicketdError

APP = "def total(items):\n    return sum(items)\n"


def block(search: str, replace: str, *, marks: tuple[int, int, int] = (7, 7, 7)) -> str:
    s, d, r = marks
    return f"{'<' * s} SEARCH\n{search}{'=' * d}\n{replace}{'>' * r} REPLACE\n"


AB = block("a\n", "b\n")


def edit(path: str, search: str, replace: str, index: int = 1) -> Edit:
    return Edit(path=path, search=search, replace=replace, index=index)


def parse_error(answer: str) -> str:
    with pytest.raises(TicketdError) as info:
        parse(answer)
    assert info.value.code == "EDIT_PARSE_FAILED"
    return info.value.message


def tree(root: Path) -> dict[str, str | bytes]:
    """Every file (its bytes), symlink (its target) and folder under ``root``."""
    found: dict[str, str | bytes] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[rel] = "-> " + os.readlink(path)
            elif path.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = path.read_bytes()
    return found


# -- parse --------------------------------------------------------------------------------


def test_parse_fenced_block() -> None:
    answer = "Here is the fix.\n\nsrc/app.py\n```python\n" + block("a = 1\n", "a = 2\n") + "```\n"
    assert parse(answer) == [edit("src/app.py", "a = 1\n", "a = 2\n")]


def test_parse_unfenced_block_and_tilde_fence() -> None:
    assert parse(f"src/app.py\n{AB}") == [edit("src/app.py", "a\n", "b\n")]
    assert parse(f"src/app.py\n~~~\n{AB}~~~\n") == [edit("src/app.py", "a\n", "b\n")]
    assert parse(f"src/app.py\n~~~ python\n{AB}~~~\n") == [edit("src/app.py", "a\n", "b\n")]


@pytest.mark.parametrize("marks", [(5, 5, 5), (7, 7, 7), (9, 9, 9), (5, 9, 7)])
def test_parse_marker_lengths(marks: tuple[int, int, int]) -> None:
    answer = "x.py\n" + block("a\n", "b\n", marks=marks)
    assert parse(answer) == [edit("x.py", "a\n", "b\n")]


def test_parse_lowercase_markers_with_spaces() -> None:
    answer = "x.py\n  <<<<<<<search  \n a\n =======\t\n b\n>>>>>>>   replace\n"
    assert parse(answer) == [edit("x.py", " a\n", " b\n")]


def test_parse_too_few_or_many_marker_chars_are_text() -> None:
    assert parse("x.py\n<<<< SEARCH\na\n====\nb\n>>>> REPLACE\n") == []
    assert parse("x.py\n<<<<<<<<<< SEARCH\n") == []


@pytest.mark.parametrize(
    "line",
    [
        "src/app.py",
        "`src/app.py`",
        "**src/app.py**",
        "src/app.py:",
        "**`src/app.py`**:",
        "**src/app.py:**",
        "### src/app.py",
        "File: src/app.py",
        "**File:** `src/app.py`",
        "  src/app.py  ",
    ],
)
def test_parse_path_decorations(line: str) -> None:
    answer = f"{line}\n```python\n{AB}```\n"
    assert parse(answer) == [edit("src/app.py", "a\n", "b\n")]


def test_parse_path_inside_the_fence_and_blank_lines() -> None:
    assert parse(f"```python\nsrc/app.py\n\n{AB}```\n") == [edit("src/app.py", "a\n", "b\n")]
    assert parse(f"src/app.py\n\n```\n\n{AB}```\n") == [edit("src/app.py", "a\n", "b\n")]


def test_parse_several_blocks_files_and_prose() -> None:
    one, two, three = block("1\n", "2\n"), block("3\n", "4\n"), block("5\n", "6\n")
    docs = block("old\n", "new\nmore\n")
    answer = (
        "I will change two files.\n\n"
        f"a.py\n```python\n{one}```\n\n"
        f"Then the second place in the same file:\n\n```python\n{two}```\n"
        f"{three}\n"
        "And the docs, `b.md`, need a line:\n\n"
        f"**docs/b.md**\n{docs}"
        "That is all.\n"
    )
    assert parse(answer) == [
        edit("a.py", "1\n", "2\n", 1),
        edit("a.py", "3\n", "4\n", 2),
        edit("a.py", "5\n", "6\n", 3),
        edit("docs/b.md", "old\n", "new\nmore\n", 4),
    ]


def test_parse_label_line_is_not_a_path() -> None:
    answer = f"a.py\n{AB}\nChanges:\n```\n{AB}```\n"
    assert [e.path for e in parse(answer)] == ["a.py", "a.py"]
    assert parse(f"Makefile\n{AB}")[0].path == "Makefile"


def test_parse_create_and_delete_blocks() -> None:
    answer = "new/mod.py\n" + block("", "x = 1\n") + "\nold.py\n" + block("gone\n", "")
    assert parse(answer) == [edit("new/mod.py", "", "x = 1\n", 1), edit("old.py", "gone\n", "", 2)]


def test_parse_keeps_blank_lines_and_crlf_answer() -> None:
    answer = "x.py\r\n<<<<<<< SEARCH\r\na\r\n\r\nb\r\n=======\r\n\r\n>>>>>>> REPLACE\r\n"
    assert parse(answer) == [edit("x.py", "a\n\nb\n", "\n")]


def test_parse_no_blocks() -> None:
    assert parse("") == []
    assert parse("I could not find anything to change.\n```python\nx = 1\n```\n") == []


def test_parse_missing_divider() -> None:
    answer = f"a.py\n{AB}\nb.py\n<<<<<<< SEARCH\nold\n>>>>>>> REPLACE\n"
    assert parse_error(answer) == (
        "block 2 (line 9 of the answer): missing '=======' between SEARCH and REPLACE"
    )
    assert parse_error("a.py\n<<<<<<< SEARCH\nold\n") == (
        "block 1 (line 2 of the answer): missing '=======' between SEARCH and REPLACE"
    )


def test_parse_missing_replace() -> None:
    answer = "a.py\n<<<<<<< SEARCH\nold\n=======\nnew\n```\n"
    assert parse_error(answer) == (
        "block 1 (line 2 of the answer): missing '>>>>>>> REPLACE' at its end"
    )
    answer = "a.py\n<<<<<<< SEARCH\n1\n=======\n2\n<<<<<<< SEARCH\n3\n=======\n4\n>>>>>>> REPLACE\n"
    assert parse_error(answer) == (
        "block 1 (line 2 of the answer): missing '>>>>>>> REPLACE' at its end"
    )


def test_parse_block_without_path() -> None:
    assert parse_error(f"Here you go:\n\n```python\n{AB}```\n") == (
        "block 1 (line 4 of the answer): no file path before it; put the path on its own line"
    )


def test_parse_replace_without_search() -> None:
    answer = f"a.py\n{AB}b.py\nold\n=======\nnew\n>>>>>>> REPLACE\n"
    assert parse_error(answer) == (
        "block 2 (line 11 of the answer): '>>>>>>> REPLACE' without '<<<<<<< SEARCH' before it"
    )


# -- parse: where aider is more tolerant ----------------------------------------------------


def test_parse_divider_ends_a_block() -> None:
    answer = f"a.py\n<<<<<<< SEARCH\nold\n=======\nnew\n=======\n\nb.py\n{AB}"
    assert parse(answer) == [edit("a.py", "old\n", "new\n", 1), edit("b.py", "a\n", "b\n", 2)]
    assert parse("a.py\n<<<<<<< SEARCH\nold\n=======\nnew\n=======") == [
        edit("a.py", "old\n", "new\n")
    ]


DOUBLED = [
    "=======\n=======\nnew\n",  # the divider twice in a row
    "=======\n\n=======\nnew\n",
    "=======\nnew\n=======\n",  # a stray divider before the end
    "=======\nnew\n=======\n=======\n",
]


@pytest.mark.parametrize("middle", DOUBLED)
def test_parse_doubled_divider(root: Path, middle: str) -> None:
    answer = f"src/app.py\n<<<<<<< SEARCH\n    return sum(items)\n{middle}>>>>>>> REPLACE\n"
    answer = answer.replace("new\n", "    return 0\n")
    edits = parse(answer)
    assert edits == [edit("src/app.py", "    return sum(items)\n", "    return 0\n")]
    assert apply(root, edits).changed == ("src/app.py",)
    assert "=======" not in (root / "src/app.py").read_text()


def test_parse_doubled_divider_with_two_replacements_is_refused() -> None:
    answer = "a.py\n<<<<<<< SEARCH\nold\n=======\nnew\n=======\nnewer\n>>>>>>> REPLACE\n"
    assert parse_error(answer) == (
        "block 1 (line 2 of the answer): '=======' on lines 4, 6; put exactly one between "
        "SEARCH and REPLACE"
    )


@pytest.mark.parametrize(
    "stray",
    ["...", "----", "```", "```\n```python", "~~~\n~~~", "python", "```\npython", "Python:"],
)
def test_parse_stray_line_is_not_a_path(stray: str) -> None:
    answer = f"a.py\n```python\n{AB}```\n\n{stray}\n{AB}"
    assert [e.path for e in parse(answer)] == ["a.py", "a.py"]
    line = len(stray.splitlines()) + 1
    assert parse_error(f"{stray}\n{AB}") == (
        f"block 1 (line {line} of the answer): no file path before it; put the path on its own line"
    )


def test_parse_stray_line_hides_an_earlier_path() -> None:
    assert parse_error(f"src/app.py\n...\n{AB}") == (
        "block 1 (line 3 of the answer): no file path before it; put the path on its own line"
    )


def test_parse_path_fenced_on_its_own() -> None:
    answer = f"Here:\n\n ```python\nfoo.txt\n```\n```python\n{AB}```\n"
    assert parse(answer) == [edit("foo.txt", "a\n", "b\n")]
    assert parse(f"```src/app.py\n{AB}```\n") == [edit("src/app.py", "a\n", "b\n")]


def test_parse_end_of_a_code_block_is_not_a_path() -> None:
    answer = f"a.py\n{AB}\nRun it:\n```bash\npytest\n```\n```python\n{AB}```\n"
    assert [e.path for e in parse(answer)] == ["a.py", "a.py"]


# -- apply --------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "wt" / "src").mkdir(parents=True)
    (tmp_path / "wt" / "src" / "app.py").write_text(APP)
    return tmp_path / "wt"


def test_apply_exact(root: Path) -> None:
    result = apply(root, [edit("src/app.py", "    return sum(items)\n", "    return 0\n")])
    assert result == Applied(changed=("src/app.py",), failures=(), fuzzy=0)
    assert (root / "src/app.py").read_text() == "def total(items):\n    return 0\n"


def test_apply_trailing_whitespace_tolerated(root: Path) -> None:
    (root / "src/app.py").write_text("def total(items):  \n    return sum(items)\t\n")
    result = apply(root, [edit("./src/app.py", APP, "def total(items):\n    return 1\n")])
    assert result == Applied(changed=("src/app.py",), failures=(), fuzzy=1)
    assert (root / "src/app.py").read_text() == "def total(items):\n    return 1\n"


def test_apply_crlf_file_stays_crlf(root: Path) -> None:
    (root / "src/app.py").write_bytes(b"a\r\nb\r\nc\r\n")
    result = apply(root, [edit("src/app.py", "b\n", "B\nB2\n")])
    assert result == Applied(changed=("src/app.py",), failures=(), fuzzy=0)
    assert (root / "src/app.py").read_bytes() == b"a\r\nB\r\nB2\r\nc\r\n"


def test_apply_keeps_missing_final_newline(root: Path) -> None:
    (root / "src/app.py").write_text("a\nb")
    apply(root, [edit("src/app.py", "b\n", "c\nd\n")])
    assert (root / "src/app.py").read_text() == "a\nc\nd"
    apply(root, [edit("src/app.py", "d\n", "")])
    assert (root / "src/app.py").read_text() == "a\nc"


def test_apply_uniform_indent_shift_reindents_replace(root: Path) -> None:
    source = (
        "class Cart:\n    def total(self):\n        return 1\n"
        "\n    def n(self):\n        return 2\n"
    )
    (root / "cart.py").write_text(source)
    search = "def total(self):\n    return 1\n"
    replace = "def total(self):\n    # all of it\n\n    return 10\n"
    result = apply(root, [edit("cart.py", search, replace)])
    assert result == Applied(changed=("cart.py",), failures=(), fuzzy=1)
    assert (root / "cart.py").read_text() == (
        "class Cart:\n    def total(self):\n        # all of it\n\n        return 10\n"
        "\n    def n(self):\n        return 2\n"
    )


def test_apply_search_indented_too_far(root: Path) -> None:
    search = "        def total(items):\n            return sum(items)\n"
    replace = "        def total(items):\n            return len(items)\n"
    assert apply(root, [edit("src/app.py", search, replace)]).fuzzy == 1
    assert (root / "src/app.py").read_text() == "def total(items):\n    return len(items)\n"


def test_apply_indent_shift_with_trailing_whitespace_and_tabs(root: Path) -> None:
    (root / "t.py").write_text("if x:\n\tif y:  \n\t\tgo()\n")
    result = apply(root, [edit("t.py", "if y:\n\tgo()\n", "if y:\n\tstop()\n\tgo()\n")])
    assert result == Applied(changed=("t.py",), failures=(), fuzzy=1)
    assert (root / "t.py").read_text() == "if x:\n\tif y:\n\t\tstop()\n\t\tgo()\n"


def test_apply_counts_fuzzy_blocks(root: Path) -> None:
    edits = [
        edit("src/app.py", "def total(items):\n", "def total(things):\n", 1),
        edit("src/app.py", "return sum(items)\n", "return sum(things)\n", 2),
    ]
    assert apply(root, edits) == Applied(changed=("src/app.py",), failures=(), fuzzy=1)
    assert (root / "src/app.py").read_text() == "def total(things):\n    return sum(things)\n"


def test_apply_mixed_indent_shift_is_not_a_match(root: Path) -> None:
    search = "  def total(items):\n return sum(items)\n"
    result = apply(root, [edit("src/app.py", search, "x\n")])
    assert [f.reason for f in result.failures] == ["SEARCH text not found in src/app.py"]


def test_apply_ambiguous_match_refused(root: Path) -> None:
    (root / "f.py").write_text("x = 1\ny = 2\nx = 1\nz = 3\nx = 1\n")
    e = edit("f.py", "x = 1\n", "x = 9\n")
    result = apply(root, [e])
    reason = "SEARCH matches 3 places in f.py (lines 1, 3, 5); include more lines so it matches one"
    assert result == Applied(changed=(), failures=(Failure(e, reason, ""),), fuzzy=0)
    assert (root / "f.py").read_text() == "x = 1\ny = 2\nx = 1\nz = 3\nx = 1\n"


def test_apply_not_found_shows_closest_lines(root: Path) -> None:
    lines = [f"line {n}" for n in range(1, 31)]
    lines[19:22] = ["def compute(a, b):", "    return a + b", ""]
    (root / "m.py").write_text("\n".join(lines) + "\n")
    e = edit("m.py", "def compute(a, b):\n    return a - b\n", "x\n", 3)
    result = apply(root, [e])
    closest = (
        "18 | line 18\n19 | line 19\n20 | def compute(a, b):\n21 |     return a + b\n"
        "22 |\n23 | line 23"
    )
    assert result.failures == (Failure(e, "SEARCH text not found in m.py", closest),)
    assert result.changed == ()


def test_apply_sequential_blocks_on_one_file(root: Path) -> None:
    edits = [
        edit("src/app.py", "    return sum(items)\n", "    return sum(items) * 2\n", 1),
        edit("src/app.py", "    return sum(items) * 2\n", "    return sum(items) * 3\n", 2),
        edit("src/app.py", "def total(items):\n", "def total(items: list[int]) -> int:\n", 3),
    ]
    assert apply(root, edits) == Applied(changed=("src/app.py",), failures=(), fuzzy=0)
    assert (root / "src/app.py").read_text() == (
        "def total(items: list[int]) -> int:\n    return sum(items) * 3\n"
    )


def test_apply_failed_block_does_not_stop_the_others(root: Path) -> None:
    bad = edit("src/app.py", "nothing like it\n", "x\n", 1)
    good = edit("src/app.py", "    return sum(items)\n", "    return 0\n", 2)
    result = apply(root, [bad, good])
    assert [f.edit.index for f in result.failures] == [1]
    assert result.changed == ("src/app.py",)
    assert (root / "src/app.py").read_text() == "def total(items):\n    return 0\n"


def test_apply_creates_a_file_in_new_folders(root: Path) -> None:
    result = apply(root, [edit("pkg/sub/new.py", "", "X = 1\n")])
    assert result == Applied(changed=("pkg/sub/new.py",), failures=(), fuzzy=0)
    assert (root / "pkg/sub/new.py").read_text() == "X = 1\n"


def test_apply_create_over_existing_file(root: Path) -> None:
    (root / "empty.py").write_text("")
    same = edit("src/app.py", "", APP, 1)
    fill = edit("empty.py", "", "A = 1\n", 2)
    clash = edit("src/app.py", "", "other\n", 3)
    result = apply(root, [same, fill, clash])
    reason = "src/app.py already exists; copy lines from it into SEARCH to change it"
    closest = "1 | def total(items):\n2 |     return sum(items)"
    assert result == Applied(("empty.py",), (Failure(clash, reason, closest),), 0)
    assert (root / "empty.py").read_text() == "A = 1\n"
    assert (root / "src/app.py").read_text() == APP


def test_apply_file_problems(root: Path) -> None:
    (root / "blob.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    (root / "latin.txt").write_bytes("café\n".encode("latin-1"))
    (root / "plain.py").write_text("a\n")
    edits = [
        edit("missing.py", "a\n", "b\n", 1),
        edit("blob.bin", "a\n", "b\n", 2),
        edit("latin.txt", "caf\n", "b\n", 3),
        edit("src", "a\n", "b\n", 4),
        edit("plain.py/inner.py", "", "b\n", 5),
        edit("empty.py", "a\n", "b\n", 6),
    ]
    result = apply(root, edits)
    assert [(f.edit.index, f.reason, f.closest) for f in result.failures] == [
        (1, "missing.py does not exist; an empty SEARCH creates a file", ""),
        (2, "blob.bin is not a text file", ""),
        (3, "latin.txt is not a text file", ""),
        (4, "src is a folder", ""),
        (5, "cannot create plain.py/inner.py: a file is in the way", ""),
        (6, "empty.py does not exist; an empty SEARCH creates a file", ""),
    ]
    assert result.changed == ()


def test_apply_keeps_bom_and_executable_bit(root: Path) -> None:
    script = root / "run.sh"
    script.write_bytes(b"\xef\xbb\xbf#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    apply(root, [edit("run.sh", "echo hi\n", "echo bye\n")])
    assert script.read_bytes() == b"\xef\xbb\xbf#!/bin/sh\necho bye\n"
    assert script.stat().st_mode & 0o777 == 0o755


def test_apply_unchanged_file_is_not_written(root: Path) -> None:
    result = apply(root, [edit("src/app.py", "    return sum(items)\n", "    return sum(items)\n")])
    assert result == Applied(changed=(), failures=(), fuzzy=0)


def test_apply_fenced_sections(root: Path) -> None:
    fenced = "```python\n    return sum(items)\n```\n"
    answer = f"src/app.py\n<<<<<<< SEARCH\n{fenced}=======\n```python\n    return 0\n```\n"
    answer += ">>>>>>> REPLACE\n"
    assert apply(root, parse(answer)) == Applied(("src/app.py",), (), fuzzy=1)
    assert (root / "src/app.py").read_text() == "def total(items):\n    return 0\n"
    named = "app.py\n~~~\n    return 0\n~~~\n"  # the file's name above the fence, too
    assert apply(root, [edit("src/app.py", named, "    return 1\n")]).changed == ("src/app.py",)
    assert (root / "src/app.py").read_text() == "def total(items):\n    return 1\n"


def test_apply_fences_in_the_file_match_as_written(root: Path) -> None:
    (root / "README.md").write_text("Run:\n\n```\nmake\n```\n")
    result = apply(root, [edit("README.md", "```\nmake\n```\n", "Run `make`.\n")])
    assert result == Applied(("README.md",), (), fuzzy=0)
    assert (root / "README.md").read_text() == "Run:\n\nRun `make`.\n"


def test_apply_creates_a_file_without_the_fence_round_it(root: Path) -> None:
    apply(root, [edit("new.py", "", "```python\nX = 1\n```\n")])
    assert (root / "new.py").read_text() == "X = 1\n"


def test_apply_spurious_leading_blank_line_in_search(root: Path) -> None:
    search = "\ndef total(items):\n    return sum(items)\n"
    result = apply(root, [edit("src/app.py", search, "\ndef total(items):\n    return 0\n")])
    assert result == Applied(("src/app.py",), (), fuzzy=1)
    assert (root / "src/app.py").read_text() == "def total(items):\n    return 0\n"
    search = "\n\ndef total(items):\n    return 0\n"  # only the first blank line is dropped
    result = apply(root, [edit("src/app.py", search, "x\n")])
    assert [f.reason for f in result.failures] == ["SEARCH text not found in src/app.py"]


def test_apply_divider_as_block_end_writes_no_divider(root: Path) -> None:
    answer = "src/app.py\n<<<<<<< SEARCH\n    return sum(items)\n=======\n    return 0\n=======\n"
    assert apply(root, parse(answer)).changed == ("src/app.py",)
    assert (root / "src/app.py").read_text() == "def total(items):\n    return 0\n"


def test_apply_fifo_is_not_read(root: Path) -> None:
    os.mkfifo(root / "pipe.py")
    edits = [edit("pipe.py", "a\n", "b\n", 1), edit("pipe.py", "", "b\n", 2)]
    result = apply(root, edits)  # a blocking read would hang here until the test times out
    reasons = [(f.edit.index, f.reason) for f in result.failures]
    assert reasons == [(1, "pipe.py is not a regular file"), (2, "pipe.py is not a regular file")]
    assert result.changed == ()
    assert (root / "pipe.py").is_fifo()


def test_apply_file_over_one_mib_is_not_read(root: Path) -> None:
    line = "x = 1\n"
    (root / "big.py").write_text(line * ((1 << 20) // len(line) + 1))
    (root / "edge.py").write_bytes(b"#" * ((1 << 20) - 7) + b"\ny = 1\n")  # exactly 1 MiB
    edits = [edit("big.py", line, "x = 2\n", 1), edit("edge.py", "y = 1\n", "y = 2\n", 2)]
    result = apply(root, edits)
    assert [f.reason for f in result.failures] == ["big.py is too large to edit (over 1 MiB)"]
    assert result.changed == ("edge.py",)


# -- unsafe paths -------------------------------------------------------------------------


UNSAFE = [
    ("../x", "the path goes up with .."),
    ("a/../../x", "the path goes up with .."),
    ("src/../src/app.py", "the path goes up with .."),
    ("/etc/passwd", "the path is absolute"),
    ("C:/x", "the path is absolute"),
    ("\\\\server\\x", "the path is absolute"),
    (".git/config", "files under .git are not editable"),
    ("sub/.git/hooks/x", "files under .git are not editable"),
    (".GIT/config", "files under .git are not editable"),
    (".git", "files under .git are not editable"),
    ("~/x", "a path may not start with ~"),
    ("a\x00b", "the path contains a NUL byte"),
    ("out/x.py", "out is a symbolic link"),
    ("link.py", "link.py is a symbolic link"),
    ("src/inner/deep.py", "src/inner is a symbolic link"),
    (".", "the path names no file"),
]


@pytest.fixture
def unsafe_root(root: Path) -> Path:
    outside = root.parent / "outside"
    outside.mkdir()
    (outside / "x.py").write_text("secret\n")
    (root / ".git").write_text("gitdir: /somewhere/.git/worktrees/wt\n")
    (root / "out").symlink_to(outside)
    (root / "link.py").symlink_to(root / "src" / "app.py")
    (root / "src" / "inner").symlink_to(root / "src")
    return root


@pytest.mark.parametrize(("path", "why"), UNSAFE)
def test_resolve_refuses(unsafe_root: Path, path: str, why: str) -> None:
    with pytest.raises(TicketdError) as info:
        resolve(unsafe_root, path)
    assert info.value.code == "UNSAFE_EDIT"
    assert info.value.message == f"refusing to edit {path!r}: {why}"


@pytest.mark.parametrize(("path", "why"), UNSAFE)
def test_apply_unsafe_path_writes_nothing(unsafe_root: Path, path: str, why: str) -> None:
    before = tree(unsafe_root.parent)
    edits = [
        edit("src/app.py", "    return sum(items)\n", "    return 0\n", 1),
        edit("fresh/new.py", "", "x = 1\n", 2),
        edit(path, "", "pwned\n", 3),
        edit("src/app.py", "def total(items):\n", "def t(items):\n", 4),
    ]
    with pytest.raises(TicketdError) as info:
        apply(unsafe_root, edits)
    assert info.value.code == "UNSAFE_EDIT"
    assert info.value.message == f"block 3: refusing to edit {path!r}: {why}"
    assert tree(unsafe_root.parent) == before


def test_resolve_accepts_paths_inside(root: Path) -> None:
    real = root.resolve()
    assert resolve(root, "src/app.py") == real / "src" / "app.py"
    assert resolve(root, "./src//app.py") == real / "src" / "app.py"
    assert resolve(root, "new/dir/file.py") == real / "new" / "dir" / "file.py"
    assert resolve(root, ".github/workflows/ci.yml") == real / ".github" / "workflows" / "ci.yml"
    assert resolve(root, "notes~") == real / "notes~"
    assert resolve(root, "a:b.txt") == real / "a:b.txt"


# -- describe_failures --------------------------------------------------------------------


def test_describe_failures() -> None:
    missing = Failure(edit("a.py", "x\n", "y\n", 2), "SEARCH text not found in a.py", "3 | z")
    ambiguous = Failure(edit("b.py", "q\n", "r\n", 5), "SEARCH matches 2 places in b.py", "")
    assert describe_failures([missing, ambiguous]) == (
        "These edit blocks could not be applied (blocks not listed here were applied):\n\n"
        "Block 2 (a.py): SEARCH text not found in a.py\n"
        "Lines of a.py as they are now (the numbers are not part of the file):\n"
        "3 | z\n\n"
        "Block 5 (b.py): SEARCH matches 2 places in b.py\n\n"
        "Answer with corrected blocks for these only. SEARCH must copy the file's current "
        "lines exactly, with the same indentation, comments and blank lines, and enough of "
        "them to match one place."
    )
    assert describe_failures([]) == ""


# -- a block that adds a new function by searching for its head ----------------------------


def test_a_block_searching_for_the_head_of_a_new_function_adds_it_at_the_end(
    tmp_path: Path,
) -> None:
    (tmp_path / "s.py").write_text(APP)
    head = "def reverse_words(text: str) -> str:\n"
    new = head + "    return ' '.join(reversed(text.split()))\n"
    applied = apply(tmp_path, [edit("s.py", head, new)])
    assert applied.failures == () and applied.fuzzy == 1
    assert (tmp_path / "s.py").read_text() == APP + "\n\n" + new


def test_a_block_for_an_existing_function_with_a_wrong_head_is_not_an_addition(
    tmp_path: Path,
) -> None:
    (tmp_path / "s.py").write_text(APP)
    head = "def total(values):\n"  # the file has total(items): a misremembered head
    applied = apply(tmp_path, [edit("s.py", head, head + "    return 0\n")])
    assert [f.reason for f in applied.failures] == ["SEARCH text not found in s.py"]
    assert (tmp_path / "s.py").read_text() == APP


def test_a_block_whose_search_lines_are_in_the_file_is_not_an_addition(tmp_path: Path) -> None:
    (tmp_path / "s.py").write_text(APP + "\n\ndef other():\n    return sum(items)\n")
    search = "def nothing():\n    return sum(items)\n"  # its second line is in the file
    applied = apply(tmp_path, [edit("s.py", search, search + "    # more\n")])
    assert len(applied.failures) == 1


# -- a block that searches for a function's head and answers with the whole function --------

MOVING = (
    "def moving_average(values, window):\n"
    "    if window <= 0:\n"
    "        raise ValueError('window')\n"
    "    return [sum(values[i : i + window]) / window for i in range(len(values) - window)]\n"
    "\n\ndef other():\n    return 1\n"
)


def test_a_whole_function_answered_under_its_head_replaces_the_old_body(tmp_path: Path) -> None:
    (tmp_path / "s.py").write_text(MOVING)
    head = "def moving_average(values, window):\n"
    fixed = MOVING.split("\n\n\n")[0].replace("len(values) - window", "len(values) - window + 1")
    applied = apply(tmp_path, [edit("s.py", head, fixed + "\n")])
    assert applied.failures == ()
    assert (tmp_path / "s.py").read_text() == MOVING.replace("- window)]", "- window + 1)]")


def test_lines_added_under_a_head_keep_the_body(tmp_path: Path) -> None:
    (tmp_path / "s.py").write_text(MOVING)
    head = "def moving_average(values, window):\n"
    doc = '    """The mean of each window of ``values``."""\n'
    applied = apply(tmp_path, [edit("s.py", head, head + doc)])
    assert applied.failures == ()
    assert (tmp_path / "s.py").read_text() == head + doc + MOVING.removeprefix(head)


def test_a_new_version_written_in_search_too_rewrites_the_function_it_heads(
    tmp_path: Path,
) -> None:
    (tmp_path / "s.py").write_text(MOVING)
    new = MOVING.split("\n\n\n")[0].replace("len(values) - window", "len(values) - window + 1")
    new += "\n"
    applied = apply(tmp_path, [edit("s.py", new, new)])  # SEARCH matches nowhere: the new text
    assert applied.failures == () and applied.fuzzy == 1
    assert (tmp_path / "s.py").read_text() == MOVING.replace("- window)]", "- window + 1)]")


def test_a_fragment_under_a_head_is_no_rewrite(tmp_path: Path) -> None:
    (tmp_path / "s.py").write_text(MOVING)
    fragment = "def moving_average(values, window):\n    total = 0\n"  # keeps none of the body
    applied = apply(tmp_path, [edit("s.py", fragment, fragment)])
    assert len(applied.failures) == 1 and (tmp_path / "s.py").read_text() == MOVING


def test_line_numbers_copied_from_a_reflection_are_not_part_of_search(tmp_path: Path) -> None:
    (tmp_path / "s.py").write_text(MOVING)
    search = "1 | def moving_average(values, window):\n 2 |     if window <= 0:\n"
    replace = "def moving_average(values, window):\n    if window < 1:\n"
    applied = apply(tmp_path, [edit("s.py", search, replace)])
    assert applied.failures == ()
    assert (tmp_path / "s.py").read_text() == MOVING.replace("window <= 0", "window < 1")
