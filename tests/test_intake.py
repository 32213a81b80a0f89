"""Intake that cannot be hurt by a file: the file zoo (links, a directory, a FIFO, YAML bombs,
empty, huge, binary files) read by ``tickets.parse_file``, ``Backlog.read``, ``settle_delay``
and the CLI; bounded YAML; patterns that never backtrack over a long line; the parse cache
and ``ticketd status`` under threads and moving files."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import Project, ticketd, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon import frontmatter as frontmatter_module
from daemon import tickets
from daemon.backlog import Backlog
from daemon.errors import InvalidTicket
from daemon.status import collect
from daemon.store import Store
from daemon.watcher import settle_delay

STATUSES = {
    "todo": "To Do",
    "in-progress": "In Progress",
    "review": "Review",
    "done": "Done",
    "failed": "Failed",
}
NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
PASSWD = Path("/etc/passwd")
SECRET_MARK = "zoo-secret-4b1d"  # in a valid ticket that the zoo only links to


def alias_bomb() -> str:
    """Billion laughs: nine levels of nine aliases each, a few hundred bytes."""
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def make_zoo(folder: Path, outside: Path) -> dict[str, str]:
    """Write the file zoo into ``folder``; returns each entry's name and the exact reason."""
    folder.mkdir(parents=True, exist_ok=True)
    secret = outside / "secret.md"
    secret.write_text(f"---\nid: task-99\ntitle: {SECRET_MARK}\n---\n\n{SECRET_MARK}\n")
    zoo: dict[str, str] = {}

    def write(name: str, data: bytes | str, reason: str) -> None:
        path = folder / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        zoo[name] = reason

    nested = "---\nid: task-1\ntitle: " + "[" * 500 + "]" * 500 + "\n---\n"
    write("task-1 - Nested.md", nested, "YAML frontmatter nests deeper than 32 levels (line 3)")
    (folder / "task-2 - Dir.md").mkdir()
    zoo["task-2 - Dir.md"] = "a directory, not a file"
    bomb = "---\nid: task-3\n" + alias_bomb() + "title: *i\n---\n"
    assert len(bomb) < 600
    write(
        "task-3 - Bomb.md",
        bomb,
        "YAML frontmatter has more than 10000 values with its aliases expanded (line 7)",
    )
    os.mkfifo(folder / "task-4 - Fifo.md")
    zoo["task-4 - Fifo.md"] = "a FIFO, not a file"
    for name, target in [
        ("task-5 - Zero.md", Path("/dev/zero")),
        ("task-6 - Passwd.md", PASSWD),
        ("task-13 - Secret.md", secret),
    ]:
        (folder / name).symlink_to(target)
        zoo[name] = "a symbolic link, not a file"
    write("task-7 - Empty.md", b"", "the file is empty")
    write("task-8 - Blank.md", " \n\t\n  \r\n", "the file is empty")
    long_id = "task-" + "9" * 303
    write(
        "task-9 - Long-id.md",
        f"---\nid: {long_id}\ntitle: Long\n---\n",
        "id is 308 characters; at most 100",
    )
    write(
        "task-10 - Big.md",
        b"a" * (tickets.MAX_TICKET_BYTES + 1),
        "file is 1048577 bytes, over the 1 MiB limit",
    )
    write(
        "task-11 - Latin1.md",
        b"---\nid: task-11\ntitle: caf\xe9\n---\n",
        "not UTF-8: invalid byte 0xe9 on line 3",
    )
    write(
        "task-12 - Binary.md",
        b"---\nid: task-12\n---\n\x00\x01\x02",
        "binary file: NUL byte on line 4",
    )
    return zoo


def promptly(call: Callable[[], Any], limit: float = 10.0) -> Any:
    """``call()``'s result or exception, failing the test if it takes over ``limit`` seconds
    (a call blocked on a FIFO would otherwise hang the whole run)."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(("value", call()))
        except BaseException as e:
            outcome.append(("error", e))

    worker = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(limit)
    assert not worker.is_alive(), f"still running after {limit}s"
    assert time.monotonic() - started < limit
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


def leaked(text: str) -> list[str]:
    """What of the linked files' contents shows in ``text``."""
    found = [SECRET_MARK] if SECRET_MARK in text else []
    if PASSWD.is_file():
        found += [ln for ln in PASSWD.read_text(errors="replace").splitlines() if ln in text]
    return found


