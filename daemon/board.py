"""The Backlog.md layout: ticketd works inside a Backlog.md project as its CLI does.

Every task stays in ``tasks/`` (Backlog.md's own folders: ``drafts/``, ``completed/``,
``archive/``); its state is its ``status``, one of the project's ``statuses`` in
``config.yml``. A task is ticketd's when its status is the project's first one (To Do) and
it is assigned to ``backlog.assignee`` (``@ticketd``) or carries ``backlog.label``. The five
states of the folder layout are read from the task and from ticketd's own files under
``<state_dir>/board/``:

    done         its status is the project's done status
    in-progress  ticketd claimed it (``leases/<key>.lock`` records the claim) and its status
                 says so
    review       its status says so and ``review/<key>.review.json`` is there (a hold, or a
                 pull request open)
    failed       its status says so (To Do), ``failed/<key>.error.json`` is there, and it is
                 not handed over again
    todo         To Do and handed over to ticketd

A task a person gives another status is out of ticketd's hands, as a file moved by hand
is in the folder layout: a run of it ends, a retry or a pull request no longer concerns it.

A task is known by its key, ``<id>.md`` from its file name: Backlog.md renames the file when
the title changes, never the id in front. Moves rewrite the status in place (temp file and
rename, every other byte kept, the file read afresh so a person's edit is kept); a failed
task goes back to To Do without ticketd's handle, with a dated line in its Implementation
Notes.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon import files, tickets
from daemon.backlog import FOLDERS, Backlog, Lease, Plannable
from daemon.errors import ConfigError, InvalidTicket
from daemon.frontmatter import load as load_yaml

if TYPE_CHECKING:
    from daemon.config import Config

PROJECT_FILE = "config.yml"
MAX_PROJECT_BYTES = 256 * 1024
# Backlog.md's folders that hold tasks with ids (ids are never reused across them).
ID_FOLDERS = ("tasks", "drafts", "completed", "archive/tasks", "archive/drafts")
_ID = re.compile(r"(?:([A-Za-z]+)-)?(\d+(?:\.\d+)*)")


@dataclass(frozen=True)
class Project:
    """What ticketd reads of a Backlog.md project's ``config.yml``."""

    path: Path
    statuses: tuple[str, ...]
    task_prefix: str = "task"
    zero_padded_ids: int = 0


def read_project(root: Path) -> Project:
    """``<root>/config.yml``; a ConfigError naming the file for anything unusable."""
    path = root / PROJECT_FILE
    try:
        data = load_yaml(files.read_regular(path, MAX_PROJECT_BYTES).decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: missing; a Backlog.md project has one (run `backlog init` there), or "
            "set backlog.layout: folders"
        ) from None
    except (OSError, UnicodeDecodeError, files.NotAFile, files.TooLarge) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    except InvalidTicket as e:
        raise ConfigError(f"{path}: {e.message}") from None
    statuses = data.get("statuses")
    if (
        not isinstance(statuses, list)
        or len(statuses) < 2
        or not all(isinstance(s, str) and s.strip() for s in statuses)
    ):
        raise ConfigError(
            f"{path}: statuses must be a list of at least two names, such as "
            '["To Do", "In Progress", "Done"]; it is ' + repr(statuses)
        )
    prefix = str(data.get("task_prefix") or "task").strip()
    if not re.fullmatch(r"[A-Za-z]+", prefix):
        raise ConfigError(f"{path}: task_prefix must be letters only, not {prefix!r}")
    padded = data.get("zero_padded_ids") or 0
    if not isinstance(padded, int) or isinstance(padded, bool) or not 0 <= padded <= 32:
        raise ConfigError(f"{path}: zero_padded_ids must be a number of digits, not {padded!r}")
    return Project(path, tuple(s.strip() for s in statuses), prefix, padded)


