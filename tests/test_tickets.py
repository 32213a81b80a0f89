"""daemon.tickets against real Backlog.md files (../shared/corpus/backlog) and small samples."""

from __future__ import annotations

import csv
import datetime as dt
import re
from pathlib import Path

import pytest
import yaml

from daemon.errors import InvalidTicket
from daemon.tickets import (
    MAX_TICKET_BYTES,
    Criterion,
    Ticket,
    filename_for,
    id_key,
    next_id,
    parse_file,
    parse_text,
    read_text,
    render_new,
    same_id,
    slug,
    update_frontmatter,
)

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "backlog"
CLOSING = re.compile(r"\A---[ \t]*\r?\n.*?^---[ \t]*\r?\n", re.S | re.M)
OWNED = {"status", "updated_date", "references"}


def original_names() -> dict[str, str]:
    """saved corpus name -> the file name it had in its repository (manifest.tsv)."""
    with (CORPUS / "manifest.tsv").open(encoding="utf-8", newline="") as handle:
        rows = csv.DictReader(handle, delimiter="\t")
        return {row["saved_name"]: Path(row["path"]).name for row in rows}


def corpus_params() -> list[object]:
    if not (CORPUS / "manifest.tsv").is_file():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no corpus at {CORPUS}"))]
    return sorted(name for name in original_names() if name.endswith(".md"))


def corpus_text(saved: str) -> tuple[str, Path]:
    """The file's text and its original path, so ids come from real Backlog.md file names."""
    if not CORPUS.is_dir():
        pytest.skip(f"no corpus at {CORPUS}")
    return read_text(CORPUS / saved), Path(original_names()[saved])


def corpus_ticket(prefix: str) -> Ticket:
    if not CORPUS.is_dir():
        pytest.skip(f"no corpus at {CORPUS}")
    matches = [name for name in original_names() if name.startswith(prefix)]
    if not matches:
        pytest.skip(f"corpus file {prefix}* not found")
    (saved,) = matches
    text, path = corpus_text(saved)
    return parse_text(text, path)


def body_of(text: str) -> str:
    match = CLOSING.match(text)
    return text[match.end() :] if match else text


# -- the corpus ----------------------------------------------------------------------------


@pytest.mark.parametrize("saved", corpus_params())
def test_every_corpus_file_parses(saved: str) -> None:
    text, path = corpus_text(saved)
    ticket = parse_text(text, path)
    assert ticket.id and ticket.title
    assert ticket.text == text
    if "id" in ticket.frontmatter:
        assert ticket.id == str(ticket.frontmatter["id"])
    else:
        assert path.name.startswith(ticket.id)


@pytest.mark.parametrize("saved", corpus_params())
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_update_frontmatter_changes_only_the_owned_keys(saved: str, newline: str) -> None:
    text, path = corpus_text(saved)
    text = text.replace("\n", newline)
    updates: dict[str, str | list[str]] = {
        "status": "In Progress",
        "updated_date": "2026-11-22 10:30",
        "references": ["https://github.com/o/r/pull/7", "docs/a b.md"],
    }
    updated = update_frontmatter(text, updates)
    before, after = parse_text(text, path), parse_text(updated, path)
    assert after.frontmatter["status"] == "In Progress"
    assert after.frontmatter["updated_date"] == "2026-11-22 10:30"
    assert after.frontmatter["references"] == updates["references"]
    unchanged = {k: v for k, v in before.frontmatter.items() if k not in OWNED}
    assert {k: v for k, v in after.frontmatter.items() if k not in OWNED} == unchanged
    if before.frontmatter:
        assert body_of(updated) == body_of(text)
    else:
        assert updated.endswith(text)
    assert (after.description, after.acceptance_criteria) == (
        before.description,
        before.acceptance_criteria,
    )
    assert update_frontmatter(updated, updates) == updated
    if newline == "\r\n":
        assert updated.count("\n") == updated.count("\r\n")
        assert after.newline == "\r\n"