@pytest.fixture
def zoo_dir(tmp_path: Path) -> tuple[Backlog, dict[str, str]]:
    backlog = Backlog(tmp_path / "backlog", STATUSES)
    backlog.ensure()
    return backlog, make_zoo(backlog.folder("todo"), tmp_path)


# -- the zoo, file by file -----------------------------------------------------------------


def test_every_zoo_file_is_an_invalid_ticket_with_its_reason(
    zoo_dir: tuple[Backlog, dict[str, str]],
) -> None:
    backlog, zoo = zoo_dir
    assert sorted(p.name for p in backlog.files("todo")) == sorted(zoo)
    for name, reason in zoo.items():
        path = backlog.folder("todo") / name
        for read in (tickets.parse_file, backlog.read, backlog.read):  # the last from the cache
            with pytest.raises(InvalidTicket) as info:
                promptly(lambda read=read, path=path: read(path))
            assert (name, info.value.message) == (name, reason)
            assert info.value.code == "INVALID_TICKET"
            assert not leaked(info.value.message)


def test_read_bytes_never_follows_opens_or_waits(zoo_dir: tuple[Backlog, dict[str, str]]) -> None:
    backlog, _ = zoo_dir
    todo = backlog.folder("todo")
    for name in ("task-4 - Fifo.md", "task-5 - Zero.md", "task-2 - Dir.md"):
        with pytest.raises(InvalidTicket, match=r"not a file$"):
            promptly(lambda name=name: tickets.read_bytes(todo / name))
    with pytest.raises(FileNotFoundError):
        tickets.read_bytes(todo / "task-77 - Gone.md")
    with pytest.raises(FileNotFoundError):
        backlog.read(todo / "task-77 - Gone.md")


