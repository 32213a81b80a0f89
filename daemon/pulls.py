"""Pull requests after they open: merged -> done, closed -> failed, review requests ->
revisions.

With ``github.enabled`` and ``github.done_when: merged``, a ticket whose pull request is open
waits in ``review/`` beside a ``.review.json`` with ``reason: PR_OPEN`` (and the pull
request's number, URL and branch). ``Watch.tick``, a scheduled job, asks GitHub about each
such pull request every ``github.poll_interval_s`` with a conditional request (a 304 costs
nothing against the rate limit), or at once when a webhook delivery names it:

- merged (GitHub's ``merged``, so squash merges count): the ticket goes to ``done/``;
- closed unmerged: to ``failed/`` with PR_CLOSED (a person moves it back to run it again);
- open and changed (or every ``github.full_read_s``): the conversation is read, and what it
  asks of ticketd becomes one revision run.

A request is a comment, review or inline review comment containing ``github.trigger``
(``@ticketd``), or a "changes requested" review when ``github.revise_on_changes_requested``,
written by someone with write access (or named in ``github.allowed_logins``). What ticketd
writes carries a hidden marker (``<!-- ticketd -->``) and is never a request: it posts with a
person's token, so "skip bots" would not do. Whether a request was answered is read back
from GitHub itself: ticketd's summary comments list the requests they answered. Requests of
one pull request are coalesced: a revision starts when the newest is ``github.debounce_s``
old, and nothing written or edited after the newest request reaches the agent. At most
``github.max_revisions`` revisions per pull request and ``github.max_revisions_per_hour`` in
all; each limit reached is said on the pull request once.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from loguru import logger

from daemon.backlog import Backlog
from daemon.errors import PRFailed, TicketdError
from daemon.inreview import Open as Open
from daemon.inreview import open_pulls

if TYPE_CHECKING:
    from daemon.forge import Forge

MARKER = "<!-- ticketd -->"
HANDLED = re.compile(r"<!-- ticketd:handled ([a-z0-9,]*) -->")
REVISION = re.compile(r"<!-- ticketd:revision (\d+) -->")
LIMIT = re.compile(r"<!-- ticketd:limit ([a-z_]+) -->")
MAX_HUNK = 1500  # characters of one thread's diff hunk shown to the agent
MAX_NOTE = 2000  # characters of one comment shown to the agent
MAX_DIFF = 12000  # characters of the pull request's diff shown to the agent


@dataclass(frozen=True)
class Note:
    """One thing a person (or ticketd) wrote on a pull request: an issue ``comment``, a
    ``review`` (its body and state), or an ``inline`` review comment on a line."""

    id: int
    kind: str  # comment | review | inline
    author: str
    body: str
    created: datetime
    updated: datetime
    state: str = ""  # a review's: APPROVED, CHANGES_REQUESTED, COMMENTED
    path: str | None = None
    line: int | None = None
    hunk: str = ""
    reply_to: int | None = None  # an inline comment's thread (its first comment's id)

    @property
    def thread(self) -> int:
        return self.reply_to or self.id


def key(note: Note) -> str:
    """A note's id with its kind (comments, reviews and inline comments number apart)."""
    return f"{note.kind[0]}{note.id}"


@dataclass(frozen=True)
class Thread:
    """An inline review thread: where it is, and the notes the agent sees, oldest first."""

    root: int  # the first comment's id: replies go there
    path: str
    line: int | None
    hunk: str
    notes: tuple[Note, ...]
    request: int  # the id of the note that is the request (the last that asks)


@dataclass(frozen=True)
class Request:
    """What one revision answers."""

    asks: tuple[Note, ...]  # the requests, oldest first
    threads: tuple[Thread, ...]
    general: tuple[Note, ...]  # requests on the pull request as a whole
    at: datetime  # the newest request's time: nothing written or edited later is used

    @property
    def keys(self) -> list[str]:
        return [key(n) for n in self.asks]


@dataclass(frozen=True)
class Revision:
    """A revision run: the pull request, its branch, and the request as the agent reads it."""

    number: int
    url: str
    branch: str
    index: int  # 1 for the first revision of this pull request
    text: str
    threads: tuple[int, ...]  # the threads to reply in
    keys: tuple[str, ...]  # the requests it answers (for the summary's marker)