def test_folded_title_and_block_labels() -> None:
    ticket = corpus_ticket("ANUcybernetics__panic__task-24_")
    assert ticket.id == "task-24"
    assert ticket.title == (
        "git cleanup: tidy up v2/v3 nomenclature (probably: v0 is prototype, v1 at AusCyber,"
        " v2 is Birch install)"
    )
    assert ticket.labels == ("cleanup", "documentation")
    assert ticket.status == "Done"
    # Backlog.md semantics: an unknown heading belongs to the known section above it.
    assert ticket.description.startswith("## Resolution\n\nCompleted as part of task-57.")


def test_flow_lists_and_body_without_sections() -> None:
    ticket = corpus_ticket("ANUcybernetics__panic__task-28_")
    assert ticket.dependencies == ("task-30",)
    assert ticket.labels == ()
    assert ticket.description.startswith("NOTE: once task 30 is done")
    assert corpus_ticket("ANUcybernetics__panic__task-27_").labels == ("needs-test",)


def test_quoted_date_and_empty_description() -> None:
    ticket = corpus_ticket("ANUcybernetics__panic__task-13_")
    assert ticket.frontmatter["created_date"] == "2025-07-08"
    assert ticket.description == ""
    assert ticket.acceptance_criteria == ()


def test_at_sign_assignee_and_unquoted_date() -> None:
    ticket = corpus_ticket("MrLesk__Backlog.md__back-1_")
    assert ticket.id == "BACK-1"
    assert ticket.title == "CLI: Setup Core Project (Bun, TypeScript, Git, Linters)"
    assert ticket.frontmatter["assignee"] == "@MrLesk"
    assert ticket.frontmatter["created_date"] == dt.date(2025, 6, 3)
    assert ticket.labels == ("cli", "setup")
    assert ticket.dependencies == ("task-0",)
    assert len(ticket.acceptance_criteria) == 5
    assert all(c.checked and c.index is None for c in ticket.acceptance_criteria)


def test_subtask_id_legacy_criteria_and_notes() -> None:
    ticket = corpus_ticket("CRJFisher__ariadne__task-100.2_")
    assert ticket.id == "task-100.2"
    assert ticket.acceptance_criteria == (
        Criterion("Nodes called by others percentage >= 85%", checked=True, index=None),
        Criterion("Add test cases for missed incoming calls", checked=True, index=None),
        Criterion("Root cause identified and fixed", checked=True, index=None),
    )
    assert ticket.notes.startswith("This issue is the same root cause as task-100.8.")


def test_legacy_criteria_with_one_unchecked_and_plan() -> None:
    ticket = corpus_ticket("CRJFisher__ariadne__task-1_")
    assert [c.checked for c in ticket.acceptance_criteria] == [True] * 9 + [False]
    assert ticket.acceptance_criteria[-1].text == "Update documentation"
    assert ticket.plan.startswith("1. Install tree-sitter-javascript parser dependency")
    assert ticket.frontmatter["assignee"] == ["@claude"]


def test_deep_subtask_id_and_marked_description() -> None:
    ticket = corpus_ticket("CRJFisher__ariadne__task-190.15.4_")
    assert ticket.id == "TASK-190.15.4"
    assert ticket.priority == "medium"
    assert ticket.labels == ("javascript", "integration-test")
    assert ticket.description.startswith("**Repo**: mochajs/mocha")
    assert ticket.description.endswith("parse errors, or pipeline crashes.")
    assert "SECTION" not in ticket.description


def test_numbered_criteria_all_checked_with_unicode_title() -> None:
    ticket = corpus_ticket("DanielRamosAcosta__viviendaencrisis__vc-0047.04_")
    assert ticket.id == "VC-0047.04"
    assert ticket.title == "Análisis de los resultados de la encuesta"
    assert ticket.dependencies == ("VC-0047.03", "VC-0047.05")
    assert ticket.priority == "high"
    assert [(c.index, c.checked) for c in ticket.acceptance_criteria] == [
        (n, True) for n in range(1, 8)
    ]