def test_an_unreadable_file_is_invalid_with_the_system_reason(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = tmp_path / "task-1 - Locked.md"
    path.write_text("---\nid: task-1\n---\n")
    path.chmod(0)
    with pytest.raises(InvalidTicket, match=r"^cannot read the file: Permission denied$"):
        tickets.parse_file(path)
    assert settle_delay(path, time.time(), 5.0) == 0.0  # so that intake reads it and says why


def test_other_system_errors_are_invalid_with_the_system_reason(tmp_path: Path) -> None:
    backlog = Backlog(tmp_path / "backlog", STATUSES)
    backlog.ensure()
    plain = backlog.folder("todo") / "task-1 - Plain.md"
    plain.write_text("---\nid: task-1\n---\n")
    for path, reason in [
        (plain / "task-2.md", "Not a directory"),  # a file where a folder should be
        (backlog.folder("todo") / ("t" * 300 + ".md"), "File name too long"),
    ]:
        for read in (tickets.parse_file, backlog.read):
            with pytest.raises(InvalidTicket, match=rf"^cannot read the file: {reason}$"):
                read(path)
        assert settle_delay(path, time.time(), 5.0) == 0.0


def test_a_socket_is_invalid(tmp_path: Path) -> None:
    path = tmp_path / "s.md"
    with socket.socket(socket.AF_UNIX) as server:
        try:
            server.bind(str(path))
        except OSError as e:  # a temporary folder too deep for a socket's name
            pytest.skip(f"cannot bind a socket there: {e}")
        with pytest.raises(InvalidTicket, match=r"^a socket, not a file$"):
            tickets.parse_file(path)
        assert settle_delay(path, time.time(), 5.0) == 0.0


def test_settle_delay_is_zero_at_once_for_what_is_not_a_regular_file(
    zoo_dir: tuple[Backlog, dict[str, str]],
) -> None:
    backlog, zoo = zoo_dir
    todo = backlog.folder("todo")
    for name in zoo:
        if not (todo / name).is_symlink() and (todo / name).is_file():
            continue
        delay = promptly(lambda name=name: settle_delay(todo / name, time.time(), 5.0))
        assert (name, delay) == (name, 0.0)
    with pytest.raises(FileNotFoundError):
        settle_delay(todo / "task-77 - Gone.md", time.time(), 5.0)


def test_the_cache_sees_a_fifo_replaced_by_a_ticket(tmp_path: Path) -> None:
    backlog = Backlog(tmp_path / "backlog", STATUSES)
    backlog.ensure()
    path = backlog.folder("todo") / "task-1 - A.md"
    os.mkfifo(path)
    with pytest.raises(InvalidTicket, match=r"^a FIFO, not a file$"):
        backlog.read(path)
    path.unlink()
    path.write_text("---\nid: task-1\ntitle: Now a ticket\n---\n")
    assert backlog.read(path).title == "Now a ticket"


def test_rewrite_never_writes_through_a_link(zoo_dir: tuple[Backlog, dict[str, str]]) -> None:
    """A claim rewrites the status of what it moved; a link stays a link, its target as it was."""
    backlog, _ = zoo_dir
    link = backlog.folder("todo") / "task-13 - Secret.md"
    target = link.resolve()
    before = target.read_bytes()
    backlog.rewrite(link, "in-progress", NOW)
    assert link.is_symlink() and target.read_bytes() == before


def test_ids_up_to_100_characters(tmp_path: Path) -> None:
    text = "---\nid: task-{}\n---\nBody.\n"
    assert len(tickets.parse_text(text.format("1" * 95), tmp_path / "t.md").id) == 100
    with pytest.raises(InvalidTicket, match=r"^id is 101 characters; at most 100$"):
        tickets.parse_text(text.format("1" * 96), tmp_path / "t.md")
    with pytest.raises(InvalidTicket, match=r"^id is 110 characters; at most 100$"):
        tickets.parse_text("Body.\n", tmp_path / f"task-{'1' * 105}.md")  # from the file name


# -- bounded YAML -----------------------------------------------------------------------------


def frontmatter(yaml_text: str) -> dict[str, Any]:
    return tickets.parse_text(f"---\n{yaml_text}---\nBody.\n", Path("task-1.md")).frontmatter


def nested_lists(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


def test_nesting_stops_at_32_levels() -> None:
    # the mapping is level 1, the outer list level 2: 31 lists reach level 32
    assert frontmatter("x: " + "[" * 31 + "]" * 31 + "\n")["x"] == nested_lists(31)
    with pytest.raises(InvalidTicket, match=r"^YAML frontmatter nests deeper than 32 levels"):
        frontmatter("x: " + "[" * 32 + "]" * 32 + "\n")
    block = "".join(" " * i + f"k{i}:\n" for i in range(40)) + " " * 40 + "v\n"
    with pytest.raises(InvalidTicket, match=r"deeper than 32 levels \(line 33\)$"):
        frontmatter(block)


@pytest.mark.parametrize("levels", [33, 999, 5000])
def test_pyyaml_composer_stops_before_the_recursion_limit(levels: int) -> None:
    """Without libyaml, PyYAML's composer recurses once per level; it stops at the limit."""
    source = "x: " + "[" * levels + "]" * levels + "\n"
    loader = frontmatter_module._PyLoader(source)
    with pytest.raises(InvalidTicket, match=r"^YAML frontmatter nests deeper than 32 levels"):
        loader.get_single_node()
    with pytest.raises(InvalidTicket, match=r"deeper than 32 levels \(line 2\)$"):
        frontmatter(source)  # libyaml refuses 1000 levels itself; PyYAML then says it


def test_aliases_count_each_time_they_are_used() -> None:
    items = "a: &a [" + ", ".join(["x"] * 99) + "]\n"
    fm = frontmatter(items + "b: [" + ", ".join(["*a"] * 98) + "]\n")  # 9904 values
    assert len(fm["b"]) == 98 and fm["b"][0] == ["x"] * 99
    with pytest.raises(InvalidTicket, match=r"more than 10000 values .* \(line 3\)$"):
        frontmatter(items + "b: [" + ", ".join(["*a"] * 100) + "]\n")
    big = "a: &a " + "x" * 100_000 + "\nb: [" + ", ".join(["*a"] * 11) + "]\n"
    with pytest.raises(InvalidTicket, match=r"more than 1048576 characters .* \(line 3\)$"):
        frontmatter(big)


def test_a_value_that_contains_itself_is_refused() -> None:
    with pytest.raises(InvalidTicket, match=r"^YAML frontmatter: the value on line 2 contains"):
        frontmatter("a: &a [x, *a]\n")
    with pytest.raises(InvalidTicket, match="contains itself"):
        frontmatter("a: &a {<<: *a}\n")


def test_merge_keys_and_shared_values_still_work() -> None:
    fm = frontmatter("base: &base {priority: high}\n<<: *base\nlabels: &l [a, b]\nalso: *l\n")
    assert (fm["priority"], fm["also"]) == ("high", ["a", "b"])


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("id: 0x" + "f" * 5000, "the number on line 2 has 5002 characters; at most 64"),
        ("n: 1" + ":1" * 100, "the number on line 2 has 201 characters; at most 64"),
        ("b: !!bool maybe", "broken YAML frontmatter on line 2: 'maybe' is not a valid !!bool"),
        ("t: !!timestamp soon", "on line 2: 'soon' is not a valid !!timestamp"),
        ("n: !!int ''", "on line 2: '' is not a valid !!int"),
        ("n: !!float '-'", "on line 2: '-' is not a valid !!float"),
        ("t: !!timestamp {=: 1}", "on line 2: a !!timestamp must be a scalar, not a mapping"),
        ("b: !!bool {=: maybe}", "on line 2: a !!bool must be a scalar, not a mapping"),
        ("s: !!str [a]", "on line 2: expected a scalar node, but found sequence"),
    ],
)
def test_values_pyyaml_would_crash_on_or_build_slowly(yaml_text: str, message: str) -> None:
    with pytest.raises(InvalidTicket, match=re.escape(message) + "$"):
        frontmatter(yaml_text + "\n")
    assert frontmatter("n: 0x" + "f" * 62 + "\n")["n"] == 16**62 - 1


