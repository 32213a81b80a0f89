"""The operator's dashboard, served by the daemon's HTTP server at ``/``.

Pages are rendered on the server from Jinja2 templates (``templates/``, autoescaped: a ticket
title or a log line is text, never markup) out of what ``ticketd status`` and ``ticketd
stats`` read (the folders and the history), the Ollama pool's health, the failed and held
tickets' records and the tickets' logs. ``static/live.js`` (vendored, no build step) reloads a
page's ``<main>`` every few seconds; without it the page still shows everything, read-only.

Actions (retry a failed ticket, cancel a running one) need the server token
(``server.token_env``): a person signs in once with it at ``/login`` and gets a cookie
(``HttpOnly``, ``SameSite=Strict``); every action is a POST carrying a form token derived
from the server token, and one whose ``Origin`` or ``Sec-Fetch-Site`` says another site sent
it is refused. A client with ``Authorization: Bearer <token>`` needs neither. Without a
server token the pages are open and read-only, as every endpoint is then.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import mimetypes
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from daemon import config as configuration
from daemon import failures, procs, stats, status, tickets
from daemon.backlog import FOLDERS, RECORDS, Backlog
from daemon.errors import InvalidTicket
from daemon.files import atomic_write
from daemon.pipeline import safe_name
from daemon.store import Store

HERE = Path(__file__).parent
COOKIE = "ticketd_session"
LOG_TAIL = 16 * 1024  # bytes of a log shown on a page
MAX_FORM = 4096  # bytes of an action's form
NOTICES = {"retried": "The ticket is back in todo/.", "cancelled": "Cancel requested."}
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # "no-referrer" would make a form's Origin "null"
    "Cache-Control": "no-store",
}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: Mapping[str, str]  # lower-case names
    form: dict[str, str] = field(default_factory=dict)
    bearer: bool = False  # signed in with Authorization: Bearer


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Sources:
    """What the pages read and do, lent by the supervisor (read when a page is asked for,
    so they follow a reload)."""

    config: Callable[[], configuration.Config]
    backlog: Backlog
    clock: Callable[[], datetime]
    ollama: Callable[[], tuple[int, dict[str, Any]]]
    wake: Callable[[], None]
    redact: Callable[[str], str]
    redact_data: Callable[[Any], Any]


class Dashboard:
    def __init__(self, sources: Sources, token: str | None) -> None:
        from jinja2 import Environment, FileSystemLoader, select_autoescape  # with the server

        self.s = sources
        self.token = token
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(default=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters["secs"] = _secs
        self.templates.filters["pct"] = lambda v: "-" if v is None else f"{v:.0%}"
        self.templates.filters["ticket_url"] = lambda task_id: "/tickets/" + quote(task_id, "")
        self.templates.tests["safe_url"] = lambda url: (
            isinstance(url, str) and url.startswith(("https://", "http://"))
        )  # a link in a record is followed only when it is a web address

    # -- who may do what ---------------------------------------------------------------------

    def _secret(self, purpose: str) -> str:
        assert self.token is not None
        return hmac.new(self.token.encode(), purpose.encode(), hashlib.sha256).hexdigest()

    def signed_in(self, headers: Mapping[str, str]) -> bool:
        """Does the request carry the session cookie /login gave?"""
        if not self.token:
            return False
        jar = SimpleCookie()
        try:
            jar.load(headers.get("cookie", ""))
        except Exception:
            return False
        morsel = jar.get(COOKIE)
        return morsel is not None and hmac.compare_digest(morsel.value, self._secret("session"))

    def public(self, path: str) -> bool:
        """Paths anyone may ask for, token or not: the sign-in page and the static files."""
        return path == "/login" or path.startswith("/static/")

    def serves(self, path: str) -> bool:
        """Is ``path`` one of the dashboard's?"""
        return path in ("/", "/login", "/logout") or path.startswith(("/tickets/", "/static/"))

    def _may_act(self, request: Request) -> str | None:
        """Why this POST may not act (None: it may)."""
        if not self.token:
            return "actions need a server token (server.token_env)"
        if request.bearer:
            return None
        if not self.signed_in(request.headers):
            return "sign in first"
        site = request.headers.get("sec-fetch-site", "same-origin")
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        if site not in ("same-origin", "none") or (origin and urlsplit(origin).netloc != host):
            return "the request came from another site"
        if not hmac.compare_digest(request.form.get("csrf", ""), self._secret("csrf")):
            return "the form is stale: reload the page"
        return None

    # -- routes ------------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        path = request.path
        if path.startswith("/static/"):
            return self._static(path.removeprefix("/static/"))
        if path == "/login":
            return self._login(request)
        if path == "/logout" and request.method == "POST":
            return _redirect("/", {"Set-Cookie": f"{COOKIE}=; Max-Age=0; Path=/"})
        if path == "/":
            return self._page("index.html", request, **self._overview())
        found = re.fullmatch(r"/tickets/([^/]+)(?:/(retry|cancel))?", path)
        if found is None:
            return self._error(404, "No such page.", request)
        task_id, action = unquote(found[1]), found[2]
        where = self._find(task_id)
        if where is None:
            return self._error(404, f"No ticket {task_id!r} in the backlog.", request)
        if action is None:
            return self._page("ticket.html", request, **self._ticket(*where))
        if request.method != "POST":
            return self._error(405, "Actions are POSTs.", request)
        refused = self._may_act(request)
        if refused:
            return self._error(403, refused, request)
        return self._act(action, *where)

    def _page(self, name: str, request: Request, **data: Any) -> Response:
        """The page, or with ``?partial=1`` its ``<main>`` alone; either way the digest of
        that ``<main>`` (``X-Digest``, ``data-digest``) tells the live view when it changed."""
        template = self.templates.get_template(name)
        data |= {
            "notice": NOTICES.get(request.query.get("notice", "")),
            "can_act": bool(self.token) and (request.bearer or self.signed_in(request.headers)),
            "has_token": bool(self.token),
            "csrf": self._secret("csrf") if self.token else "",
        }
        main = template.render(partial=True, **data)
        digest = hashlib.sha256(main.encode()).hexdigest()[:16]
        headers = {**HEADERS, "X-Digest": digest}
        if request.query.get("partial") == "1":
            return Response(200, main.encode(), headers=headers)
        html = template.render(partial=False, digest=digest, **data)
        return Response(200, html.encode(), headers=headers)

    def _error(self, code: int, message: str, request: Request) -> Response:
        page = self._page("error.html", request, code=code, message=message)
        page.status = code
        return page

    def _static(self, name: str) -> Response:
        path = HERE / "static" / name
        if "/" in name or name.startswith(".") or not path.is_file():
            return Response(404, b"not found", "text/plain")
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return Response(200, path.read_bytes(), kind, {"Cache-Control": "max-age=300"})

    def _login(self, request: Request) -> Response:
        if request.method != "POST":
            return self._page("login.html", request, wrong=False)
        if self.token and hmac.compare_digest(request.form.get("token", ""), self.token):
            cookie = f"{COOKIE}={self._secret('session')}; HttpOnly; SameSite=Strict; Path=/"
            return _redirect("/", {"Set-Cookie": cookie})
        page = self._page("login.html", request, wrong=True)
        page.status = 401
        return page

    # -- what the pages show -----------------------------------------------------------------

    def _overview(self) -> dict[str, Any]:
        cfg, now = self.s.config(), self.s.clock()
        backlog = self.s.backlog
        store = Store(cfg.state_dir / "history.sqlite3")
        try:
            hosts = cfg.ollama.pool if cfg.needs_ollama else ()
            report = status.collect(backlog, store, now, hosts)
            window = stats.collect(store, since=now - timedelta(days=14), until=now)
        finally:
            store.close()
        for run in report["running"]:
            run["log"] = self._tail(cfg, run["taskId"], lines=8)
        _, ollama = self.s.ollama()
        return {
            "report": report,
            "stats": window,
            "ollama": ollama,
            "attention": self._attention(),
            "auto_retry": cfg.retry.enabled,
            "folders": FOLDERS,
        }

    def _attention(self) -> list[dict[str, Any]]:
        """Failed tickets and those held for a person, with their record's reason."""
        backlog, found = self.s.backlog, []
        for folder in ("failed", "review"):
            for name, path in backlog.records(folder):
                record = _json(path)
                if folder == "review" and record.get("prNumber"):
                    continue  # an open pull request: listed with the reviews
                found.append(
                    {
                        "folder": folder,
                        "taskId": record.get("taskId") or tickets.id_from_filename(Path(name)),
                        "code": record.get("errorCode") or record.get("reason") or "?",
                        "error": self.s.redact(str(record.get("error") or record.get("message"))),
                        "retryable": record.get("retryable"),
                        "nextRetryAt": record.get("nextRetryAt"),
                    }
                )
        return found

    def _find(self, task_id: str) -> tuple[str, Path] | None:
        """The folder and file of the ticket with this id."""
        backlog = self.s.backlog
        for folder in FOLDERS:
            for path in backlog.files(folder):
                try:
                    found = backlog.read(path).id
                except (InvalidTicket, OSError):
                    found = tickets.id_from_filename(path)
                if tickets.same_id(found, task_id):
                    return folder, path
        return None

    def _ticket(self, folder: str, path: Path) -> dict[str, Any]:
        cfg, backlog = self.s.config(), self.s.backlog
        try:
            ticket: tickets.Ticket | None = backlog.read(path)
            problem = None
        except (InvalidTicket, OSError) as e:
            ticket, problem = None, getattr(e, "message", str(e))
        task_id = ticket.id if ticket else tickets.id_from_filename(path)
        store = Store(cfg.state_dir / "history.sqlite3")
        try:
            runs = store.runs_of(backlog.key(path))
        finally:
            store.close()
        for run in runs:
            run["error"] = self.s.redact(run["error"] or "")
        record_path = backlog.record(folder, backlog.key(path)) if folder in RECORDS else None
        record = _json(record_path) if record_path is not None else {}
        return {
            "folder": folder,
            "file": path.name,
            "taskId": task_id,
            "ticket": ticket,
            "problem": problem,
            "runs": runs,
            "record": json.dumps(self.s.redact_data(record), indent=2) if record else None,
            "pr": record.get("prUrl"),
            "branch": record.get("branch")
            or next((r["branch"] for r in reversed(runs) if r["branch"]), None),
            "log": self._tail(cfg, task_id, lines=200),
            "agentLog": self._tail(cfg, task_id, lines=100, agent=True),
        }

    def _tail(
        self, cfg: configuration.Config, task_id: str, *, lines: int, agent: bool = False
    ) -> str:
        name = safe_name(task_id) + (".agent.log" if agent else ".log")
        text = procs.tail(cfg.logging.dir / "tasks" / name, LOG_TAIL)
        return self.s.redact("\n".join(text.splitlines()[-lines:]))

    # -- actions -----------------------------------------------------------------------------

    def _act(self, action: str, folder: str, path: Path) -> Response:
        cfg, backlog, now = self.s.config(), self.s.backlog, self.s.clock()
        task_id = tickets.id_from_filename(path)
        with contextlib.suppress(InvalidTicket, OSError):
            task_id = backlog.read(path).id
        if action == "retry":
            if folder != "failed":
                return _redirect(f"/tickets/{quote(task_id, '')}")
            policy = failures.policy_from(cfg.retry)
            decisions = failures.plan(backlog, now, policy, force=True, task_id=task_id)
            failures.apply(backlog, decisions, now, dry_run=False)
            self.s.wake()
            return _redirect(f"/tickets/{quote(task_id, '')}?notice=retried")
        if folder == "in-progress":
            atomic_write(backlog.cancel_path(backlog.key(path)), json.dumps({"fail": False}) + "\n")
            self.s.wake()
        return _redirect(f"/tickets/{quote(task_id, '')}?notice=cancelled")


def parse_form(body: bytes) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body: each field's first value."""
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in fields.items()}


def _redirect(location: str, headers: Mapping[str, str] | None = None) -> Response:
    return Response(303, b"", "text/plain", {"Location": location, **(headers or {})})


def _json(path: Path | None) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    value = float(value)
    if value < 60:
        return f"{value:.1f}s"
    minutes, seconds = divmod(int(value), 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"