def test_definition_of_done_is_not_acceptance_criteria() -> None:
    ticket = corpus_ticket("DanielRamosAcosta__viviendaencrisis__vc-0009_")
    assert len(ticket.acceptance_criteria) == 10
    assert not any(c.checked for c in ticket.acceptance_criteria)
    assert all(c.text != "All test suite is passing" for c in ticket.acceptance_criteria)
    assert ticket.plan.startswith("## Estructura del fichero final")
    only_done = corpus_ticket("DanielRamosAcosta__viviendaencrisis__vc-0004.01_")
    assert only_done.acceptance_criteria == ()


def test_chinese_title() -> None:
    ticket = corpus_ticket("MMXC__AC__task-100_")
    assert ticket.id == "TASK-100"
    assert ticket.title == "房主端实现屏幕/标签页采集预览（getDisplayMedia）"
    assert len(ticket.acceptance_criteria) == 4


def test_criteria_with_blank_line_and_headings_inside_notes() -> None:
    ticket = corpus_ticket("Callumk7__game_master_core__task-002_")
    assert [c.index for c in ticket.acceptance_criteria] == [1, 2, 3, 4]
    assert ticket.plan.startswith("1. Analyze current join tables")
    assert ticket.notes.startswith("## Implementation Plan for Task 002")


def test_headings_inside_description_markers_stay_in_the_description() -> None:
    ticket = corpus_ticket("ANUcybernetics__panic__task-54_")
    assert ticket.priority == "high"
    assert ticket.description.startswith("## Problem\n\nAfter upgrading ash_authentication")
    assert "## Root Cause" in ticket.description


def test_plain_markdown_ticket() -> None:
    ticket = corpus_ticket("ANUcybernetics__panic__task-43_")
    assert ticket.frontmatter == {}
    assert ticket.id == "task-43"
    assert ticket.title == "Task: Add NetworkRunner status component with countdown"
    assert ticket.status is None
    assert ticket.description.startswith("**Description:** Add a component")
    assert "# Task:" not in ticket.description
    assert ticket.plan.startswith("1. **Modify NetworkRunner to broadcast state changes**")
    epic = corpus_ticket("CRJFisher__ariadne__task-epic-11.52")
    assert epic.id == "task-epic-11.52"
    assert epic.title == "Task: Review, Refine and Consolidate Types"


def test_filename_for_matches_backlog_md_names_in_the_corpus() -> None:
    chinese = corpus_ticket("MMXC__AC__task-100_")
    assert filename_for(chinese.id, chinese.title) == chinese.path.name
    arrows = corpus_ticket("CRJFisher__ariadne__task-199.23.2_")
    assert filename_for(arrows.id, arrows.title) == arrows.path.name


# -- update_frontmatter -------------------------------------------------------------------

SAMPLE = """\
---
id: task-7
# owned by ticketd
status: To Do
title: >-
  a long folded
  title
labels:
- a
- b

custom: {x: 1}
references: [one, two]
---
Body: keep me\r
"""


def test_update_frontmatter_replaces_whole_values_and_keeps_the_rest() -> None:
    updated = update_frontmatter(
        SAMPLE, {"status": "Done", "title": "New", "labels": [], "references": ["r"]}
    )
    assert updated == SAMPLE_UPDATED


SAMPLE_UPDATED = """\
---
id: task-7
# owned by ticketd
status: Done
title: New
labels: []

custom: {x: 1}
references:
  - r
---
Body: keep me\r
"""


def test_update_frontmatter_appends_missing_keys_before_the_closing_line() -> None:
    updated = update_frontmatter(SAMPLE, {"updated_date": "2026-11-22 10:30", "model": "qwen"})
    tail = "references: [one, two]\nupdated_date: '2026-11-22 10:30'\nmodel: qwen\n---\n"
    assert updated.endswith(tail + "Body: keep me\r\n")