TOKENS = [
    *("a", "b", ":", ": ", "- ", "[", "]", "{", "}", ",", "? ", "|", ">", "'", '"', "#", "@"),
    *("&a ", "*a", "&b ", "*b", "<<: ", "=", "~", "\n", "\n  ", "\t", "\\", "...", "--- "),
    *("!!int ", "!!float ", "!!bool ", "!!timestamp ", "!!binary ", "!!set ", "!!omap "),
    *("!!str ", "!!map ", "!!seq ", "!!null ", "!!merge ", "!!value ", "!x ", "%YAML 1.1\n"),
    *("0x1f", "1:2", "2025-13-45", "2001-12-14t21:59:43.10-05:00", ".inf", "1e5", "0b", "_"),
]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=30).map("".join))
def test_any_frontmatter_is_a_ticket_or_invalid_ticket(yaml_text: str) -> None:
    with contextlib.suppress(InvalidTicket):
        tickets.parse_text(f"---\n{yaml_text}\n---\nBody.\n", Path("task-1.md"))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_text_is_a_ticket_or_invalid_ticket(text: str) -> None:
    for candidate in (text, f"---\n{text}\n---\n{text}"):
        with contextlib.suppress(InvalidTicket):
            tickets.parse_text(candidate, Path("task-1.md"))


# -- patterns that never backtrack ------------------------------------------------------------


