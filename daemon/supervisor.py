"""The run loop: intake, claims, the worker pool, signals, graceful stop, reload.

``Supervisor.run`` is a boring loop: ``while not stopping: wait = run_once(); sleep until
woken or wait passes``. Signal handlers only set flags. Each claimed ticket runs on a worker
thread (``concurrency.max_tickets`` of them) through ``Runner.work``. With the builtin agent,
an Ollama health monitor feeds the circuit breaker, and nothing is claimed while it is open.
"""

from __future__ import annotations

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
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from loguru import logger

from daemon import config as configuration
from daemon import failures, gates, insights, logs, procs, tickets
from daemon.backlog import FOLDERS, LEASE_ENV, Backlog
from daemon.errors import ConfigError, InvalidTicket, TicketdError
from daemon.llm.breaker import CircuitBreaker
from daemon.llm.client import Ollama
from daemon.llm.health import Monitor
from daemon.metrics import Metrics
from daemon.redact import Redactor
from daemon.repo import Repo, repo_from_remote
from daemon.runner import Active, Runner
from daemon.sdnotify import Notifier
from daemon.server import Probes, Server
from daemon.status import collect
from daemon.store import Store
from daemon.watcher import Watcher, ignore_lease_breaks, settle_delay

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


def statuses(cfg: configuration.Config) -> dict[str, str]:
    s = cfg.backlog.statuses
    return {
        "todo": s.todo,
        "in-progress": s.in_progress,
        "review": s.review,
        "done": s.done,
        "failed": s.failed,
    }


def preflight(cfg: configuration.Config) -> str | None:
    """Refuse to start on a repository the runs could not use, or pull requests without a
    token or a repository name (exit status 2). Returns the GitHub ``owner/name``."""
    try:
        repo = Repo(cfg.repo.path, timeout_s=cfg.repo.git_timeout_s)
        repo.require_branch(cfg.repo.base_branch)
    except TicketdError as e:
        raise ConfigError(f"{cfg.path}: repo: {e.message}") from None
    if not cfg.github.enabled:
        return None
    if cfg.github_token() is None:
        raise ConfigError(
            f"{cfg.path}: github.enabled is true but ${cfg.github.token_env} is not set "
            "(github.token_env names the variable holding the token)"
        )
    try:
        url = repo.remote_url(cfg.repo.remote)
    except TicketdError:
        url = ""
    name = cfg.github.repo or repo_from_remote(url)
    if name is None:
        raise ConfigError(
            f"{cfg.path}: github.repo: cannot tell owner/name from remote {cfg.repo.remote!r}; "
            "set github.repo"
        )
    return name