def test_update_references_block_list_and_absent() -> None:
    present = corpus_ticket("CRJFisher__ariadne__task-199.23.2_")
    updated = update_frontmatter(present.text, {"references": ["https://github.com/o/r/pull/9"]})
    expected = "references:\n  - 'https://github.com/o/r/pull/9'\nparent_task_id: TASK-199.23\n"
    assert expected in updated
    assert "file_utils.ts\n" not in updated.split("---")[1]
    absent = corpus_ticket("ANUcybernetics__panic__task-13_")
    updated = update_frontmatter(absent.text, {"references": ["x"]})
    assert "dependencies: []\nreferences:\n  - x\n---\n" in updated


def test_update_frontmatter_on_plain_markdown_prepends_a_block() -> None:
    text = "# Fix it\r\n\r\nplease\r\n"
    updated = update_frontmatter(text, {"status": "Done", "labels": ["x"]})
    assert updated == "---\r\nstatus: Done\r\nlabels:\r\n  - x\r\n---\r\n" + text
    assert parse_text(updated, Path("fix.md")).title == "Fix it"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "yes",
        "null",
        "123",
        "1.5",
        "2025-07-08",
        "a: b",
        "a #b",
        "#x",
        "@x",
        "- a",
        "[a]",
        "{a}",
        "*a",
        "&a",
        "!a",
        "%a",
        "`a",
        "'q'",
        '"q"',
        " pad ",
        "a\nb",
        "tab\there",
        "é ü 房",
        "line\u2028sep",
        "x" * 300 + " y",
    ],
)
def test_scalars_read_back_as_the_same_string(value: str) -> None:
    updated = update_frontmatter("---\nid: t-1\n---\n", {"title": value, "labels": [value]})
    assert updated.count("\n") == 6
    data = yaml.safe_load(updated.split("---\n")[1])
    assert data == {"id": "t-1", "title": value, "labels": [value]}


# -- read_text and parse errors -----------------------------------------------------------


def test_read_text_rejects_big_files(tmp_path: Path) -> None:
    path = tmp_path / "big.md"
    path.write_bytes(b"a" * (MAX_TICKET_BYTES + 1))
    with pytest.raises(InvalidTicket, match=r"^file is 1048577 bytes, over the 1 MiB limit$"):
        read_text(path)
    path.write_bytes(b"a" * MAX_TICKET_BYTES)
    assert len(read_text(path)) == MAX_TICKET_BYTES


def test_read_text_rejects_binary_and_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "t.md"
    path.write_bytes(b"one\ntwo\nthr\x00ee\n")
    with pytest.raises(InvalidTicket, match=r"^binary file: NUL byte on line 3$") as info:
        read_text(path)
    assert info.value.code == "INVALID_TICKET"
    path.write_bytes(b"1\r\n2\n3\n4\n5\n6\ncaf\xff\n")
    with pytest.raises(InvalidTicket, match=r"^not UTF-8: invalid byte 0xff on line 7$"):
        read_text(path)


def test_read_text_strips_bom_and_keeps_crlf(tmp_path: Path) -> None:
    path = tmp_path / "task-3 - Crlf.md"
    path.write_bytes(b"\xef\xbb\xbf---\r\nid: task-3\r\ntitle: Crlf\r\n---\r\n\r\nBody\r\n")
    ticket = parse_file(path)
    assert ticket.text == "---\r\nid: task-3\r\ntitle: Crlf\r\n---\r\n\r\nBody\r\n"
    assert (ticket.id, ticket.title, ticket.newline, ticket.description) == (
        "task-3",
        "Crlf",
        "\r\n",
        "Body",
    )


def test_broken_yaml_names_the_file_line() -> None:
    text = "---\nid: task-1\ntitle: x\nstatus: To Do: bad\n---\nbody\n"
    expected = r"^broken YAML frontmatter on line 4: mapping values are not allowed here$"
    with pytest.raises(InvalidTicket, match=expected):
        parse_text(text, Path("task-1 - x.md"))


