"""The ticket index (daemon/index.py): duplicate detection and dependencies answered from it
must be what a scan of the folders would answer, kept current by the daemon's own moves,
watchdog's events and refreshes, and robust to a damaged index file and hostile folders."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import time
from pathlib import Path

import yaml
from conftest import (
    Daemon,
    Project,
    fill,
    notified_daemon,
    small_disk,
    ticketd,
    wait_until,
)

from daemon.backlog import FOLDERS, Backlog

STATUSES = {"todo": "To Do", "in-progress": "In Progress", "review": "Review"}
STATUSES |= {"done": "Done", "failed": "Failed"}
VOCABULARY = [f"w{i}" for i in range(60)]  # small: many tickets share many words


def write(folder: Path, n: int, words: list[str], **fm: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"task-{n} - T.md"
    meta = {"id": f"task-{n}", "title": "T", "status": "To Do", **fm}
    text = "---\n" + yaml.safe_dump(meta) + "---\n\n## Description\n\n" + " ".join(words) + "\n"
    path.write_text(text)
    return path


def backlog(root: Path) -> Backlog:
    b = Backlog(root, STATUSES, index=root / "state" / "index.sqlite3")
    b.ensure()
    return b


def scan(b: Backlog, words: frozenset[str], threshold: float) -> set[str]:
    """What the index must answer, by brute force over every ticket file."""
    found = set()
    for folder in FOLDERS:
        for path in b.files(folder):
            theirs = b.read(path).words
            if theirs and len(words & theirs) / len(words | theirs) >= threshold:
                found.add(f"{folder}/{path.name}")
    return found


def test_similar_tickets_are_exactly_those_a_full_scan_finds(tmp_path: Path) -> None:
    rng = random.Random(7)
    b = backlog(tmp_path)
    for n in range(300):
        size = rng.randint(1, 12)
        write(
            tmp_path / rng.choice(FOLDERS), n, rng.sample(VOCABULARY[: rng.randint(12, 60)], size)
        )
    for _ in range(60):
        query = frozenset(
            [*rng.sample(VOCABULARY[:20], rng.randint(1, 10)), "t"]  # "t": every title
        )
        for threshold in (0.2, 0.5, 0.8, 1.0):
            got = {f"{s.folder}/{s.path.name}" for s in b.index.similar(query, threshold)}
            assert got == scan(b, query, threshold), (sorted(query), threshold)


def test_a_duplicate_among_many_done_tickets_is_found_and_old_ones_are_not(
    tmp_path: Path,
) -> None:
    b = backlog(tmp_path)
    text = "make the login page redirect back to where the user came from".split()
    for n in range(500):
        write(tmp_path / "done", n, [f"unrelated{n}", f"words{n}", "page"], status="Done")
    old = write(tmp_path / "done", 900, text, status="Done")
    new = write(tmp_path / "todo", 1000, text)
    ticket = b.read(new)
    now = time.time()
    found = b.duplicate_of(ticket, 0.8, 30, now)
    assert found is not None and found.id == "task-900"
    os.utime(old, (now - 40 * 86400, now - 40 * 86400))  # done 40 days ago: out of the window
    b.forget(old)
    assert b.duplicate_of(ticket, 0.8, 30, now) is None
    earlier = write(tmp_path / "todo", 999, text)  # of two in todo/, the later is the duplicate
    b.forget(earlier)
    assert b.duplicate_of(ticket, 0.8, 30, now).id == "task-999"  # type: ignore[union-attr]
    assert b.duplicate_of(b.read(earlier), 0.8, 30, now) is None


def test_a_ticket_edited_in_place_is_read_again(tmp_path: Path) -> None:
    b = backlog(tmp_path)
    done = write(tmp_path / "done", 1, ["alpha", "beta", "gamma"], status="Done")
    query = b.read(write(tmp_path / "todo", 2, ["delta", "epsilon", "zeta"]))
    assert b.duplicate_of(query, 0.8, 30, time.time()) is None
    text = done.read_text().replace("alpha beta gamma", "delta epsilon zeta")
    with done.open("r+") as f:  # the same inode: only its size and mtime say it changed
        f.write(text)
        f.truncate()
    b.forget(done)  # what watchdog's event does in the daemon
    assert b.duplicate_of(query, 0.8, 30, time.time()).id == "task-1"  # type: ignore[union-attr]
    other = backlog(tmp_path)  # another process: it lists and compares what lstat says
    assert other.duplicate_of(query, 0.8, 30, time.time()).id == "task-1"  # type: ignore[union-attr]


def test_the_index_is_kept_on_disk_and_only_changed_files_are_read_again(
    tmp_path: Path,
) -> None:
    b = backlog(tmp_path)
    for n in range(50):
        write(tmp_path / "done", n, ["word", str(n)], status="Done")
    assert b.index.refresh() == 50
    assert len(b.done_ids()) == 50
    again = backlog(tmp_path)  # a restart
    assert again.index.refresh() == 0
    (tmp_path / "done" / "task-7 - T.md").rename(tmp_path / "failed" / "task-7 - T.md")
    assert again.index.refresh() == 2  # gone from done/, come to failed/
    assert "task-7" not in again.done_ids()
    assert again.whereabouts()["task-7"] == "failed"


def test_a_damaged_index_file_is_replaced(tmp_path: Path) -> None:
    index = tmp_path / "state" / "index.sqlite3"
    index.parent.mkdir()
    index.write_bytes(b"this is no database" * 100)
    b = backlog(tmp_path)
    write(tmp_path / "done", 1, ["x"], status="Done")
    assert b.done_ids() == ["task-1"]
    with sqlite3.connect(index) as db:  # a working index now stands there
        assert db.execute("SELECT count(*) FROM tickets").fetchone()[0] == 1


def test_an_index_that_cannot_be_written_lives_in_memory(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("a file where the state folder would be")
    b = Backlog(tmp_path, STATUSES, index=tmp_path / "state" / "index.sqlite3")
    b.ensure()
    write(tmp_path / "done", 1, ["x"], status="Done")
    assert b.done_ids() == ["task-1"]


def test_links_fifos_and_junk_in_the_folders_are_not_read(tmp_path: Path) -> None:
    secret = tmp_path / "outside.md"
    secret.write_text("---\nid: task-77\ntitle: secret\n---\n\nsecret words here\n")
    b = backlog(tmp_path)
    (tmp_path / "done" / "task-5 - Link.md").symlink_to(secret)
    os.mkfifo(tmp_path / "done" / "task-6 - Fifo.md")  # reading it would block forever
    (tmp_path / "done" / "task-8 - Bin.md").write_bytes(b"\xff\xfe\x00junk")
    query = b.read(write(tmp_path / "todo", 9, ["secret", "words", "here"], title="secret"))
    assert b.duplicate_of(query, 0.5, 30, time.time()) is None
    assert b.done_ids() == []
    briefs, invalid = b.briefs()
    assert [t.id for t in briefs] == ["task-9"] and invalid == {}


def test_a_done_ticket_put_there_by_hand_counts_at_once(project: Project, daemons: list) -> None:
    """The daemon's index follows watchdog's events: a ticket moved into done/ by a person
    while it runs makes the next ticket like it a duplicate, long before a reconcile."""
    project.write_config(intake={"reconcile_interval_s": 3600, "settle_s": 0.2})
    body = "Add a health endpoint that reports the queue depth and the oldest ticket age."
    daemons.append(Daemon(project))
    project.ticket("task-1 - Health.md", folder="done", body=body, status="Done")
    time.sleep(0.5)  # the event is asynchronous: give it its moment, as a person would
    project.ticket("task-2 - Health-again.md", body=body)
    wait_until(lambda: project.where().get("review"), what="task-2 held as a duplicate")
    record = project.folder("review") / "task-2 - Health-again.review.json"
    assert json.loads(record.read_text())["reason"] == "DUPLICATE"


def test_status_shows_the_first_rows_and_says_how_many_more(project: Project) -> None:
    for n in range(1, 26):
        project.ticket(f"task-{n} - Job-{n}.md")
    short = ticketd("status", "--config", str(project.config_path))
    assert short.returncode == 0, short.stderr
    assert "task-20 " in short.stdout and "task-21 " not in short.stdout
    assert "... and 5 more (--all lists them)" in short.stdout
    full = ticketd("status", "--all", "--config", str(project.config_path))
    assert "task-25 " in full.stdout and "more (--all" not in full.stdout
    report = json.loads(ticketd("status", "--json", "--config", str(project.config_path)).stdout)
    assert len(report["waiting"]) == 25


def test_a_full_disk_under_the_index_leaves_the_answers_right(tmp_path: Path) -> None:
    """The index is a cache: when its file cannot be written (a full disk), questions are
    answered from one in memory, never an error in the daemon's loop."""
    state = tmp_path / "state"
    state.mkdir()
    with small_disk(state):
        b = backlog(tmp_path)
        text = "rotate the signing keys every ninety days and log each rotation".split()
        write(tmp_path / "done", 1, text, status="Done")
        assert b.done_ids() == ["task-1"]
        filler = fill(state)
        for n in range(2, 60):  # enough rows that the index must grow its file
            write(tmp_path / "done", n, [f"other{n}", *VOCABULARY[n % 50 : n % 50 + 8]])
        b.index.refresh()
        ticket = b.read(write(tmp_path / "todo", 100, text))
        assert b.duplicate_of(ticket, 0.8, 30, time.time()).id == "task-1"  # type: ignore[union-attr]
        assert len(b.done_ids()) == 59
        filler.unlink()


def test_a_long_first_index_keeps_systemd_waiting_and_says_so(
    project: Project, tmp_path: Path
) -> None:
    """The first start on a large backlog reads every ticket into the index before it is
    ready: systemd is asked to wait longer after each batch, so a big backlog is not
    killed for a slow start, and the log says what took the time."""
    for n in range(1, 601):
        project.ticket(f"task-{n} - Old-{n}.md", folder="done", status="Done")
    with notified_daemon(project, tmp_path) as (proc, sock):
        before_ready: list[str] = []
        while not any("READY=1" in m for m in before_ready):
            before_ready.append(sock.recv(4096).decode())
        extended = [m for m in before_ready if "EXTEND_TIMEOUT_USEC=" in m]
        assert len(extended) >= 2, before_ready  # one per batch of 200 read
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    out = tmp_path / "daemon.out"
    assert "ticket index: read 600 ticket file(s)" in out.read_text()
