"""What small models answer besides SEARCH/REPLACE: diffs, whole and partial files, and
paths copied from examples. The cases are the shapes Qwen2.5-Coder 1.5B gave on real tickets."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.agent import edits, formats
from daemon.agent.edits import Edit, apply
from daemon.agent.merge import merge_python, whole
from daemon.errors import TicketdError

INVENTORY = '''"""A small inventory."""

import json


class Inventory:
    def __init__(self):
        self.items = {}

    def add(self, name, qty):
        self.items[name] = self.items.get(name, 0) + qty

    def count(self):
        return len(self.items)


def load(path):
    return json.load(open(path))


def dump(inv):
    return json.dumps(inv.items)
'''
LISTING = ["README.md", "textkit/inventory.py", "textkit/strings.py", "tests/test_inventory.py"]


def read(answer: str) -> formats.Answer:
    return formats.read(answer)


def test_search_replace_blocks_come_first() -> None:
    answer = "x.py\n```\n<<<<<<< SEARCH\na\n=======\nb\n>>>>>>> REPLACE\n```\n"
    assert read(answer) == formats.Answer([Edit("x.py", "a\n", "b\n", 1)], formats.SEARCH_REPLACE)


def test_a_unified_diff_becomes_one_edit_per_hunk() -> None:
    answer = (
        "The loop stops one short.\n\n```diff\n--- a/textkit/lists.py\n+++ b/textkit/lists.py\n"
        "@@ -1,4 +1,4 @@\n def chunks(items, size):\n-    stop = len(items) - 1\n"
        "+    stop = len(items)\n     return stop\n"
        "@@ -9,2 +9,3 @@\n def last(items):\n+    # the last one\n     return items[-1]\n"
        "\n```\nThat is all.\n"
    )
    got = read(answer)
    assert got.format == formats.UDIFF
    assert got.edits == [
        Edit(
            "textkit/lists.py",
            "def chunks(items, size):\n    stop = len(items) - 1\n    return stop\n",
            "def chunks(items, size):\n    stop = len(items)\n    return stop\n",
            1,
        ),
        Edit(
            "textkit/lists.py",
            "def last(items):\n    return items[-1]\n",
            "def last(items):\n    # the last one\n    return items[-1]\n",
            2,
        ),
    ]


def test_a_diff_that_creates_a_file_has_an_empty_search() -> None:
    answer = "```diff\n--- /dev/null\n+++ b/textkit/temp.py\n@@ -0,0 +1,2 @@\n"
    answer += "+def f():\n+    pass\n```\n"
    assert read(answer).edits == [Edit("textkit/temp.py", "", "def f():\n    pass\n", 1)]


@pytest.mark.parametrize(
    "above",
    [
        "textkit/strings.py",
        "**textkit/strings.py**",
        "### textkit/strings.py",
        "Here is the updated `textkit/strings.py` file:",
        "Here is the updated code for textkit/strings.py:",
    ],
)
def test_a_fenced_file_takes_its_path_from_the_line_above(above: str) -> None:
    answer = f"{above}\n\n```python\ndef slug(t):\n    return t\n```\n"
    got = read(answer)
    assert got.format == formats.WHOLE
    assert got.edits == [Edit("textkit/strings.py", "", "def slug(t):\n    return t\n", 1, True)]


def test_a_fenced_file_named_in_a_comment_on_its_first_line_loses_that_line() -> None:
    answer = "Sure:\n```python\n# textkit/strings.py\ndef slug(t):\n    return t\n```\n"
    assert read(answer).edits == [
        Edit("textkit/strings.py", "", "def slug(t):\n    return t\n", 1, True)
    ]


def test_shell_and_output_fences_are_not_files() -> None:
    answer = "Run it:\n```bash\npytest -q\n```\nOutput:\n```text\n1 passed\n```\n"
    assert read(answer) == formats.Answer([], "")
    answer = "Then run `scripts/check.sh`:\n```sh\nscripts/check.sh\n```\n"
    assert read(answer) == formats.Answer([], "")


def test_a_shell_script_under_its_path_is_a_file() -> None:
    answer = "scripts/check.sh\n\n```sh\n#!/bin/sh\npytest -q\n```\n"
    assert read(answer).edits == [Edit("scripts/check.sh", "", "#!/bin/sh\npytest -q\n", 1, True)]


def test_prose_only_has_no_edits() -> None:
    assert read("I would change the loop to stop at len(items).") == formats.Answer([], "")


def test_a_malformed_block_is_still_a_parse_error() -> None:
    with pytest.raises(TicketdError) as info:
        read("x.py\n<<<<<<< SEARCH\na\n")
    assert info.value.code == "EDIT_PARSE_FAILED"


# -- paths -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "meant"),
    [
        ("textkit/inventory.py", "textkit/inventory.py"),
        ("./textkit/inventory.py", "textkit/inventory.py"),
        ("path/to/textkit/inventory.py", "textkit/inventory.py"),
        ("repo/textkit/inventory.py", "textkit/inventory.py"),
        ("inventory.py", "textkit/inventory.py"),
        ("path/to/inventory.py", "textkit/inventory.py"),
        ("textkit/new_module.py", "textkit/new_module.py"),  # a new file stays where it is put
        ("other/strings.py", "other/strings.py"),  # not a placeholder: a new file
    ],
)
def test_a_path_means_the_listed_file_it_ends_with(written: str, meant: str) -> None:
    assert formats.locate(written, LISTING) == meant


@pytest.mark.parametrize("path", ["path/to/file.py", "<path>", "path/to/module.py", "{file}"])
def test_a_placeholder_path_is_never_created(tmp_path: Path, path: str) -> None:
    answer = f"{path}\n```\n<<<<<<< SEARCH\n=======\nprint('x')\n>>>>>>> REPLACE\n```\n"
    placed, failures = formats.place(read(answer).edits, LISTING, {})
    assert placed == []
    assert "placeholder" in failures[0].reason
    assert apply(tmp_path, placed).changed == ()
    assert list(tmp_path.iterdir()) == []


def test_a_fence_without_a_path_goes_to_the_shown_file_that_defines_its_names() -> None:
    answer = "```python\ndef count(self):\n    return 0\n\ndef dump(inv):\n    return ''\n```\n"
    shown = {"textkit/inventory.py": INVENTORY, "textkit/strings.py": "def slug(t):\n    pass\n"}
    placed, failures = formats.place(read(answer).edits, LISTING, shown)
    assert failures == [] and [e.path for e in placed] == ["textkit/inventory.py"]


def test_a_fence_without_a_path_that_matches_no_shown_file_is_a_failure() -> None:
    placed, failures = formats.place(read("```python\nx = 1\n```\n").edits, LISTING, {})
    assert placed == [] and "no file path" in failures[0].reason


# -- whole and partial files -------------------------------------------------------------


def test_a_partial_file_replaces_the_function_it_holds_and_keeps_the_rest() -> None:
    part = "def load(path):\n    with open(path) as f:\n        return json.load(f)\n"
    merged = merge_python(INVENTORY, part)
    assert merged == INVENTORY.replace("def load(path):\n    return json.load(open(path))\n", part)


def test_a_partial_class_merges_method_by_method() -> None:
    part = (
        "class Inventory:\n    def count(self):\n        return sum(self.items.values())\n\n"
        "    def remove(self, name):\n        self.items.pop(name, None)\n"
    )
    merged = merge_python(INVENTORY, part)
    assert merged is not None
    assert "def add(self, name, qty):" in merged and "def dump(inv):" in merged
    assert "return sum(self.items.values())" in merged and "return len(self.items)" not in merged
    body = merged.split("class Inventory:")[1].split("\ndef load")[0]
    assert "    def remove(self, name):\n        self.items.pop(name, None)\n" in body


def test_new_functions_are_added_and_new_imports_go_after_the_files() -> None:
    part = "import re\n\n\ndef slug(text):\n    return re.sub(r'\\W+', '-', text)\n"
    merged = merge_python(INVENTORY, part)
    assert merged is not None
    assert merged.startswith('"""A small inventory."""\n\nimport json\nimport re\n')
    assert merged.endswith("def dump(inv):\n    return json.dumps(inv.items)\n\n\n" + part[12:])


def test_a_whole_file_that_renames_a_function_is_taken_whole() -> None:
    renamed = INVENTORY.replace("def dump(inv)", "def dumps(inv)")
    assert merge_python(INVENTORY, renamed) == renamed


def test_a_part_of_a_file_that_is_not_python_is_refused() -> None:
    readme = "# Project\n\n" + "A line of the readme.\n" * 20
    assert whole("README.md", readme, "A line.\n") is None
    assert whole("README.md", readme, readme + "More.\n") == readme + "More.\n"


def test_a_partial_answer_through_apply_keeps_the_file(tmp_path: Path) -> None:
    (tmp_path / "textkit").mkdir()
    (tmp_path / "textkit" / "inventory.py").write_text(INVENTORY)
    answer = "textkit/inventory.py\n```python\ndef dump(inv):\n    return str(inv.items)\n```\n"
    applied = apply(tmp_path, read(answer).edits)
    text = (tmp_path / "textkit" / "inventory.py").read_text()
    assert applied.changed == ("textkit/inventory.py",) and applied.failures == ()
    assert text == INVENTORY.replace("json.dumps(inv.items)", "str(inv.items)")


# -- attacks -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        "```diff\n--- a/.git/config\n+++ b/.git/config\n@@ -1 +1 @@\n [core]\n+\tx = 1\n```\n",
        "```diff\n--- /dev/null\n+++ b/../outside.py\n@@ -0,0 +1 @@\n+x = 1\n```\n",
        ".git/hooks/post-checkout\n```sh\n#!/bin/sh\ntouch /tmp/pwned\n```\n",
        "```python\n# ../../outside.py\nx = 1\n```\n",
    ],
)
def test_diffs_and_fenced_files_cannot_leave_the_worktree(tmp_path: Path, answer: str) -> None:
    root = tmp_path / "wt"
    (root / ".git" / "hooks").mkdir(parents=True)
    (root / ".git" / "config").write_text("[core]\n")
    before = sorted(p.as_posix() for p in tmp_path.rglob("*"))
    placed, _ = formats.place(read(answer).edits, LISTING, {})
    with pytest.raises(TicketdError) as info:
        apply(root, placed)
    assert info.value.code == "UNSAFE_EDIT"
    assert sorted(p.as_posix() for p in tmp_path.rglob("*")) == before
    assert (root / ".git" / "config").read_text() == "[core]\n"


def test_another_files_code_under_a_path_is_refused() -> None:
    shown = {"textkit/inventory.py": INVENTORY, "textkit/strings.py": "def slug(t):\n    pass\n"}
    answer = "textkit/strings.py\n```python\nclass Inventory:\n    pass\n```\n"
    placed, failures = formats.place(read(answer).edits, LISTING, shown)
    assert placed == []
    assert failures[0].reason == (
        "the code given for textkit/strings.py is textkit/inventory.py's, not textkit/strings.py's"
    )
    new = "textkit/strings.py\n```python\ndef reverse(t):\n    return t[::-1]\n```\n"
    assert formats.place(read(new).edits, LISTING, shown)[1] == []  # new code: its own


def test_a_block_without_a_path_goes_to_the_one_shown_file_holding_its_search() -> None:
    answer = "```\n<<<<<<< SEARCH\n    def count(self):\n=======\n    def size(self):\n"
    answer += ">>>>>>> REPLACE\n```\n"
    shown = {"textkit/inventory.py": INVENTORY, "textkit/strings.py": "def slug(t):\n    pass\n"}
    placed, failures = formats.place(read(answer).edits, LISTING, shown)
    assert failures == [] and [e.path for e in placed] == ["textkit/inventory.py"]
    nowhere = answer.replace("def count(self)", "def nothing(self)")
    placed, failures = formats.place(read(nowhere).edits, LISTING, shown)
    assert placed == [] and failures[0].reason == edits.NO_PATH


def test_the_system_prompts_example_file_is_never_created() -> None:
    answer = f"{formats.EXAMPLE_PATH}\n```\ndef farewell(name):\n    print(name)\n```\n"
    placed, failures = formats.place(read(answer).edits, LISTING, {})
    assert placed == [] and "the example's file" in failures[0].reason
    assert formats.place(read(answer).edits, [*LISTING, formats.EXAMPLE_PATH], {})[1] == []


def test_a_file_written_out_without_one_of_its_functions_keeps_that_function() -> None:
    lost = INVENTORY.replace("\n\ndef dump(inv):\n    return json.dumps(inv.items)\n", "")
    lost = lost.replace("json.load(open(path))", "json.loads(open(path).read())")
    merged = merge_python(INVENTORY, lost)
    assert merged is not None and "def dump(inv):" in merged
    assert "json.loads(open(path).read())" in merged


def test_a_whole_file_whose_class_lost_a_method_keeps_that_method() -> None:
    renamed = INVENTORY.replace("def add(self, name, qty)", "def add(self, name, quantity)")
    renamed = renamed.replace("+ qty", "+ quantity")
    lost = renamed.replace("\n    def count(self):\n        return len(self.items)\n", "")
    merged = merge_python(INVENTORY, lost)
    assert merged is not None and "def count(self):" in merged
    assert "def add(self, name, quantity):" in merged and "def dump(inv):" in merged
    assert merge_python(INVENTORY, renamed) == renamed  # nothing lost: taken whole