def test_unclosed_frontmatter_names_line_1() -> None:
    with pytest.raises(InvalidTicket, match="line 1"):
        parse_text("---\nid: task-1\n\nbody\n", Path("task-1.md"))
    with pytest.raises(InvalidTicket, match="line 1"):
        update_frontmatter("---\nid: task-1\n", {"status": "Done"})


@pytest.mark.parametrize("yaml_text", ["- a\n- b\n", "just text\n", "42\n"])
def test_frontmatter_must_be_a_mapping(yaml_text: str) -> None:
    with pytest.raises(InvalidTicket, match="not a mapping"):
        parse_text(f"---\n{yaml_text}---\n", Path("t.md"))


def test_impossible_date_is_an_invalid_ticket() -> None:
    with pytest.raises(InvalidTicket, match="broken YAML frontmatter"):
        parse_text("---\ncreated_date: 2025-13-45\n---\n", Path("t.md"))


def test_fields_from_frontmatter_values() -> None:
    text = """\
---
id: 42
title: ""
priority: HIGH
labels: bug
model: qwen2.5-coder:7b
models: [qwen2.5-coder:3b, qwen2.5-coder:7b]
created_date: 2025-07-08
---
"""
    ticket = parse_text(text, Path("backlog/todo/odd name.md"))
    assert ticket.id == "42"
    assert ticket.title == "odd name"
    assert ticket.priority == "high"
    assert ticket.labels == ("bug",)
    assert ticket.models == ("qwen2.5-coder:7b", "qwen2.5-coder:3b")
    assert ticket.frontmatter["created_date"] == dt.date(2025, 7, 8)
    assert parse_text("---\npriority: urgent\n---\n", Path("t.md")).priority is None


def test_ids_and_titles_fall_back_to_the_file_name() -> None:
    assert parse_text("Text.\n", Path("vc-0004.01 - X.md")).id == "vc-0004.01"
    assert parse_text("---\n---\n", Path("task-42 - Foo.md")).title == "task-42 - Foo"
    assert parse_text("text\n", Path("notes.md")).id == "notes"
    fenced = parse_text("```sh\n# not a title\n```\n# Real title\n", Path("n.md"))
    assert fenced.title == "Real title"


def test_marked_criteria_win_over_legacy_ones() -> None:
    body = (
        "## Acceptance Criteria\n- [x] old\n\n## Acceptance Criteria\n<!-- AC:BEGIN -->\n"
        "- [ ] #1 new one\n- [x] #2 done one\n<!-- AC:END -->\n"
    )
    assert parse_text(body, Path("t.md")).acceptance_criteria == (
        Criterion("new one", checked=False, index=1),
        Criterion("done one", checked=True, index=2),
    )


# -- render_new, names and ids ------------------------------------------------------------

CREATED = dt.datetime(2026, 2, 4, 2, 57)


def test_render_new_matches_backlog_md_layout() -> None:
    text = render_new(
        "TASK-69",
        "Align frontmatter: fields",
        description="Audit the fields.\n\n- one\n- two",
        priority="Medium",
        labels=["tech-debt", "compatibility"],
        acceptance_criteria=["Parser reads all keys", "Writer keeps order"],
        created=CREATED,
    )
    assert text == RENDERED
    ticket = parse_text(text, Path(filename_for("TASK-69", "Align frontmatter: fields")))
    assert (ticket.id, ticket.title, ticket.status, ticket.priority) == (
        "TASK-69",
        "Align frontmatter: fields",
        "To Do",
        "medium",
    )
    assert ticket.labels == ("tech-debt", "compatibility")
    assert ticket.dependencies == ()
    assert ticket.description == "Audit the fields.\n\n- one\n- two"
    assert ticket.acceptance_criteria == (
        Criterion("Parser reads all keys", checked=False, index=1),
        Criterion("Writer keeps order", checked=False, index=2),
    )
    assert ticket.frontmatter["created_date"] == "2026-02-04 02:57"