def test_long_runs_of_blanks_parse_promptly() -> None:
    """Each of these lines took minutes to hours when a lazy group met ``[ \\t]*``."""
    run = " " * 150_000
    text = (
        f"---\nid: task-1\nlabels: [a,\nk{run}x]\nreporter: @a{run}b\n"
        f"assignee: [@a, {'@' * 100_000}]\n---\n"
        f"# a{run}b\n## a{run}b\n## Acceptance Criteria\n- [ ] a{run}b\n"
    )
    ticket = promptly(lambda: tickets.parse_text(text, Path("task-1.md")), limit=5)
    assert ticket.frontmatter["reporter"] == f"@a{run}b"
    assert ticket.labels == ("a", f"k{run}x")
    assert ticket.title == f"a{run}b"
    assert ticket.acceptance_criteria[0].text == f"a{run}b"
    updated = promptly(lambda: tickets.update_frontmatter(text, {"status": "Done"}), limit=5)
    assert "]\nstatus: Done\n---\n" in updated
    unclosed = text.replace("@" * 100_000 + "]", "@" * 100_000)
    with pytest.raises(InvalidTicket, match=r"^broken YAML frontmatter on line 5: "):
        promptly(lambda: tickets.parse_text(unclosed, Path("task-1.md")), limit=5)


def test_heading_and_checkbox_text_as_before() -> None:
    body = "# Title ##  \n\n## Acceptance Criteria \n- [x] #2 Done it \t\n- [ ] Plain  \n"
    ticket = tickets.parse_text(body, Path("task-1.md"))
    assert ticket.title == "Title"
    assert [(c.text, c.index) for c in ticket.acceptance_criteria] == [
        ("Done it", 2),
        ("Plain", None),
    ]


# -- the CLI over the zoo ---------------------------------------------------------------------


@pytest.fixture
def zoo_project(project: Project) -> tuple[Project, dict[str, str]]:
    project.ticket("task-20 - Good.md", title="Good one")
    return project, make_zoo(project.folder("todo"), project.root)


def test_validate_reports_each_zoo_file_and_exits_1(
    zoo_project: tuple[Project, dict[str, str]],
) -> None:
    project, zoo = zoo_project
    todo = project.folder("todo")
    expected = {f"INVALID {todo / name}: {reason}" for name, reason in zoo.items()}
    expected.add(f"ok      {todo / 'task-20 - Good.md'}: task-20 'Good one'")
    for args in (["--config", str(project.config_path)], [str(todo)]):
        result = ticketd("validate", *args, timeout=30)
        assert result.returncode == 1, result.stderr
        lines = result.stdout.splitlines()
        assert set(lines[:-1]) == expected and len(lines) == len(expected) + 1
        assert lines[-1] == f"1 valid, {len(zoo)} invalid"
        assert not leaked(result.stdout + result.stderr)


def test_status_lists_each_zoo_file_as_invalid(zoo_project: tuple[Project, dict[str, str]]) -> None:
    project, zoo = zoo_project
    result = ticketd("status", "--json", "--config", str(project.config_path), timeout=30)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    waiting = {w["file"]: (w["taskId"], w["reason"]) for w in report["waiting"]}
    assert waiting == {
        **{name: (None, f"invalid: {reason}") for name, reason in zoo.items()},
        "task-20 - Good.md": ("task-20", "ready"),
    }
    assert report["counts"]["todo"] == len(zoo) + 1
    assert not leaked(result.stdout + result.stderr)


def test_new_finds_the_next_free_id_with_the_zoo_present(
    zoo_project: tuple[Project, dict[str, str]],
) -> None:
    project, _ = zoo_project
    result = ticketd("new", "Fix the thing", "--config", str(project.config_path), timeout=30)
    assert result.returncode == 0, result.stderr
    path = project.folder("todo") / "task-21 - Fix-the-thing.md"
    assert result.stdout.strip() == str(path)
    assert tickets.parse_file(path).id == "task-21"


# -- threads and moving files -----------------------------------------------------------------


