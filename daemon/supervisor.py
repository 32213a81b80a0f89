"""The run loop: intake, claims, the worker pool, signals, graceful stop, reload.

``Supervisor.run`` is a boring loop: ``while not stopping: wait = run_once(now); sleep until
woken or wait passes``, inside one handler that logs a crash with its traceback to
``ticketd.log`` and exits non-zero for systemd to restart. Signal handlers only set flags.
Every running part comes from ``wiring.build`` and is rebuilt as a whole on SIGHUP. Each
claimed ticket runs on a worker thread through ``Runner.work`` with its own ``RunContext``,
which the loop cancels when the daemon stops, when a person asks (``ticketd cancel``), or
when the ticket's file leaves ``in-progress/`` by hand.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Literal

from apscheduler.schedulers.background import BackgroundScheduler
from loguru import logger

from daemon import config as configuration
from daemon import gates, logs, procs, pulls, tickets, wiring
from daemon.alerts import Alerts
from daemon.backlog import FOLDERS, Plannable
from daemon.board import open_backlog
from daemon.errors import ConfigError, InvalidTicket
from daemon.llm.pool import Pool, Route
from daemon.metrics import Metrics
from daemon.preflight import Checked, preflight
from daemon.runctx import Active, Stop
from daemon.runner import Runner
from daemon.sdnotify import Notifier
from daemon.server import Hook, Probes, Server
from daemon.status import collect
from daemon.store import Store
from daemon.watcher import Watcher, ignore_lease_breaks, settle_delay
from daemon.web.dashboard import Dashboard, Sources
from daemon.webhook import Webhook

__all__ = ["Supervisor", "preflight"]

Clock = Callable[[], datetime]
CLOCK_STEP_S = 60  # a wall clock that moved this much more or less than the monotonic one
DISK_FULL_WAIT_S = 30
ALERTS_STOP_S = 10  # at stop, how long queued notifications may take to go out
INDEX_PATIENCE_S = 60  # how much longer systemd waits after each batch the index reads


def utcnow() -> datetime:
    return datetime.now(UTC)


class Supervisor:
    def __init__(
        self,
        cfg: configuration.Config,
        *,
        once: bool = False,
        clock: Clock = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
        log_to_stderr: bool = True,
        notifier: Notifier | None = None,
        checked: Checked | None = None,
    ) -> None:
        self.cfg = cfg
        self.once = once
        self.clock = clock
        self.monotonic = monotonic
        self.log_to_stderr = log_to_stderr
        self.backlog = open_backlog(cfg)
        self.store = Store(cfg.state_dir / "history.sqlite3")
        self.wake = threading.Event()
        # Set with every wake that may change what intake would do (``_nudge``); intake runs
        # only then, at a reconcile, or when an unsettled file is due another look.
        self.changed = True
        self._look_again = math.inf  # monotonic: when an unsettled file in todo/ is due
        self._ready = 0  # how many were ready at intake's last pass
        self.signals = 0
        self.reload_requested = False
        self.active: dict[str, Active] = {}
        self.next_reconcile = 0.0
        self._index_said = 0.0  # when the log last said how far the index's reading was
        self.claims_paused_until = 0.0
        self.waiting = ""  # why nothing is claimed now (Ollama away, a hold)
        self._problems: dict[Path, str] = {}  # said already (see _tell_problems)
        self.revisions: dict[str, tuple[pulls.Open, pulls.Revision]] = {}  # by ticket file
        self._revisions_lock = threading.Lock()
        self.metrics = Metrics(self._depth, self._circuits, self._pinned)
        self.hooks = wiring.Hooks(
            backlog=self.backlog,
            store=self.store,
            metrics=self.metrics,
            clock=clock,
            wake=self._nudge,
            revise=self._queue_revision,
            alert=lambda event, text: self.alerts.tell(event, text),
        )
        self.parts = wiring.build(cfg, self.hooks, checked)
        self.alerts = self._alerts(cfg)
        self.last_loop = monotonic()
        self._clock_mark = (clock(), monotonic())
        self.notifier = notifier or Notifier.from_env({})
        self.queue_depth = 0
        self._status = ""
        self.resources_short = ""
        self._server: Server | None = None
        self._pool = ThreadPoolExecutor(cfg.concurrency.max_tickets, thread_name_prefix="ticket")
        self._watcher: Watcher | None = None
        self._scheduler = BackgroundScheduler(timezone=UTC)
        self.webhook = Webhook(lambda: self.cfg.webhook_secret(), self._poke)

    @property
    def runner(self) -> Runner:
        return self.parts.runner

    @property
    def pool(self) -> Pool | None:
        return self.parts.pool

    # -- lifecycle ----------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped (or, with ``once``, until todo/ holds nothing ready). Returns the
        exit status: 0; 1 when ``once`` and some ticket failed; 70 when the loop crashed."""
        previous = self._install_signals()
        c = self.cfg.logging
        logs.setup(
            directory=c.dir,
            level=c.level,
            json_format=c.json_format,
            rotation=c.rotation,
            retention=c.retention,
            compression=c.compression,
            redactor=lambda text: self.parts.redact(text),
            stderr=self.log_to_stderr,
        )
        self.alerts.start()
        try:
            return self._serve()
        except Exception as e:  # the loop itself failed: say so where operators look
            logger.opt(exception=e).critical("the run loop crashed: {}: {}", type(e).__name__, e)
            self.alerts.tell("crashed", f"the run loop crashed: {type(e).__name__}: {e}")
            return 70
        finally:
            self.alerts.stop(ALERTS_STOP_S)  # what is queued goes out first (a crash too)
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _serve(self) -> int:
        if self.store.recovered_from is not None:
            logger.warning(
                "the history could not be read; it was moved aside to {} and a new one started",
                self.store.recovered_from,
            )
        try:
            self.prepare()
            self._watcher = Watcher(self.backlog.folder("todo"), self._on_event, self._on_change)
            self._watcher.start()
            if self._scheduler.get_jobs():
                self._scheduler.start()
            if self.cfg.server.enabled:
                self._server = wiring.serve(
                    self.cfg,
                    self._probes(),
                    self.metrics,
                    self._redact,
                    self._webhook(),
                    self._dashboard,
                )
            logger.info("watching {} (pid {})", self.backlog.folder("todo"), os.getpid())
            self.notifier.ready(status="watching " + str(self.backlog.folder("todo")))
            ping = self.notifier.watchdog_interval()
            while self.signals == 0:
                self.last_loop = self.monotonic()
                self.notifier.watchdog()  # only from here: a stuck loop stops the pings
                wait = self.run_once()
                if wait is None:
                    break
                self._tell_status()
                self.wake.wait(min(wait, ping) if ping else wait)
                self.wake.clear()
            self.notifier.stopping(status=f"stopping; {len(self.active)} ticket(s) running")
        finally:
            self.shutdown()
        return 1 if self.once and (self.runner.outcomes.failed or self.waiting) else 0

    def prepare(self) -> None:
        """What the loop starts from: the folders made, the ticket index current, the parts
        started, the tickets a stopped daemon left recovered. ``shutdown`` ends it."""
        self.backlog.ensure()
        self.backlog.index.on_progress = self._indexing
        started = self.monotonic()
        if read := self.backlog.index.refresh():
            logger.info(
                "ticket index: read {} ticket file(s) in {:.1f}s", read, self.monotonic() - started
            )
        self.backlog.seed()
        self.parts.start(self._scheduler, self.hooks, once=self.once)
        self.parts.recover(self.hooks, startup=True)
        self.next_reconcile = self.monotonic() + self.cfg.intake.reconcile_interval_s

    def _indexing(self, done: int, total: int) -> None:
        """Long index work (the first start on a large backlog): progress in the log every
        few seconds, and systemd told to keep waiting (start timeout, watchdog)."""
        self.notifier.extend_timeout(INDEX_PATIENCE_S)
        self.notifier.watchdog()
        now = self.monotonic()
        if now - self._index_said >= 5:
            self._index_said = now
            logger.info("ticket index: {} of {} ticket file(s) read", done, total)

    def shutdown(self) -> None:
        """Stop the server, the scheduled jobs and the watcher; let running tickets finish
        (``_drain``); stop the parts; close the history."""
        if self._server is not None:
            self._server.stop()
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
        if self._watcher is not None:
            self._watcher.stop()
        self._drain()
        self.parts.stop()
        self.store.close()
        logger.info("stopped")

    # -- operations -------------------------------------------------------------------------

    def _probes(self) -> Probes:
        return Probes(
            self._probe_health,
            self._probe_ready,
            lambda: self.parts.describe_ollama(),
            self._probe_status,
        )

    def _webhook(self) -> Hook | None:
        """``POST /webhooks/github`` when pull requests are on: it only makes the watch look
        at a pull request now."""
        return self.webhook.handle if self.cfg.github.enabled else None

    def _alerts(self, cfg: configuration.Config) -> Alerts:
        """The operator's notifications (``notify``)."""
        return Alerts(cfg.notify, cfg.notify_urls(), lambda text: self.parts.redact(text))

    def _dashboard(self, token: str | None) -> Dashboard:
        """The dashboard's pages; they read the current config and parts when asked."""
        sources = Sources(
            config=lambda: self.cfg,
            backlog=self.backlog,
            clock=self.clock,
            ollama=lambda: self.parts.describe_ollama(),
            wake=self._nudge,
            redact=lambda text: self.parts.redact(text),
            redact_data=self._redact,
        )
        return Dashboard(sources, token)

    def _poke(self, number: int) -> None:
        watch = self.parts.watch
        if watch is None:
            return
        watch.poke(number)
        job = self._scheduler.get_job("pull-requests") if self._scheduler.running else None
        if job is not None:
            job.modify(next_run_time=datetime.now(UTC))

    def _redact(self, data: Any) -> Any:
        return self.parts.redact.data(data)

    def _depth(self) -> dict[str, int]:
        return {folder: len(self.backlog.files(folder)) for folder in FOLDERS}

    def _circuits(self) -> dict[str, int]:
        return self.pool.circuits() if self.pool is not None else {}

    def _pinned(self) -> dict[str, int]:
        return self.pool.tickets() if self.pool is not None else {}

    def _probe_health(self) -> tuple[int, dict[str, Any]]:
        """Alive while the main loop turns: it wakes at least every reconcile interval."""
        age = self.monotonic() - self.last_loop
        ok = age < 2 * self.cfg.intake.reconcile_interval_s + 30 and self.signals == 0
        return (200 if ok else 503), {
            "ok": ok,
            "loopAgeS": round(age, 1),
            "running": len(self.active),
        }

    def _probe_ready(self) -> tuple[int, dict[str, Any]]:
        checks = {
            "watcher": self._watcher is not None and self._watcher.alive(),
            "scheduler": self._scheduler.running or not self.cfg.retry.enabled or self.once,
            "stateDir": os.access(self.cfg.state_dir, os.W_OK),
            "backlog": os.access(self.backlog.folder("todo"), os.W_OK),
            "holds": not self.parts.holds,
        }
        ok = all(checks.values())
        return (200 if ok else 503), {"ok": ok, **checks, "held": list(self.parts.holds)}

    def _probe_status(self) -> tuple[int, dict[str, Any]]:
        store = Store(self.cfg.state_dir / "history.sqlite3")
        try:
            hosts = self.cfg.ollama.pool if self.pool is not None else ()
            report = collect(self.backlog, store, self.clock(), hosts)  # its cache is thread-safe
        finally:
            store.close()
        return 200, report

    def _short_of_resources(self) -> str:
        c = self.cfg.concurrency
        return procs.resources_short(c.min_free_memory_mb, c.max_load)

    def _install_signals(self) -> dict[int, Any]:
        """Handlers that only set flags; returns the previous ones to restore at exit."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        ignore_lease_breaks()
        handlers = {
            signal.SIGTERM: self._on_stop_signal,
            signal.SIGINT: self._on_stop_signal,
            signal.SIGHUP: self._on_reload_signal,
        }
        return {signum: signal.signal(signum, h) for signum, h in handlers.items()}

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        self.wake.set()

    def _on_reload_signal(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested = True
        self.wake.set()

    def _on_event(self, kind: str, name: str) -> None:
        self._nudge()

    def _on_change(self, path: Path) -> None:
        """A ticket file changed, came or went in any folder (a dependency done, say)."""
        self.backlog.forget(path)
        self._nudge()

    def _nudge(self) -> None:
        """Something changed that intake should look at: wake the loop for it. Any thread."""
        self.changed = True
        self.wake.set()

    def _drain(self) -> None:
        """Let running tickets finish within shutdown.grace_s, then cancel them (they go back
        to todo/). A second signal cancels them at once."""
        if self.active:
            logger.info(
                "stopping: waiting up to {}s for {} running ticket(s)",
                self.cfg.shutdown.grace_s,
                len(self.active),
            )
        deadline = self.monotonic() + self.cfg.shutdown.grace_s
        extended = 0.0
        while self.active and self.monotonic() < deadline and self.signals < 2:
            if self.monotonic() - extended >= 5:  # a long graceful stop: tell systemd to wait
                left = deadline - self.monotonic()
                self.notifier.extend_timeout(left + self.cfg.agent.kill_grace_s + 15)
                extended = self.monotonic()
            self.wake.wait(min(0.5, max(0.0, deadline - self.monotonic())))
            self.wake.clear()
            self._reap()
        for run in list(self.active.values()):
            run.ctx.cancel(Stop.STOPPING)
        self._pool.shutdown(wait=True)
        self._reap()

    # -- one iteration --------------------------------------------------------------------------

    def run_once(self, now: float | None = None) -> float | None:
        """Reap, watch the runs, reconcile, claim. ``now`` is monotonic seconds. Returns how
        long to wait for, or None to exit (``once``)."""
        now = self.monotonic() if now is None else now
        if self.reload_requested:
            self.reload_requested = False
            self.reload()
            self.changed = True
        self._reap()
        self._watch_runs()
        self._check_clock(now)
        if now >= self.next_reconcile:
            self.next_reconcile = now + self.cfg.intake.reconcile_interval_s
            self.parts.recover(self.hooks)
            self.parts.recheck()
            self.backlog.index.refresh()  # watchdog can drop events: list every folder
            self.backlog.doubt()
            self.changed = True
        if now < self.claims_paused_until:
            return self.claims_paused_until - now
        if self.changed or now >= self._look_again:
            self.changed = False  # what comes from here on is looked at in the next pass
            wait, self._ready = self.intake()
            self._look_again = math.inf if wait is None else now + wait
            self.backlog.index.flush()  # what the runs moved: read now, not at the next claim
        wait = None if self._look_again == math.inf else max(0.01, self._look_again - now)
        ready = self._ready + len(self.revisions)
        if self.once and not self.active and (not ready or self.waiting) and wait is None:
            return None
        return min(
            wait or self.cfg.intake.reconcile_interval_s,
            max(0.01, self.next_reconcile - now),
        )

    def _watch_runs(self) -> None:
        """Cancel runs a person asked to end (``ticketd cancel``) and runs whose ticket file
        left in-progress/ by hand."""
        for name, run in list(self.active.items()):
            if run.ctx.cancelled:
                continue
            request = self.backlog.cancel_path(name)
            if request.exists():
                try:
                    fail = bool(json.loads(request.read_text() or "{}").get("fail"))
                except (OSError, ValueError):
                    fail = False
                request.unlink(missing_ok=True)
                logger.bind(ticket=run.ticket.id).warning("cancel requested for {}", name)
                run.ctx.cancel(Stop.CANCELLED, fail=fail)
            elif not self.backlog.present(run.lease):
                run.ctx.cancel(Stop.REMOVED)

    def _check_clock(self, now: float) -> None:
        """After the wall clock steps (NTP, a person), scheduled jobs would wait for the old
        time: run them again now and keep their intervals from here."""
        wall, mono = self.clock(), now
        then_wall, then_mono = self._clock_mark
        self._clock_mark = (wall, mono)
        drift = (wall - then_wall).total_seconds() - (mono - then_mono)
        if abs(drift) < CLOCK_STEP_S:
            return
        logger.warning("the wall clock stepped by {:+.0f}s; scheduled jobs run again now", drift)
        if self._scheduler.running:
            for job in self._scheduler.get_jobs():
                job.modify(next_run_time=datetime.now(UTC))

    def intake(self) -> tuple[float | None, int]:
        """Claim what is ready in todo/, up to the free workers. Returns (seconds until an
        unsettled file should be looked at again or None, how many were ready)."""
        if len(self.active) >= self.cfg.concurrency.max_tickets:
            self.queue_depth = self.backlog.count("todo")
            return None, self.queue_depth  # no worker is free: nothing to read or claim
        free = self.cfg.concurrency.max_tickets - len(self.active)
        candidates, wait = self._candidates(whole=free)
        runnable = self.backlog.runnable(candidates)
        history = self.store.history([self.backlog.key(t.path) for t in runnable])
        retried = {name for name, unsuccessful in history.items() if unsuccessful}
        ready = self.backlog.order(runnable, retried)
        if self.signals:
            return wait, 0
        held = self._held(bool(ready) or bool(self.revisions))
        if held and held != self.waiting:
            names = ", ".join(t.id for t in ready)
            logger.warning("{}{}", held, f"; waiting: {names}" if names else "")
        self.waiting = held
        if held:
            self.changed = True  # look again at every wake while anything holds the queue
            return wait, len(ready)
        short = self._short_of_resources() if ready and free > 0 else ""
        if short and short != self.resources_short:
            logger.warning("not claiming: {}", short)
        self.resources_short = short
        if short:
            return wait if wait is not None else 5.0, len(ready)
        free -= self._start_revisions(free)
        busy = {run.branch for run in self.active.values()}
        for planned in ready:
            if free <= 0:
                break
            ticket = self._whole(planned)
            if ticket is None:
                continue
            branch = self.runner.branch(ticket)
            if branch in busy:  # one branch per ticket file: wait for the other to finish
                continue
            if self.backlog.key(ticket.path) not in history and self._duplicate(ticket):
                continue
            route = self._route(ticket)
            if route is False:
                continue  # every Ollama host that would do is full: it waits
            try:
                started = self._start(ticket, branch, route)
            except OSError as e:
                if route is not None:
                    route.close()
                self._pause_claims(e)
                break
            if started:
                free -= 1
                busy.add(branch)
            elif route is not None:
                route.close()
        return wait, len(ready)

    def _candidates(self, whole: int) -> tuple[list[Plannable], float | None]:
        """The tickets in todo/ that are whole: what the cache keeps of each (a Brief), but
        the first ``whole`` of those read now whole, ready to run; and seconds until an
        unsettled file is due a look, or None."""
        wait: float | None = None
        candidates: list[Plannable] = []
        todo = self.backlog.files("todo")
        self.queue_depth = len(todo)
        self._tell_problems()
        for path in todo:
            try:
                ticket = self.backlog.unchanged(path)
                if ticket is None:
                    delay = settle_delay(path, time.time(), self.cfg.intake.settle_s)
                    if delay > 0:
                        wait = delay if wait is None else min(wait, delay)
                        continue
                    if whole > 0:
                        ticket = self.backlog.read(path, whole=True)
                    else:  # what the cache keeps of it: memory stays flat
                        ticket = self.backlog.settled(path)
                    whole -= 1
                candidates.append(ticket)
            except FileNotFoundError:
                continue
            except InvalidTicket as e:
                self._reject(path, e)
        return candidates, wait

    def _whole(self, planned: Plannable) -> tickets.Ticket | None:
        """The ticket intake planned with, parsed whole, when its file is as it was read
        then; else None (a file changed without an event is read whole at the next pass)."""
        if self.backlog.unchanged(planned.path, trust=False) is None:
            self.backlog.forget(planned.path)
            self._nudge()
            return None
        if isinstance(planned, tickets.Ticket):
            return planned
        try:
            return self.backlog.read(planned.path)
        except FileNotFoundError:
            return None
        except InvalidTicket as e:
            self._reject(planned.path, e)
            return None

    def _revision_route(self, name: str) -> Route | Literal[False] | None:
        """The route of a revision's ticket, read in review/ before it is claimed (None:
        it uses no Ollama, or cannot be read yet: the claim will say)."""
        path = self.backlog.locate(name, "review") if self.pool is not None else None
        try:
            return self._route(self.backlog.read(path)) if path is not None else None
        except (InvalidTicket, FileNotFoundError):
            return None

    def _route(self, ticket: tickets.Ticket) -> Route | Literal[False] | None:
        """The Ollama host the ticket is pinned to (None: it uses none); False when every
        host that would do is full."""
        if self.pool is None:
            return None
        return self.runner.route(self.pool, ticket) or False

    def _tell_problems(self) -> None:
        """Say once what keeps a task from running where it is not moved for it (the
        Backlog.md layout: an unreadable task, two files with one id)."""
        problems = self.backlog.problems()
        for path, why in problems.items():
            if self._problems.get(path) != why:
                logger.error("{}: {}", path, why)
        self._problems = problems

    def _queue_revision(self, pull: pulls.Open, revision: pulls.Revision) -> bool:
        """The watch asks for a revision (on its thread): queued for the next claim."""
        name = pull.name
        with self._revisions_lock:
            if name in self.revisions or name in self.active:
                return False
            self.revisions[name] = (pull, revision)
        self._nudge()
        return True

    def _start_revisions(self, free: int) -> int:
        """Claim queued revisions from review/, up to ``free`` workers; returns how many."""
        started = 0
        with self._revisions_lock:
            queued = list(self.revisions.items())
        for name, (pull, revision) in queued:
            if started >= free:
                break
            route = self._revision_route(name)
            if route is False:
                continue  # every Ollama host that would do is full: it stays queued
            with self._revisions_lock:
                del self.revisions[name]
            lease = self.backlog.claim(
                name, self.clock(), uuid.uuid4().hex, source="review", revision=pull.number
            )
            try:
                ticket = self.backlog.read(lease.path) if lease is not None else None
                if ticket is not None and route is None:
                    route = self._route(ticket)  # it could not be read before the claim
            except (InvalidTicket, FileNotFoundError) as e:
                logger.error("{}: cannot revise: {}", name, getattr(e, "message", e))
                ticket = None
            if lease is None or ticket is None or route is False:
                if isinstance(route, Route):
                    route.close()
                if lease is not None:  # moved or taken meanwhile: the watch asks again
                    self.backlog.move(lease.path, "review", self.clock())
                    self.backlog.release(lease)
                continue
            run = Active(
                ticket=ticket,
                lease=lease,
                started=time.monotonic(),
                branch=revision.branch,
                revision=revision,
                route=route,
            )
            self._submit(run)
            started += 1
        return started

    def _held(self, ready: bool) -> str:
        """Why no ticket may be claimed now: what would fail every ticket (the agent
        missing, the remote away; see ``preflight.holds``), or Ollama unavailable."""
        if self.parts.holds:
            return "holding the queue: " + "; ".join(self.parts.holds)
        if ready and self.pool is not None and not self.pool.available:
            return self.pool.unavailable()
        return ""

    def _pause_claims(self, error: OSError) -> None:
        """A claim could not be written (a full disk): it was undone; wait, then try again."""
        if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):
            raise error
        self.claims_paused_until = self.monotonic() + DISK_FULL_WAIT_S
        self.changed = True  # the pause over, intake runs again
        logger.error(
            "cannot claim: {}; the ticket stays in todo/, trying again in {}s",
            error.strerror,
            DISK_FULL_WAIT_S,
        )

    def _reject(self, path: Path, error: InvalidTicket) -> None:
        """A todo file that cannot be read as a ticket goes straight to failed/."""
        now = self.clock()
        try:
            lease = self.backlog.claim(self.backlog.key(path), now, uuid.uuid4().hex)
        except OSError as e:
            self._pause_claims(e)
            return
        if lease is None:
            return
        task_id = tickets.id_from_filename(path)[:100]
        logger.bind(ticket=task_id).warning("{}: invalid ticket: {}", path.name, error.message)
        self.runner.outcomes.fail(
            lease, task_id, error, stage="intake", models=[], started=time.monotonic()
        )

    def _duplicate(self, ticket: tickets.Ticket) -> bool:
        """A new ticket that repeats another goes to review/ instead of running."""
        i = self.cfg.intake
        other = self.backlog.duplicate_of(
            ticket, i.duplicate_threshold, i.duplicate_window_days, time.time()
        )
        if other is None:
            return False
        lease = self.backlog.claim(self.backlog.key(ticket.path), self.clock(), uuid.uuid4().hex)
        if lease is None:
            return True
        held = gates.Held(
            f"duplicate of {other.id} ({other.path.parent.name}/{other.path.name})",
            code="DUPLICATE",
            folder="review",
            details={"duplicateOf": other.id},
        )
        self.runner.outcomes.hold(lease, ticket.id, held, stage="intake")
        return True

    def _start(self, ticket: tickets.Ticket, branch: str, route: Route | None) -> bool:
        lease = self.backlog.claim(self.backlog.key(ticket.path), self.clock(), uuid.uuid4().hex)
        if lease is None:
            return False
        run = Active(ticket=ticket, lease=lease, started=time.monotonic(), branch=branch)
        run.route = route
        self._submit(run)
        return True

    def _submit(self, run: Active) -> None:
        run.ctx.clock = self.clock
        self.active[run.lease.name] = run
        run.future = self._pool.submit(self.runner.work, run)
        run.future.add_done_callback(lambda _: self._nudge())  # a worker is free

    def _reap(self) -> None:
        for name, run in list(self.active.items()):
            if run.future is not None and run.future.done():
                del self.active[name]
                self.backlog.cancel_path(name).unlink(missing_ok=True)
                if (error := run.future.exception()) is not None:
                    logger.opt(exception=error).error("worker for {} crashed", name)

    # -- recovery and reload ----------------------------------------------------------------------

    def _tell_status(self) -> None:
        """STATUS= for systemd: the queue and what runs, sent when it changes."""
        running = ", ".join(run.ticket.id for run in self.active.values()) or "nothing"
        text = f"{self.queue_depth} in todo/; running {running}"
        if self.waiting:
            text += f"; {self.waiting}"
        if text != self._status:
            self._status = text
            self.notifier.status(text)

    def reload(self) -> None:
        self.notifier.reloading()
        try:
            self._reload()
        finally:
            self.notifier.ready()

    def _reload(self) -> None:
        """Build every part anew from the new config and swap them in; running tickets
        finish with the parts they started with. A bad config changes nothing."""
        try:
            new = configuration.load(self.cfg.path)
            changed = [k for k in wiring.RESTART_ONLY if getattr(new, k) != getattr(self.cfg, k)]
            new = new.model_copy(update={k: getattr(self.cfg, k) for k in wiring.RESTART_ONLY})
            parts = wiring.build(new, self.hooks)
        except ConfigError as e:
            logger.error("config reload refused, keeping the running config: {}", e.message)
            return
        if changed:
            logger.warning("reloaded; changes to {} apply after a restart", ", ".join(changed))
        old, server_changed = self.parts, new.server != self.cfg.server
        if new.notify != self.cfg.notify:
            self.alerts.stop(ALERTS_STOP_S)
            self.alerts = self._alerts(new)
            self.alerts.start()
        self.cfg, self.parts = new, parts
        old.stop()
        parts.start(self._scheduler, self.hooks, once=self.once)
        if server_changed:
            if self._server is not None:
                self._server.stop()
                self._server = None
            if new.server.enabled:
                try:
                    self._server = wiring.serve(
                        new,
                        self._probes(),
                        self.metrics,
                        self._redact,
                        self._webhook(),
                        self._dashboard,
                    )
                except ConfigError as e:
                    logger.error("{}", e.message)
        logger.info("configuration reloaded from {}", new.path)