class Rules:
    """Who and what may ask ticketd for a revision."""

    def __init__(
        self,
        me: str,
        trigger: str,
        may_write: Callable[[str], bool],
        allowed: Iterable[str] = (),
        on_changes_requested: bool = False,
    ) -> None:
        self.me = me.lower()
        self.trigger = trigger.lower()
        self.may_write = may_write
        self.allowed = {a.lower() for a in allowed}
        self.on_changes_requested = on_changes_requested

    def ours(self, note: Note) -> bool:
        """Written by ticketd: its account, its marker."""
        return note.author.lower() == self.me and MARKER in note.body

    def trusted(self, login: str) -> bool:
        return login.lower() in self.allowed or self.may_write(login)

    def asks(self, note: Note) -> bool:
        return not self.ours(note) and (
            self.trigger in note.body.lower()
            or (self.on_changes_requested and note.state == "CHANGES_REQUESTED")
        )


def handled(notes: Iterable[Note], rules: Rules) -> set[str]:
    """The requests ticketd's own notes say it answered."""
    done: set[str] = set()
    for note in notes:
        if rules.ours(note):
            for found in HANDLED.findall(note.body):
                done.update(k for k in found.split(",") if k)
    return done


def revisions(notes: Iterable[Note], rules: Rules) -> int:
    """How many revisions ticketd has made on this pull request, by its own notes."""
    return sum(1 for n in notes if rules.ours(n) and REVISION.search(n.body))


def said(notes: Iterable[Note], rules: Rules, limit: str) -> bool:
    return any(rules.ours(n) and limit in LIMIT.findall(n.body) for n in notes)


def pending(
    notes: Sequence[Note], rules: Rules, refused: Callable[[Note], None] = lambda n: None
) -> list[Note]:
    """The requests not answered yet, from people allowed to ask (``refused`` hears of the
    others)."""
    done = handled(notes, rules)
    asks = []
    for note in notes:
        if key(note) in done or not rules.asks(note):
            continue
        if rules.trusted(note.author):
            asks.append(note)
        else:
            refused(note)
    return asks


def request(notes: Sequence[Note], asks: Sequence[Note], rules: Rules) -> Request:
    """The revision for ``asks``: their threads (and, for a request on the whole pull
    request, every inline thread ticketd has not answered), each with the notes of people
    allowed to ask written and last edited before the newest request."""
    at = max(n.created for n in asks)
    asked = {n.id for n in asks if n.kind == "inline"}
    general = tuple(n for n in asks if n.kind != "inline")

    def usable(n: Note) -> bool:
        if n in asks:
            return True
        return not rules.ours(n) and n.updated <= at and rules.trusted(n.author)

    by_thread: dict[int, list[Note]] = {}
    for n in notes:
        if n.kind == "inline":
            by_thread.setdefault(n.thread, []).append(n)
    threads = []
    for root, members in by_thread.items():
        wanted = any(n.id in asked for n in members) or (
            general and not rules.ours(members[-1]) and members[0].created <= at
        )
        shown = [n for n in members if usable(n)]
        if not wanted or not shown:
            continue
        first = members[0]
        mine = [n for n in shown if n.id in asked]
        threads.append(
            Thread(
                root,
                first.path or "",
                first.line,
                first.hunk,
                tuple(shown),
                (mine or shown)[-1].id,
            )
        )
    return Request(tuple(asks), tuple(threads), general, at)


def so_far(diff: str) -> str:
    """The pull request's diff for the agent (its start, when long)."""
    if not diff:
        return ""
    cut = diff[:MAX_DIFF] + (
        "\n[... the rest of the diff is left out]" if len(diff) > MAX_DIFF else ""
    )
    return "\n".join(["### The pull request's changes so far", "", "```diff", cut, "```", ""])


