"""Tell operators what needs them, through apprise (Slack, email, ntfy, a webhook...).

Worker threads call :meth:`Alerts.tell`; it never blocks and never raises. One sender thread
("alerts") waits for the first event, then ``notify.batch_s`` more, and sends what came as one
message to each destination: a title counting the events by kind, a line for each. A failed
send is tried again (``notify.retries``, waits of 1 s, 2 s, 4 s ...) for that destination
alone, so one that took the message is not sent it twice; after the last try the loss is
logged and the sender goes on with later events.

A destination's URL may carry a token (those of ``notify.urls_env``), so no URL is logged:
logs name a destination by its scheme (``slack://...``). Titles, bodies and log lines pass the
redactor. Apprise's own logging is kept to itself: it names a URL it cannot read in full, and
the daemon forwards library logging to its log. Why a send failed is read from apprise's
answer instead.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loguru import logger
from tenacity import Retrying, retry_if_result, stop_after_attempt, wait_exponential

from daemon.config import NotifyConfig

if TYPE_CHECKING:  # loaded only with a destination: its plugins cost every start ~70 ms
    import apprise

# Each kind of event as a title counts it, in the title's order.
LABELS = {
    "failed": "failed",
    "held": "held",
    "pr_opened": "PR opened",
    "pr_merged": "PR merged",
    "ollama_down": "Ollama down",
    "ollama_up": "Ollama up",
    "crashed": "crashed",
}
FAILING = frozenset({"failed", "crashed", "ollama_down"})  # make a message a failure (red)
MAX_QUEUED = 1000  # events waiting to be sent; past this they are only counted
MAX_LINES = 50  # event lines in one message; the rest are counted
MAX_TEXT = 300  # characters of one event's text
SCHEME = re.compile(r"[a-z][a-z0-9+.-]*", re.I)


@dataclass(frozen=True)
class _Destination:
    name: str  # what logs call it: its scheme alone, "slack://..."
    apprise: apprise.Apprise  # holding its one URL


def compose(events: Sequence[tuple[str, str]], dropped: Mapping[str, int]) -> tuple[str, str]:
    """The title and body of one message: ``events`` as (kind, text) and, of each kind, how
    many were ``dropped`` because the queue was full."""
    counts = Counter(kind for kind, _ in events) + Counter(dropped)
    title = "ticketd: " + ", ".join(
        f"{counts[kind]} {label}" for kind, label in LABELS.items() if counts[kind]
    )
    lines = [f"- [{kind}] {_one_line(text)}" for kind, text in events[:MAX_LINES]]
    more = max(0, len(events) - MAX_LINES) + sum(dropped.values())
    if more:
        lines.append(f"... and {more} more")
    return title, "\n".join(lines)


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= MAX_TEXT else flat[: MAX_TEXT - 3] + "..."


def _events(count: int) -> str:
    return f"{count} event{'s' if count != 1 else ''}"


def _scheme(url: str) -> str:
    """How logs name a destination: its scheme alone; the rest of a URL may be a token."""
    scheme, sep, _ = url.strip().partition("://")
    return f"{scheme.lower()}://..." if sep and SCHEME.fullmatch(scheme) else "(not a URL)"


def _reason(result: apprise.AppriseResult) -> str:
    """Why apprise says a send failed: its last warning, else its status."""
    said = [entry.message.rstrip(".") for entry in result.logs()]
    return said[-1] if said else f"apprise answered {result.status.name}"


class Alerts:
    """Operator notifications: :meth:`tell` from any thread; a sender thread from
    :meth:`start` to :meth:`stop`. ``env`` holds the variables ``notify.urls_env`` names;
    ``backoff_s`` is the first wait before a send is tried again (doubling, at most 30 times
    it)."""

    def __init__(
        self,
        cfg: NotifyConfig,
        env: Mapping[str, str],
        redact: Callable[[str], str],
        *,
        backoff_s: float = 1.0,
    ) -> None:
        self._cfg = cfg
        self._redact = redact
        self._backoff_s = backoff_s
        _quiet_apprise()
        found = [(url, f"notify.urls: {_scheme(url)}") for url in cfg.urls]
        for name in cfg.urls_env:
            value = env.get(name, "").strip()
            if value:
                found.append((value, f"notify.urls_env: ${name}"))
            else:
                self._log("WARNING", f"notify.urls_env: ${name} is not set; skipped")
        self._destinations = tuple(d for url, source in found if (d := self._add(url, source)))
        self._cond = threading.Condition()
        self._events: deque[tuple[str, str, float]] = deque()  # kind, text, when told
        self._dropped: Counter[str] = Counter()  # told while the queue was full, by kind
        self._told = 0  # events queued or dropped, ever
        self._handled = 0  # of those, sent or logged as lost
        self._hurry = False  # flush(): send what is queued without waiting out batch_s
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def destinations(self) -> tuple[str, ...]:
        """Where messages go, as logs name them (``slack://...``)."""
        return tuple(d.name for d in self._destinations)

    def tell(self, event: str, text: str) -> None:
        """Queue ``event`` (one of ``notify.on``'s kinds) and its one-line ``text`` for the
        next message. Never waits on a send; other kinds, and everything when there is no
        destination or after :meth:`stop`, are dropped."""
        if event not in self._cfg.on or not self._destinations or self._stopping.is_set():
            return
        with self._cond:
            self._told += 1
            if len(self._events) < MAX_QUEUED:
                self._events.append((event, text, time.monotonic()))
            else:
                self._dropped[event] += 1
            self._cond.notify_all()

    def start(self) -> None:
        """Start the sender thread; without a destination there is none."""
        if not self._destinations or self._thread is not None:
            return
        on, to = ", ".join(self._cfg.on), ", ".join(self.destinations)
        self._log("INFO", f"notify: sending {on} to {to}")
        self._thread = threading.Thread(target=self._run, name="alerts", daemon=True)
        self._thread.start()

    def flush(self, timeout_s: float) -> bool:
        """Send what is queued now, without waiting out ``batch_s``, and wait for that at most
        ``timeout_s`` (a crash: the last thing before the process exits). True when all of it
        was sent or logged as lost in time."""
        with self._cond:
            wanted = self._told
            self._hurry = True
            self._cond.notify_all()
            running = self._thread is not None and self._thread.is_alive()
            return self._cond.wait_for(
                lambda: self._handled >= wanted, timeout=timeout_s if running else 0
            )

    def stop(self, timeout_s: float = 10) -> None:
        """Send what is queued (waits between tries cut short), then end the sender thread;
        wait for it at most ``timeout_s``. Later events are dropped."""
        with self._cond:
            self._stopping.set()
            self._cond.notify_all()
        if self._thread is None:
            return
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._log("WARNING", f"notify: still sending after {timeout_s:g}s; left behind")

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._events or self._stopping.is_set())
                if not self._events:
                    return
                window = self._events[0][2] + self._cfg.batch_s - time.monotonic()
                self._cond.wait_for(
                    lambda: self._hurry or self._stopping.is_set(), timeout=max(0.0, window)
                )
                events, dropped = self._take()
            count = len(events) + sum(dropped.values())
            try:
                self._send(events, dropped, count)
            except Exception:  # a bug here must not end every later notification
                self._log("ERROR", f"notify: {_events(count)} lost to a bug", exception=True)
            with self._cond:
                self._handled += count
                self._cond.notify_all()

    def _take(self) -> tuple[list[tuple[str, str]], Counter[str]]:
        """The events of the next message (all queued; one alone when ``batch_s`` is 0) and
        the count of those dropped. Called holding the lock."""
        count = len(self._events) if self._cfg.batch_s > 0 else 1
        events = [self._events.popleft()[:2] for _ in range(count)]
        dropped, self._dropped = self._dropped, Counter()
        if not self._events:
            self._hurry = False
        return events, dropped

    def _send(self, events: list[tuple[str, str]], dropped: Counter[str], count: int) -> None:
        title, body = compose(events, dropped)
        kinds = {kind for kind, _ in events} | set(dropped)
        import apprise

        kind = apprise.NotifyType.FAILURE if kinds & FAILING else apprise.NotifyType.INFO
        title, body = self._redact(title), self._redact(body)
        for to in self._destinations:
            self._send_to(to, title, body, kind, count)

    def _send_to(
        self, to: _Destination, title: str, body: str, kind: apprise.NotifyType, count: int
    ) -> None:
        """Send one message to ``to``, trying again while it fails; log how it went."""
        failures: list[str] = []  # why each try failed

        def once() -> bool:
            try:
                result = to.apprise.notify(body=body, title=title, notify_type=kind)
            except Exception as e:  # a plugin's bug is a failed try; its text may hold the URL
                failures.append(f"apprise raised {type(e).__name__}")
                return False
            if not result:
                failures.append(_reason(result))
            return bool(result)

        tries = self._cfg.retries + 1
        sent = Retrying(
            stop=stop_after_attempt(tries),
            wait=wait_exponential(multiplier=self._backoff_s, max=30 * self._backoff_s),
            retry=retry_if_result(lambda ok: not ok),
            retry_error_callback=lambda _: False,
            sleep=self._pause,
        )(once)
        events = _events(count)
        if not sent:
            why = f"{tries} tries failed, the last: {failures[-1]}"
            self._log("ERROR", f"notify: {events} lost for {to.name}: {why}")
        elif failures:
            why = f"try {len(failures) + 1} of {tries}, after: {failures[-1]}"
            self._log("INFO", f"notify: {events} sent to {to.name} at {why}; nothing lost")
        else:
            self._log("DEBUG", f"notify: {events} sent to {to.name}")

    def _pause(self, seconds: float) -> None:
        """The wait between tries; cut short by :meth:`stop`, so the tries left go at once."""
        self._stopping.wait(seconds)

    def _add(self, url: str, source: str) -> _Destination | None:
        """``url`` as a destination, each send bounded by ``timeout_s``; None (said) when
        apprise cannot read it."""
        # async_mode off: sent on the sender thread, not apprise's thread pool. service_timeout
        # 0: apprise would time each send out by running it on a process-wide pool whose
        # threads outlive it; the sockets' own timeouts bound it instead.
        import apprise

        asset = apprise.AppriseAsset(async_mode=False, service_timeout=0)
        holder = apprise.Apprise(asset=asset)
        if not holder.add(url):
            self._log("WARNING", f"{source} is not a URL apprise can read; skipped")
            return None
        for service in holder:
            service.socket_connect_timeout = self._cfg.timeout_s
            service.socket_read_timeout = self._cfg.timeout_s
        return _Destination(_scheme(url), holder)

    def _log(self, level: str, text: str, *, exception: bool = False) -> None:
        logger.opt(depth=1, exception=exception).log(level, self._redact(text))


def _quiet_apprise() -> None:
    """Keep apprise's logging out of the daemon's log and stderr: it names in full a URL it
    cannot read, and below WARNING every URL it sends to. Its warnings are still captured
    into each send's result, which :func:`_reason` reads."""
    log = logging.getLogger("apprise")
    log.setLevel(logging.WARNING)
    log.propagate = False