def project_statuses(cfg: Config, project: Project) -> dict[str, str]:
    """The status ticketd writes for each state: from the project's own statuses (first: To
    Do, "In Progress", a status named like "review" if there is one, "Done" or else the
    last), or ``backlog.statuses.*``
    where set. Each must be one of the project's; a ConfigError names the one that is not."""
    names = project.statuses
    known = {n.casefold(): n for n in names}
    progress = known.get("in progress") or (names[1] if len(names) > 2 else None)
    review = next((n for n in names if "review" in n.casefold()), progress)
    done = known.get("done") or names[-1]  # "Wontfix" may come after Done
    derived = {"todo": names[0], "in-progress": progress, "review": review, "done": done}
    derived["failed"] = names[0]
    explicit = cfg.backlog.statuses
    chosen: dict[str, str] = {}
    for folder in FOLDERS:
        field = folder.replace("-", "_")
        value = getattr(explicit, field) if field in explicit.model_fields_set else None
        if value is None and derived[folder] is None:
            raise ConfigError(
                f"{project.path}: no status for work in progress among {list(names)}; add "
                f"one there or set backlog.statuses.{folder} in {cfg.path}"
            )
        wanted = value or derived[folder] or ""
        if wanted.casefold() not in known:
            raise ConfigError(
                f"{cfg.path}: backlog.statuses.{folder} is {wanted!r}, which is not one of the "
                f"statuses of {project.path}: {list(names)}"
            )
        chosen[folder] = known[wanted.casefold()]
    return chosen


def folder_statuses(cfg: Config) -> dict[str, str]:
    """The folder layout's ``status`` for each folder (``backlog.statuses``)."""
    s = cfg.backlog.statuses
    return {f: getattr(s, f.replace("-", "_")) for f in FOLDERS}


def layout_of(cfg: Config) -> str:
    """``backlog.layout``, with ``auto`` decided by what the backlog folder holds."""
    layout = cfg.backlog.layout
    if layout != "auto":
        return layout
    root = cfg.backlog.dir
    board = (root / PROJECT_FILE).is_file() and (root / "tasks").is_dir()
    return "backlog.md" if board else "folders"


def open_backlog(cfg: Config) -> Backlog:
    """The backlog ``cfg`` describes, in its layout. Raises ConfigError."""
    if layout_of(cfg) == "folders":
        return Backlog(cfg.backlog.dir, folder_statuses(cfg), index=index_file(cfg))
    project = read_project(cfg.backlog.dir)
    if not (cfg.backlog.dir / "tasks").is_dir():
        raise ConfigError(f"{cfg.backlog.dir / 'tasks'}: missing; is this a Backlog.md project?")
    return Board(
        cfg.backlog.dir,
        project_statuses(cfg, project),
        state=cfg.state_dir / "board",
        project=project,
        assignee=cfg.backlog.assignee,
        label=cfg.backlog.label,
        index=index_file(cfg),
    )


def index_file(cfg: Config) -> Path:
    """The ticket index's file (``daemon/index.py``), in the state folder."""
    return cfg.state_dir / "index.sqlite3"


def _handle(name: str) -> str:
    return name.strip().removeprefix("@").casefold()