def render(req: Request) -> str:
    """The request as the agent reads it (added to the ticket)."""
    parts = [
        "## Review of the pull request",
        "",
        "The pull request for this ticket is open, and a reviewer asks for changes. The",
        "checkout holds the pull request's branch as it is now, commits by people included:",
        "keep their work. Make the changes asked below, and nothing else.",
        "",
    ]
    for i, t in enumerate(req.threads, 1):
        where = f"`{t.path}`" + (f" line {t.line}" if t.line else "")
        parts += [f"### Request {i}: on {where}", "", "```diff", t.hunk[-MAX_HUNK:], "```", ""]
        for n in t.notes:
            label = " (the request)" if n.id == t.request else ""
            parts += [f"- {n.author}{label}: {_quote(n.body)}"]
        parts.append("")
    for j, n in enumerate(req.general, len(req.threads) + 1):
        what = "review" if n.kind == "review" else "comment"
        parts += [f"### Request {j}: a {what} by {n.author}", "", _quote(n.body) or n.state, ""]
    return "\n".join(parts)


def _quote(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MAX_NOTE else text[:MAX_NOTE] + " [...]"


def summary(
    revision: Revision,
    commit: str,
    diffstat: str,
    checks: Sequence[str],
    redact: Callable[[str], str],
) -> str:
    """The comment that closes a revision: what was pushed, what it answers (in its marker)."""
    lines = [
        f"Revision {revision.index}: pushed {commit[:12]} to `{revision.branch}`, answering "
        f"{len(revision.keys)} request(s).",
        "",
        "```",
        diffstat.strip() or "(no files)",
        "```",
        "",
        *[f"- {c}" for c in checks],
    ]
    return _inert(redact("\n".join(lines))) + "\n\n" + marks(revision.keys, revision=revision.index)


def failed(revision: Revision, error: TicketdError, redact: Callable[[str], str]) -> str:
    """The comment for a revision that pushed nothing: why."""
    why = "made no change" if error.code == "NO_CHANGES" else "could not make this revision"
    text = (
        f"ticketd {why} ({error.code}, stage {error.stage or 'run'}): {error.message}\n\n"
        "Nothing was pushed. Ask again (with the trigger) to try once more."
    )
    return _inert(redact(text)) + "\n\n" + marks(revision.keys)


def _inert(text: str) -> str:
    """Text from the agent or the repository (an error, file names) that ticketd posts: no
    HTML comment in it can pass for one of ticketd's markers."""
    return text.replace("<!--", "&lt;!--")


def marks(keys: Sequence[str] = (), *, revision: int | None = None, limit: str = "") -> str:
    out = MARKER
    if keys:
        out += f"<!-- ticketd:handled {','.join(keys)} -->"
    if revision is not None:
        out += f"<!-- ticketd:revision {revision} -->"
    if limit:
        out += f"<!-- ticketd:limit {limit} -->"
    return out


# -- the watch ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    trigger: str = "@ticketd"
    allowed_logins: tuple[str, ...] = ()
    revise_on_changes_requested: bool = False
    poll_interval_s: float = 60
    full_read_s: float = 900
    debounce_s: float = 30
    max_revisions: int = 5
    max_revisions_per_hour: int = 10


@dataclass
class _Seen:
    next_poll: float = 0.0  # monotonic
    last_full: float = -1e18
    refused: set[str] = field(default_factory=set)  # requests already logged as refused


class Watch:
    """The scheduled look at open pull requests. ``tick`` is cheap when nothing is due: it
    lists ``review/`` and asks GitHub only about pull requests whose time has come."""

    def __init__(
        self,
        s: Settings,
        forge: Forge,
        backlog: Backlog,
        *,
        merged: Callable[[Open, datetime | None], None],
        closed: Callable[[Open], None],
        revise: Callable[[Open, Revision], bool],
        recent_revisions: Callable[[], int],
        done_revisions: Callable[[int], int],
        redact: Callable[[str], str],
        clock: Callable[[], datetime],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.s = s
        self.forge = forge
        self.backlog = backlog
        self.merged, self.closed, self.revise = merged, closed, revise
        self.recent_revisions, self.done_revisions = recent_revisions, done_revisions
        self.redact = redact
        self.clock = clock
        self.monotonic = monotonic
        self.rules: Rules | None = None  # once GitHub has said whose the token is
        self._seen: dict[int, _Seen] = {}
        self._poked: set[int] = set()
        self._lock = threading.Lock()

    def poke(self, number: int) -> None:
        """Look at pull request ``number`` at the next tick (a webhook delivery named it)."""
        with self._lock:
            self._poked.add(number)

    def tick(self) -> None:
        """Look at every pull request whose time has come; GitHub away is logged and waited
        out, never a ticket's failure."""
        now = self.monotonic()
        with self._lock:
            poked, self._poked = self._poked, set()
        live = {o.number: o for o in open_pulls(self.backlog, tidy=True)}
        if live and self.rules is None:
            try:
                me = self.forge.login()
            except PRFailed as e:
                logger.warning("cannot ask GitHub whose the token is: {}; trying again", e.message)
                return
            s = self.s
            self.rules = Rules(
                me, s.trigger, self.forge.may_write, s.allowed_logins, s.revise_on_changes_requested
            )
        for number in [n for n in self._seen if n not in live]:
            del self._seen[number]
            self.forge.forget(number)
        for number, o in live.items():
            seen = self._seen.setdefault(number, _Seen())
            if number not in poked and now < seen.next_poll:
                continue
            seen.next_poll = now + self.s.poll_interval_s
            try:
                self._look(o, seen, now, full=number in poked)
            except PRFailed as e:
                logger.warning("pull request #{}: {}; asking again later", number, e.message)
            except Exception as e:  # a bug, a full disk: said where operators look
                logger.opt(exception=e).error("pull request #{}: {}", number, e)

    def _look(self, o: Open, seen: _Seen, now: float, *, full: bool) -> None:
        assert self.rules is not None
        rules = self.rules
        pull = self.forge.pull(o.number)
        if pull.state == "merged":
            self.merged(o, pull.merged_at)
            return
        if pull.state == "closed":
            self.closed(o)
            return
        if not (pull.changed or full or now - seen.last_full >= self.s.full_read_s):
            return
        seen.last_full = now
        notes = self.forge.conversation(o.number)

        def refused(note: Note) -> None:
            if key(note) not in seen.refused:
                seen.refused.add(key(note))
                logger.warning(
                    "pull request #{}: {} asked for a revision without write access; ignored",
                    o.number,
                    note.author,
                )

        asks = pending(notes, rules, refused)
        if not asks:
            return
        newest = max(n.created for n in asks)
        age = (self.clock() - newest).total_seconds()
        if age < self.s.debounce_s:  # more may follow: look again when the burst is over
            seen.next_poll = now + max(1.0, self.s.debounce_s - age)
            seen.last_full = -1e18
            return
        done = max(revisions(notes, rules), self.done_revisions(o.number))
        if done >= self.s.max_revisions:
            self._limit(
                o,
                notes,
                "max_revisions",
                f"ticketd has made {done} revisions of this pull request, its limit "
                f"(github.max_revisions: {self.s.max_revisions}); it will not revise it again.",
            )
            return
        if self.recent_revisions() >= self.s.max_revisions_per_hour:
            self._limit(
                o,
                notes,
                "per_hour",
                f"ticketd has made {self.s.max_revisions_per_hour} revisions in the last hour "
                "(github.max_revisions_per_hour); this request waits until the hour has "
                "passed.",
            )
            seen.last_full = -1e18
            return
        req = request(notes, asks, rules)
        revision = Revision(
            o.number,
            o.url,
            o.branch,
            done + 1,
            render(req),
            tuple(t.root for t in req.threads),
            tuple(req.keys),
        )
        if not self.revise(o, revision):
            seen.last_full = -1e18  # not started (the ticket is busy): look again next time
            return
        for note in asks:
            with contextlib.suppress(PRFailed):
                self.forge.react(o.number, note, "eyes")
        logger.info(
            "pull request #{}: revision {} for {} request(s) from {}",
            o.number,
            revision.index,
            len(asks),
            ", ".join(sorted({n.author for n in asks})),
        )

    def _limit(self, o: Open, notes: Sequence[Note], limit: str, text: str) -> None:
        assert self.rules is not None
        if said(notes, self.rules, limit):
            return
        logger.warning("pull request #{}: {}", o.number, text)
        self.forge.comment(o.number, self.redact(text) + "\n\n" + marks(limit=limit))