RENDERED = """\
---
id: TASK-69
title: 'Align frontmatter: fields'
status: To Do
assignee: []
created_date: '2026-02-04 02:57'
labels:
  - tech-debt
  - compatibility
dependencies: []
priority: medium
---

## Description

<!-- SECTION:DESCRIPTION:BEGIN -->
Audit the fields.

- one
- two
<!-- SECTION:DESCRIPTION:END -->

## Acceptance Criteria
<!-- AC:BEGIN -->
- [ ] #1 Parser reads all keys
- [ ] #2 Writer keeps order
<!-- AC:END -->
"""


def test_render_new_minimal_and_tricky_title() -> None:
    text = render_new("task-1", "yes", created=CREATED, status="In Progress")
    assert text.endswith("dependencies: []\n---\n")
    ticket = parse_text(text, Path("task-1 - yes.md"))
    assert (ticket.title, ticket.status, ticket.priority, ticket.labels) == (
        "yes",
        "In Progress",
        None,
        (),
    )
    with pytest.raises(ValueError, match="priority"):
        render_new("task-1", "x", priority="urgent", created=CREATED)


@pytest.mark.parametrize(
    ("ticket_id", "title", "expected"),
    [
        ("task-42", "Fix login redirect", "task-42 - Fix-login-redirect.md"),
        ("TASK-7", "Use a/b: c? *now*", "task-7 - Use-a-b-c-now.md"),
        ("task-100.2", "Fix nodes (65% vs 85%)!", "task-100.2 - Fix-nodes-65-vs-85.md"),
        ("vc-0004", "Añadir índice, ya", "vc-0004 - Añadir-índice-ya.md"),
        ("task-5", "  ?? ", "task-5.md"),
    ],
)
def test_filename_for(ticket_id: str, title: str, expected: str) -> None:
    assert filename_for(ticket_id, title) == expected


def test_filename_for_stays_under_255_bytes() -> None:
    name = filename_for("task-1", "标题" * 200)
    assert len(name.encode()) <= 255
    assert name.startswith("task-1 - 标题") and name.endswith(".md")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Fix login redirect!", "fix-login-redirect"),
        ("Añadir índice de tablas", "anadir-indice-de-tablas"),
        ("房主端实现屏幕", "ticket"),
        ("  --Hello__World--  ", "hello-world"),
        ("Rename: file_utils.ts → parsed_file.ts", "rename-file-utils-ts-parsed-file-ts"),
        ("a" * 39 + " b", "a" * 39),
    ],
)
def test_slug(text: str, expected: str) -> None:
    assert slug(text) == expected


def test_slug_length() -> None:
    assert slug("alpha beta gamma", max_len=6) == "alpha"
    assert slug("", max_len=3) == "tic"


@pytest.mark.parametrize(
    ("ids", "prefix", "expected"),
    [
        (["task-1", "task-42", "task-4.2"], "task", "task-43"),
        (["TASK-9", "task-10.3", "draft-99"], "task", "task-11"),
        (["TASK-9", "task-10.3"], "TASK", "TASK-11"),
        (["task-190.15.4"], "task", "task-191"),
        ([], "task", "task-1"),
        (["VC-0047.04", "VC-0009"], "VC", "VC-0048"),
        (["task-epic-11.29", "back-3"], "task", "task-1"),
    ],
)
def test_next_id(ids: list[str], prefix: str, expected: str) -> None:
    assert next_id(ids, prefix) == expected


def test_id_key_and_same_id() -> None:
    ids = ["task-10.1", "task-2", "TASK-10", "task-1", "draft-3", "task-10.1.2", "vc-0004.01"]
    assert sorted(ids, key=id_key) == [
        "draft-3",
        "task-1",
        "task-2",
        "TASK-10",
        "task-10.1",
        "task-10.1.2",
        "vc-0004.01",
    ]
    assert same_id("TASK-9", "task-9")
    assert not same_id("task-9", "task-09")