class Supervisor:
    def __init__(
        self,
        cfg: configuration.Config,
        *,
        once: bool = False,
        clock: Clock = utcnow,
        log_to_stderr: bool = True,
        repo_name: str | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.cfg = cfg
        self.once = once
        self.clock = clock
        self.log_to_stderr = log_to_stderr
        self.backlog = Backlog(cfg.backlog.dir, statuses(cfg))
        self.store = Store(cfg.state_dir / "history.sqlite3")
        self.redact = Redactor(cfg.secret_values())
        self.wake = threading.Event()
        self.signals = 0
        self.reload_requested = False
        self.active: dict[str, Active] = {}
        self.next_reconcile = 0.0
        self.waiting_for_ollama = False
        self.llm: Ollama | None = None
        self.monitor: Monitor | None = None
        if cfg.agent.kind == "builtin" or cfg.review.enabled:  # only then does a run need Ollama
            o = cfg.ollama
            b = o.circuit_breaker
            breaker = CircuitBreaker(
                failure_threshold=b.failure_threshold,
                success_threshold=b.success_threshold,
                half_open_requests=b.half_open_requests,
                reset_timeout_s=b.reset_timeout_s,
            )
            self.llm = Ollama(
                o.host,
                breaker=breaker,
                timeout_s=o.timeout_s,
                connect_timeout_s=o.health_check.timeout_s,
                num_ctx=o.num_ctx,
                num_predict=o.num_predict,
                keep_alive=o.keep_alive,
                retries=o.retries,
            )
            self.monitor = Monitor(
                self.llm,
                [*o.models, *([o.review_model] if cfg.review.enabled and o.review_model else [])],
                interval_s=o.health_check.interval_s,
                timeout_s=o.health_check.timeout_s,
                on_available=self.wake.set,
                warm=o.models[0],
            )
        self.metrics = Metrics(self._depth, self._circuit)
        self.runner = Runner(
            cfg,
            self.backlog,
            self.store,
            self.redact,
            clock,
            self.llm,
            repo_name=repo_name,
            metrics=self.metrics,
        )
        self.last_loop = time.monotonic()
        self.notifier = notifier or Notifier.from_env({})
        self.queue_depth = 0
        self._status = ""
        self.resources_short = ""
        self._server: Server | None = None
        self._pool = ThreadPoolExecutor(cfg.concurrency.max_tickets, thread_name_prefix="ticket")
        self._watcher: Watcher | None = None
        self._scheduler = BackgroundScheduler(timezone=UTC)

    # -- lifecycle ----------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped (or, with ``once``, until todo/ holds nothing ready). Returns the
        exit status: 0, or 1 when ``once`` and some ticket failed."""
        previous = self._install_signals()
        c = self.cfg.logging
        logs.setup(
            directory=c.dir,
            level=c.level,
            json_format=c.json_format,
            rotation=c.rotation,
            retention=c.retention,
            compression=c.compression,
            redactor=self.redact,
            stderr=self.log_to_stderr,
        )
        self.backlog.ensure()
        self.recover(startup=True)
        self.next_reconcile = time.monotonic() + self.cfg.intake.reconcile_interval_s
        if self.monitor is not None:
            health = self.monitor.check_now()
            if health is not None and not health.ok:
                self.monitor.breaker.trip()  # down at start: wait for it, do not try tickets
            self.monitor.start()
        self._watcher = Watcher(self.backlog.folder("todo"), self._on_event)
        self._watcher.start()
        if self.cfg.retry.enabled and not self.once:
            self._scheduler.add_job(
                self.retry_due,
                IntervalTrigger(seconds=self.cfg.retry.check_interval_s),
                id="retry-failed",
                replace_existing=True,
                coalesce=True,
                max_instances=1,
                next_run_time=datetime.now(UTC),
            )
        if not self.once and self.cfg.agent.kind == "builtin":
            self._scheduler.add_job(
                self.learn,
                IntervalTrigger(seconds=self.cfg.insights.interval_s),
                id="insights",
                replace_existing=True,
                coalesce=True,
                max_instances=1,
            )
        if self._scheduler.get_jobs():
            self._scheduler.start()
        if self.cfg.server.enabled:
            self._start_server()
        logger.info("watching {} (pid {})", self.backlog.folder("todo"), os.getpid())
        self.notifier.ready(status="watching " + str(self.backlog.folder("todo")))
        ping = self.notifier.watchdog_interval()
        try:
            while self.signals == 0:
                self.last_loop = time.monotonic()
                self.notifier.watchdog()  # only from here: a stuck loop stops the pings
                wait = self.run_once()
                if wait is None:
                    break
                self._tell_status()
                self.wake.wait(min(wait, ping) if ping else wait)
                self.wake.clear()
            self.notifier.stopping(status=f"stopping; {len(self.active)} ticket(s) running")
        finally:
            if self._server is not None:
                self._server.stop()
            if self._scheduler.running:
                self._scheduler.shutdown(wait=True)
            self._watcher.stop()
            if self.monitor is not None:
                self.monitor.stop()
            self._drain()
            if self.llm is not None:
                self.llm.close()
            self.store.close()
            logger.info("stopped")
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return 1 if self.once and (self.runner.failed or self.waiting_for_ollama) else 0

    # -- operations -------------------------------------------------------------------------

    def _start_server(self) -> None:
        c = self.cfg.server
        ollama = self.monitor.describe if self.monitor else lambda: (200, {"enabled": False})
        probes = Probes(self._probe_health, self._probe_ready, ollama, self._probe_status)
        try:
            self._server = Server(
                c.host, c.port, probes, self.metrics.registry, token=self.cfg.server_token()
            )
        except OSError as e:
            raise ConfigError(
                f"{self.cfg.path}: server: cannot listen on {c.host}:{c.port}: {e}"
            ) from e
        self._server.start()
        logger.info(
            "serving /health, /ready, /health/ollama, /status, /metrics on {}", self._server.url
        )

    def _depth(self) -> dict[str, int]:
        return {folder: len(self.backlog.files(folder)) for folder in FOLDERS}

    def _circuit(self) -> int:
        return self.monitor.breaker.state.value if self.monitor is not None else 0

    def _probe_health(self) -> tuple[int, dict[str, Any]]:
        """Alive while the main loop turns: it wakes at least every reconcile interval."""
        age = time.monotonic() - self.last_loop
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
        }
        ok = all(checks.values())
        return (200 if ok else 503), {"ok": ok, **checks}

    def _probe_status(self) -> tuple[int, dict[str, Any]]:
        store = Store(self.cfg.state_dir / "history.sqlite3")
        try:
            report = collect(Backlog(self.cfg.backlog.dir, statuses(self.cfg)), store, self.clock())
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
        if self.signals > 1:
            for run in list(self.active.values()):
                run.cancel.set()
        self.wake.set()

    def _on_reload_signal(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested = True
        self.wake.set()

    def _on_event(self, kind: str, name: str) -> None:
        self.wake.set()

    def _drain(self) -> None:
        """Let running tickets finish within shutdown.grace_s, then end their agents (they go
        back to todo/). A second signal ends them at once."""
        if self.active:
            logger.info(
                "stopping: waiting up to {}s for {} running ticket(s)",
                self.cfg.shutdown.grace_s,
                len(self.active),
            )
        deadline = time.monotonic() + self.cfg.shutdown.grace_s
        extended = 0.0
        while self.active and time.monotonic() < deadline and self.signals < 2:
            if time.monotonic() - extended >= 5:  # a long graceful stop: tell systemd to wait
                left = deadline - time.monotonic()
                self.notifier.extend_timeout(left + self.cfg.agent.kill_grace_s + 15)
                extended = time.monotonic()
            self.wake.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            self.wake.clear()
            self._reap()
        for run in list(self.active.values()):
            run.cancel.set()
        self._pool.shutdown(wait=True)
        self._reap()

    # -- one iteration --------------------------------------------------------------------------

    def run_once(self) -> float | None:
        """Reap, reconcile, claim. Returns how long to wait for, or None to exit (``once``)."""
        if self.reload_requested:
            self.reload_requested = False
            self.reload()
        self._reap()
        mono = time.monotonic()
        if mono >= self.next_reconcile:
            self.next_reconcile = mono + self.cfg.intake.reconcile_interval_s
            self.recover()
        wait, ready = self.intake()
        if (
            self.once
            and not self.active
            and (not ready or self.waiting_for_ollama)
            and wait is None
        ):
            return None
        return min(
            wait or self.cfg.intake.reconcile_interval_s,
            max(0.01, self.next_reconcile - time.monotonic()),
        )

    def intake(self) -> tuple[float | None, int]:
        """Claim what is ready in todo/, up to the free workers. Returns (seconds until an
        unsettled file should be looked at again or None, how many were ready)."""
        wait: float | None = None
        candidates = []
        todo = self.backlog.files("todo")
        self.queue_depth = len(todo)
        for path in todo:
            try:
                delay = settle_delay(path, time.time(), self.cfg.intake.settle_s)
                if delay > 0:
                    wait = delay if wait is None else min(wait, delay)
                    continue
                candidates.append(self.backlog.read(path))
            except FileNotFoundError:
                continue
            except InvalidTicket as e:
                self._reject(path, e)
        history = self.store.history() if candidates else {}  # one query, only when needed
        retried = {name for name, unsuccessful in history.items() if unsuccessful}
        ready, _ = self.backlog.plan(candidates, retried)
        free = self.cfg.concurrency.max_tickets - len(self.active)
        if self.signals:
            return wait, 0
        if ready and self.monitor is not None and not self.monitor.available:
            if not self.waiting_for_ollama:
                names = ", ".join(t.id for t in ready)
                logger.warning(
                    "Ollama at {} is unavailable; waiting: {}", self.monitor.llm.host, names
                )
            self.waiting_for_ollama = True
            return wait, len(ready)
        self.waiting_for_ollama = False
        short = self._short_of_resources() if ready and free > 0 else ""
        if short and short != self.resources_short:
            logger.warning("not claiming: {}", short)
        self.resources_short = short
        if short:
            return wait if wait is not None else 5.0, len(ready)
        for ticket in ready:
            if free <= 0:
                break
            if ticket.path.name not in history and self._duplicate(ticket):
                continue
            if self._start(ticket):
                free -= 1
        return wait, len(ready)

    def _reject(self, path: Path, error: InvalidTicket) -> None:
        """A todo file that cannot be read as a ticket goes straight to failed/."""
        now = self.clock()
        lease = self.backlog.claim(path.name, now, uuid.uuid4().hex)
        if lease is None:
            return
        task_id = tickets.id_from_filename(path)
        logger.bind(ticket=task_id).warning("{}: invalid ticket: {}", path.name, error.message)
        self.runner.fail(lease, task_id, error, stage="intake", models=[], started=time.monotonic())

    def _duplicate(self, ticket: tickets.Ticket) -> bool:
        """A new ticket that repeats another goes to review/ instead of running."""
        i = self.cfg.intake
        other = self.backlog.duplicate_of(
            ticket, i.duplicate_threshold, i.duplicate_window_days, time.time()
        )
        if other is None:
            return False
        lease = self.backlog.claim(ticket.path.name, self.clock(), uuid.uuid4().hex)
        if lease is None:
            return True
        held = gates.Held(
            f"duplicate of {other.id} ({other.path.parent.name}/{other.path.name})",
            code="DUPLICATE",
            folder="review",
            details={"duplicateOf": other.id},
        )
        self.runner.hold(lease, ticket.id, held, stage="intake")
        return True

    def _start(self, ticket: tickets.Ticket) -> bool:
        now = self.clock()
        claim_id = uuid.uuid4().hex
        lease = self.backlog.claim(ticket.path.name, now, claim_id)
        if lease is None:
            return False
        run = Active(ticket=ticket, lease=lease, started=time.monotonic())
        self.active[lease.name] = run
        run.future = self._pool.submit(self.runner.work, run)
        run.future.add_done_callback(lambda _: self.wake.set())
        return True

    def _reap(self) -> None:
        for name, run in list(self.active.items()):
            if run.future is not None and run.future.done():
                del self.active[name]
                if (error := run.future.exception()) is not None:
                    logger.opt(exception=error).error("worker for {} crashed", name)

    # -- recovery and reload ----------------------------------------------------------------------

    def recover(self, startup: bool = False) -> None:
        """Return tickets a dead daemon left in in-progress/ to todo/, ending its agents first."""
        now = self.clock()
        recovered = 0
        for lease in self.backlog.orphans():
            recovered += 1
            ended = procs.terminate(
                procs.with_env(LEASE_ENV, f"{lease.lock_path}:"), self.cfg.agent.kill_grace_s
            )
            task_id = tickets.id_from_filename(lease.path)
            self.store.interrupt(
                str(lease.info.get("claimId", "")), lease.name, task_id, failures.iso(now)
            )
            self.backlog.move(lease.path, "todo", now)
            self.backlog.release(lease)
            logger.warning(
                "recovered {} from a stopped daemon (ended {} agent process(es))", lease.name, ended
            )
        if recovered or startup:
            self.prune_worktrees()
        self.backlog.trim_cache()

    def prune_worktrees(self) -> None:
        """Remove worktrees no live daemon is using (left by a crash)."""

        def keep() -> set[Path]:  # worktrees of tickets some live daemon is running
            return {self.runner.worktree(p.name) for p in self.backlog.files("in-progress")}

        try:
            repo = Repo(self.cfg.repo.path, timeout_s=self.cfg.repo.git_timeout_s)
            for path in repo.prune_worktrees(self.cfg.state_dir / "worktrees", keep):
                logger.info("removed stale worktree {}", path)
        except TicketdError as e:
            logger.error("cannot prune worktrees: {}", e.message)

    def retry_due(self) -> None:
        """The scheduled job: failed tickets whose retry is due go back to todo/."""
        b = self.cfg.retry
        policy = failures.Policy(
            b.max_retries,
            b.max_age_days,
            failures.Backoff(b.backoff.base_s, b.backoff.factor, b.backoff.max_s),
        )
        now = self.clock()
        decisions = failures.plan(self.backlog.files("failed"), now, policy)
        for d in failures.apply(self.backlog, decisions, now, dry_run=False):
            if d.action == "retried":
                logger.info("retrying {} ({})", d.file, d.reason)
                self.wake.set()
            elif d.action == "marked not retryable":
                logger.warning("{} stays in failed/: {}", d.file, d.reason)

    def learn(self) -> None:
        """The scheduled analysis of recent runs (the learning loop); logs what it changed."""
        c = self.cfg.insights
        store = Store(self.cfg.state_dir / "history.sqlite3")
        try:
            now = self.clock()
            found = insights.analyse(store, now=now, window_days=c.window_days, min_runs=c.min_runs)
            for line in insights.apply(store, found, now):
                logger.info("insights: {}", line)
        finally:
            store.close()

    def _tell_status(self) -> None:
        """STATUS= for systemd: the queue and what runs, sent when it changes."""
        running = ", ".join(run.ticket.id for run in self.active.values()) or "nothing"
        text = f"{self.queue_depth} in todo/; running {running}"
        if self.waiting_for_ollama:
            text += "; waiting for Ollama"
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
        try:
            new = configuration.load(self.cfg.path)
        except ConfigError as e:
            logger.error("config reload refused, keeping the running config: {}", e.message)
            return
        fixed = ("backlog", "state_dir", "logging", "concurrency")
        changed = [k for k in fixed if getattr(new, k) != getattr(self.cfg, k)]
        if changed:
            logger.warning("reloaded; changes to {} apply after a restart", ", ".join(changed))
        self.cfg = new.model_copy(update={k: getattr(self.cfg, k) for k in fixed})
        self.runner.cfg = self.cfg
        self.redact.secrets = Redactor(new.secret_values()).secrets
        logger.info("configuration reloaded from {}", new.path)