def run_threads(*targets: Callable[[], None], timeout: float = 60) -> list[BaseException]:
    """Start the targets together; the exceptions they raised."""
    errors: list[BaseException] = []
    start = threading.Barrier(len(targets))

    def wrap(target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            start.wait()
            try:
                target()
            except BaseException as e:
                errors.append(e)

        return run

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "threads still running"
    return errors


def test_the_parse_cache_survives_threads(tmp_path: Path) -> None:
    backlog = Backlog(tmp_path / "backlog", STATUSES)
    backlog.ensure()
    paths = [backlog.folder("todo") / f"task-{i} - T.md" for i in range(64)]

    def write(path: Path, n: int) -> None:
        tmp = path.parent / f".{path.name}.part"
        tmp.write_text(f"---\nid: {path.name.split()[0]}\ntitle: v{n}\n---\n")
        os.replace(tmp, path)

    for n, path in enumerate(paths):
        write(path, n)

    def churn() -> None:  # files change, vanish and return; the cache forgets some
        for n in range(3000):
            path = paths[n % len(paths)]
            if n % 4 == 1:
                path.unlink(missing_ok=True)
            else:
                write(path, n)
            with contextlib.suppress(FileNotFoundError):
                backlog.read(path, whole=n % 2 == 0)
            backlog.unchanged(paths[n * 5 % len(paths)])
            if n % 3 == 0:
                backlog.forget(path)
            if n % 50 == 0:
                backlog.doubt()

    def trim() -> None:  # the main loop's side
        for n in range(3000):
            backlog.trim_cache()
            with contextlib.suppress(FileNotFoundError):
                backlog.read(paths[n * 7 % len(paths)])

    assert run_threads(churn, trim, trim) == []


def test_a_ticket_read_whole_is_read_again_after_an_event_or_a_reconcile(tmp_path: Path) -> None:
    backlog = Backlog(tmp_path / "backlog", STATUSES)
    backlog.ensure()
    path = backlog.folder("todo") / "task-1 - T.md"
    path.write_text("---\nid: task-1\ntitle: First\ndependencies: [task-9]\n---\nDo.\n")
    backlog.read(path)
    assert backlog.unchanged(path) is None  # read, but not known to be whole: probed first
    assert backlog.read(path, whole=True).title == "First"
    kept = backlog.unchanged(path)
    assert kept is not None and (kept.title, kept.dependencies) == ("First", ("task-9",))

    path.write_text("---\nid: task-1\ntitle: Second\n---\nDo.\n")  # and no event came
    assert backlog.unchanged(path, trust=False) is None  # what a claim asks
    backlog.doubt()  # what each reconcile does
    assert backlog.unchanged(path) is None
    assert backlog.read(path, whole=True).title == "Second"

    path.write_text("---\nid: task-1\ntitle: Third\n---\nDo.\n")
    backlog.forget(path)  # an event
    assert backlog.unchanged(path) is None
    assert backlog.read(path).title == "Third"


def passes(sup: Any, until: Callable[[], bool], what: str) -> None:
    """Run the loop's passes, as its wakes would, until ``until()``."""
    wait_until(lambda: sup.run_once() is not None and until(), what=what)


def test_a_ticket_edited_unseen_runs_as_it_is_now(project: Project) -> None:
    """watchdog can drop events: a ticket edited then runs with its new text, not a stale
    parse, and one edited to be ready is claimed by the next reconcile at the latest."""
    from daemon import config as configuration
    from daemon.supervisor import Supervisor

    project.ticket("task-1 - First.md", dependencies=["task-9"])
    project.ticket("task-2 - Second.md")
    sup = Supervisor(configuration.load(project.config_path), log_to_stderr=False)
    try:
        sup.prepare()
        # the loop's first pass reads both; no watcher runs here, as when events are lost
        passes(sup, lambda: not sup.active and "done" in project.where(), what="task-2 done")
        project.ticket("task-1 - First.md", title="Renamed")  # no longer waits for task-9
        sup.run_once()  # woken for something else: the dependency's edit is not seen yet
        assert project.where()["todo"] == ["task-1 - First.md"]
        sup.run_once(now=sup.next_reconcile)  # the reconcile sees it
        passes(sup, lambda: len(project.where().get("done", [])) == 2, what="task-1 done")
        assert "ticketd/task-1-renamed" in project.remote_branches()
    finally:
        sup.shutdown()


def test_a_waiting_ticket_rewritten_unseen_is_not_claimed_half_written(project: Project) -> None:
    from daemon import config as configuration
    from daemon.supervisor import Supervisor

    project.write_config(concurrency={"max_tickets": 1})
    path = project.ticket("task-1 - First.md", priority="low")
    project.ticket("task-2 - Second.md", priority="high")
    sup = Supervisor(configuration.load(project.config_path), log_to_stderr=False)
    try:
        sup.prepare()
        sup.run_once()  # task-2 runs; task-1 is read whole and waits for the worker
        assert project.where()["todo"] == ["task-1 - First.md"]
        with path.open("w") as f:  # rewritten in place, unseen (no watcher runs here)
            f.write("---\nid: task-1\ntitle: Rewritten\n")
            f.flush()
            passes(sup, lambda: not sup.active and "done" in project.where(), what="task-2")
            for _ in range(3):  # the worker is free: the next passes look at task-1 again
                sup.run_once()
            assert project.where()["todo"] == ["task-1 - First.md"], "claimed half-written"
            f.write("status: To Do\n---\n\nWritten in two parts.\n")
        passes(sup, lambda: len(project.where().get("done", [])) == 2, what="task-1 done")
        done = (project.folder("done") / "task-1 - First.md").read_text()
        assert "Written in two parts." in done
        assert "ticketd/task-1-rewritten" in project.remote_branches()
    finally:
        sup.shutdown()


def test_after_a_restart_waiting_tickets_are_as_they_are_now(project: Project) -> None:
    """What the index kept of each waiting ticket serves the first pass after a start, and
    a ticket edited while the daemon was away is read again."""
    from daemon import config as configuration
    from daemon.supervisor import Supervisor

    project.ticket("task-1 - First.md", dependencies=["task-9"])
    project.ticket("task-2 - Second.md", dependencies=["task-9"])
    cfg = configuration.load(project.config_path)
    for edit in (False, True):
        if edit:  # while the daemon is away, task-2 no longer waits
            project.ticket("task-2 - Second.md", title="Now")
        sup = Supervisor(cfg, log_to_stderr=False)
        try:
            sup.prepare()
            sup.run_once()
            if edit:
                passes(sup, lambda: "done" in project.where(), what="task-2 done")
        finally:
            sup.shutdown()
    assert project.where() == {"todo": ["task-1 - First.md"], "done": ["task-2 - Second.md"]}
    assert "ticketd/task-2-now" in project.remote_branches()


def test_status_while_the_queue_drains(tmp_path: Path) -> None:
    backlog = Backlog(tmp_path / "backlog", STATUSES)
    backlog.ensure()
    zoo = make_zoo(backlog.folder("done"), tmp_path)  # invalid tickets where the plan looks
    for i in range(1, 151):
        deps = "[task-1]" if i % 2 else "[]"
        path = backlog.folder("todo") / f"task-{i} - T.md"
        path.write_text(f"---\nid: task-{i}\ntitle: T {i}\ndependencies: {deps}\n---\nDo.\n")
    store = Store(tmp_path / "state" / "history.sqlite3")
    drained = threading.Event()
    reports: list[dict[str, Any]] = []

    def drain() -> None:  # claim each ticket, then finish it, as a daemon does
        try:
            for path in backlog.files("todo"):
                lease = backlog.claim(path.name, NOW, f"claim-{path.name}")
                assert lease is not None
                backlog.move(lease.path, "done", NOW)
                backlog.release(lease)
        finally:
            drained.set()

    def watch() -> None:
        while not drained.is_set():
            reports.append(collect(backlog, store, NOW))

    try:
        assert run_threads(drain, watch) == []
    finally:
        store.close()
    assert reports and not backlog.files("todo")
    for report in reports:  # a ticket moving on may be counted twice, never missed
        assert sum(report["counts"].values()) >= 150 + len(zoo)