class Board(Backlog):
    layout = "backlog.md"
    indexed = ("tasks", "completed")
    keeps_whole = True  # every listing asks each task's status, assignees and labels

    def __init__(
        self,
        root: Path,
        statuses: Mapping[str, str],
        *,
        state: Path,
        project: Project,
        assignee: str = "@ticketd",
        label: str | None = None,
        index: Path | None = None,
    ) -> None:
        super().__init__(root, statuses, index)
        self.state = state
        self.leases = state / "leases"
        self.project = project
        self.assignee = assignee if assignee.startswith("@") else "@" + assignee
        self.label = label
        self._problems: dict[Path, str] = {}

    def ensure(self) -> None:
        for name in ("leases", "failed", "review"):
            (self.state / name).mkdir(parents=True, exist_ok=True)
        files.remove_stale_temp(self.root / "tasks")

    def folder(self, name: str) -> Path:
        """tasks/ for todo (the folder watched); ticketd's own folder for the others."""
        return self.root / "tasks" if name == "todo" else self.state / name

    def key(self, path: Path) -> str:
        return tickets.id_from_filename(path).lower() + ".md"

    # -- reading the board ------------------------------------------------------------------

    def _tasks(self) -> list[tuple[Path, tickets.Ticket]]:
        """The readable tasks of tasks/, less those whose id another file has too (both are
        named in ``problems``: Backlog.md cannot tell them apart either)."""
        problems: dict[Path, str] = {}
        read: list[tuple[Path, tickets.Ticket]] = []
        for path in self._listing("tasks"):
            try:
                read.append((path, self.read(path)))
            except FileNotFoundError:
                continue
            except InvalidTicket as e:
                problems[path] = f"cannot be read as a task: {e.message}"
        by_id: dict[str, list[Path]] = {}
        for path, ticket in read:
            by_id.setdefault(ticket.id.casefold(), []).append(path)
            if self.key(path) != ticket.id.casefold() + ".md":
                by_id.setdefault(self.key(path).removesuffix(".md"), []).append(path)
        for task_id, paths in by_id.items():
            if len(set(paths)) > 1:
                names = " and ".join(p.name for p in sorted(set(paths)))
                for path in paths:
                    problems[path] = (
                        f"id {task_id.upper()} is used by {names}; neither runs until one "
                        "has a new id (`backlog doctor --fix` renumbers)"
                    )
        self._problems = problems
        return [(p, t) for p, t in read if p not in problems]

    def problems(self) -> dict[Path, str]:
        """As of the last listing."""
        return dict(self._problems)

    def _handed(self, ticket: tickets.Ticket) -> bool:
        mine = _handle(self.assignee)
        if any(_handle(a) == mine for a in ticket.assignees):
            return True
        return self.label is not None and any(
            x.casefold() == self.label.casefold() for x in ticket.labels
        )

    def _is(self, ticket: tickets.Ticket, folder: str) -> bool:
        return (ticket.status or "").casefold() == self.statuses[folder].casefold()

    def _state(self, path: Path, ticket: tickets.Ticket) -> str | None:
        name = self.key(path)
        if self._is(ticket, "done"):
            return "done"
        if self._is(ticket, "in-progress") and self._claimed(name):
            return "in-progress"
        if self._is(ticket, "review") and self.record("review", name).exists():
            return "review"
        mine = self._is(ticket, "todo") and self._handed(ticket)
        if not mine and self._is(ticket, "failed") and self.record("failed", name).exists():
            return "failed"
        return "todo" if mine else None

    def _claimed(self, name: str) -> bool:
        """A claim's lease is there: ``claim`` writes what it records before the status
        (``take``, which only locks, writes nothing)."""
        try:
            return os.stat(self.lock_path(name)).st_size > 0
        except FileNotFoundError:
            return False

    def files(self, folder: str) -> list[Path]:
        found = [p for p, t in self._tasks() if self._state(p, t) == folder]
        if folder == "done":
            found += self._listing("completed")
        return found

    def count(self, folder: str) -> int:
        return len(self.files(folder))

    def _find(self, name: str) -> tuple[Path, tickets.Ticket] | None:
        for path, ticket in self._tasks():
            if self.key(path) == name:
                return path, ticket
        return None

    def state_of(self, name: str) -> str | None:
        found = self._find(name)
        return self._state(*found) if found else None

    def locate(self, name: str, folder: str) -> Path | None:
        found = self._find(name)
        return found[0] if found and self._state(*found) == folder else None

    def present(self, lease: Lease) -> bool:
        """The task is still there (under its name now, if its title changed) and still
        In Progress: a person who set another status took it back."""
        found = self._find(lease.name)
        if found is None or not self._is(found[1], "in-progress"):
            return False
        lease.path = found[0]
        return True

    def canonical(self, task_id: str) -> str:
        """As Backlog.md matches ids: the prefix optional (the project's) and of any case,
        leading zeros ignored (``3``, ``task-3``, ``TASK-003`` are one task)."""
        found = _ID.fullmatch(task_id.strip())
        if found is None:
            return task_id.strip().casefold()
        prefix = (found[1] or self.project.task_prefix).casefold()
        return prefix + "-" + ".".join(str(int(n)) for n in found[2].split("."))

    def briefs(self) -> tuple[Sequence[Plannable], dict[Path, str]]:
        """The tasks handed to ticketd, read (their state is not the index's to say)."""
        found = []
        for path in self.files("todo"):
            with contextlib.suppress(FileNotFoundError, InvalidTicket):
                found.append(self.read(path))
        return found, {}

    def _indexed_state(self, path: Path) -> str | None:
        if path.parent.name == "completed":
            return "done"
        return self._state(path, self.read(path))

    def done_ids(self) -> list[str]:
        """Done as Backlog.md counts it for dependencies: in ``completed/``, or in the
        project's last status (or the status ticketd writes for done)."""
        last = self.project.statuses[-1].casefold()
        ids = [
            t.id
            for p, t in self._tasks()
            if self._is(t, "done") or (t.status or "").casefold() == last
        ]
        for path in self._listing("completed"):
            try:
                ids.append(self.read(path).id)
            except (InvalidTicket, OSError):
                ids.append(tickets.id_from_filename(path))
        return ids

    def whereabouts(self) -> dict[str, str]:
        return {self.canonical(t.id): t.status or "no status" for _, t in self._tasks()}

    def ticket_ids(self) -> list[str]:
        ids = []
        for folder in ID_FOLDERS:
            for path in self._listing(folder):
                ids.append(tickets.id_from_filename(path))
                try:
                    ids.append(self.read(path).id)
                except (InvalidTicket, OSError):
                    continue
        return ids

    def new_id(self, prefix: str) -> str:
        """As Backlog.md numbers: its ``task_prefix`` upper-cased, ``zero_padded_ids`` digits."""
        p = self.project
        return tickets.next_id(self.ticket_ids(), p.task_prefix.upper(), p.zero_padded_ids)

    def new_ticket_path(self, ticket_id: str, title: str) -> Path:
        return self.root / "tasks" / tickets.filename_for(ticket_id, title)

    def new_ticket_fields(self) -> dict[str, Any]:
        return {"status": self.statuses["todo"], "assignee": [self.assignee]}

    def failure_note(self, record: Mapping[str, Any], now: datetime) -> str:
        """The dated line a failed task gets in its Implementation Notes: what failed and what
        to do (the whole record is ticketd's ``.error.json``)."""
        if record.get("retryable"):
            then = f"A retry is due after {record['nextRetryAt']}; to run it sooner, assign"
        else:
            then = "A retry cannot help as it is: change what the error names, then assign"
        return (
            f"- {now.strftime('%Y-%m-%d %H:%M')} ticketd: failed in stage {record['stage']} "
            f"({record['errorCode']}): {record['error']} {then} it to {self.assignee} again. "
            f"(`ticketd retry-failed --task-id {record['taskId']} --dry-run` says more.)"
        )

    # -- moves ------------------------------------------------------------------------------

    def _enter(self, name: str, source: str) -> tuple[Path, Path]:
        path = self.locate(name, source)
        if path is None:
            raise FileNotFoundError(name)
        return path, path

    def _leave(self, src: Path, dst: Path) -> None:
        """Nothing to undo: the status was not written."""

    def target(self, folder: str, name: str) -> Path:
        found = self._find(name)
        return found[0] if found else self.root / "tasks" / name

    def _follow(self, path: Path) -> Path:
        """The task's file now: renamed meanwhile (a new title), found by its id."""
        if os.path.lexists(path):
            return path
        found = self._find(self.key(path))
        if found is None:
            raise FileNotFoundError(path)
        return found[0]

    def _place(self, path: Path, folder: str, dst: Path | None) -> Path:
        """The file stays where it is; back in todo/ or done, ticketd's records of it go."""
        if folder in ("todo", "done"):
            for kind in ("failed", "review"):
                self.record(kind, self.key(path)).unlink(missing_ok=True)
        return path

    def _edit(self, ticket: tickets.Ticket, folder: str, text: str, note: str) -> str:
        """Failed: ticketd's handle goes (a person, or the retry job, hands it over again)
        and ``note`` goes into Implementation Notes. Back to todo/: the handle is back."""
        if folder == "failed":
            mine = _handle(self.assignee)
            updates: dict[str, Sequence[str]] = {
                "assignee": [a for a in ticket.assignees if _handle(a) != mine]
            }
            label = (self.label or "").casefold()
            if label and label in map(str.casefold, ticket.labels):
                updates["labels"] = [x for x in ticket.labels if x.casefold() != label]
            text = tickets.update_frontmatter(text, updates)
            return tickets.append_note(text, note) if note else text
        if folder == "todo" and not self._handed(ticket):
            return tickets.update_frontmatter(
                text, {"assignee": [*ticket.assignees, self.assignee]}
            )
        return text
