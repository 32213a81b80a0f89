"""The run loop: intake, claims, the worker pool, signals, graceful stop, reload.

``Supervisor.run`` is a boring loop: ``while not stopping: wait = run_once(); sleep until
woken or wait passes``. Signal handlers only set flags. Each claimed ticket runs on a worker
thread (``concurrency.max_tickets`` of them) through ``pipeline.run``; ``_finish`` then moves
it to ``done/``, ``failed/`` (with ``.error.json``) or back to ``todo/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from loguru import logger

from daemon import config as configuration
from daemon import failures, logs, pipeline, procs, tickets
from daemon.backlog import LEASE_ENV, Backlog, Lease
from daemon.errors import ConfigError, Interrupted, InvalidTicket, TicketdError
from daemon.redact import Redactor
from daemon.repo import Repo
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


def settings(cfg: configuration.Config, redact: Redactor) -> pipeline.Settings:
    return pipeline.Settings(
        repo=cfg.repo.path,
        base_branch=cfg.repo.base_branch,
        remote=cfg.repo.remote,
        branch_prefix=cfg.repo.branch_prefix,
        push_retries=cfg.repo.push_retries,
        git_timeout_s=cfg.repo.git_timeout_s,
        prompts=cfg.state_dir / "prompts",
        logs=cfg.logging.dir / "tasks",
        command=cfg.agent.command,
        timeout_s=cfg.agent.timeout_s,
        grace_s=cfg.agent.kill_grace_s,
        exclude=cfg.agent.exclude,
        env=cfg.agent_env(),
        models=cfg.ollama.models,
        redact=redact,
    )


def preflight(cfg: configuration.Config) -> None:
    """Refuse to start on a repository the runs could not use (exit status 2)."""
    try:
        Repo(cfg.repo.path, timeout_s=cfg.repo.git_timeout_s).require_branch(cfg.repo.base_branch)
    except TicketdError as e:
        raise ConfigError(f"{cfg.path}: repo: {e.message}") from None


@dataclass
class Active:
    ticket: tickets.Ticket
    lease: Lease
    started: float
    cancel: threading.Event = field(default_factory=threading.Event)
    stage: str = "claimed"
    future: Future[None] | None = None


class Supervisor:
    def __init__(
        self,
        cfg: configuration.Config,
        *,
        once: bool = False,
        clock: Clock = utcnow,
        log_to_stderr: bool = True,
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
        self.failures = 0  # tickets that ended in failed/ during this process's life
        self.next_reconcile = 0.0
        self._pool = ThreadPoolExecutor(cfg.concurrency.max_tickets, thread_name_prefix="ticket")
        self._watcher: Watcher | None = None

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
        self._watcher = Watcher(self.backlog.folder("todo"), self._on_event)
        self._watcher.start()
        logger.info("watching {} (pid {})", self.backlog.folder("todo"), os.getpid())
        try:
            while self.signals == 0:
                wait = self.run_once()
                if wait is None:
                    break
                self.wake.wait(wait)
                self.wake.clear()
        finally:
            self._watcher.stop()
            self._drain()
            self.store.close()
            logger.info("stopped")
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return 1 if self.once and self.failures else 0

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
        while self.active and time.monotonic() < deadline and self.signals < 2:
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
        if self.once and not self.active and not ready and wait is None:
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
        for path in self.backlog.files("todo"):
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
        ready, _ = self.backlog.plan(candidates)
        free = self.cfg.concurrency.max_tickets - len(self.active)
        if self.signals:
            return wait, 0
        for ticket in ready:
            if free <= 0:
                break
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
        self._fail(lease, task_id, error, stage="intake", model=None, started=time.monotonic())

    def _start(self, ticket: tickets.Ticket) -> bool:
        now = self.clock()
        claim_id = uuid.uuid4().hex
        lease = self.backlog.claim(ticket.path.name, now, claim_id)
        if lease is None:
            return False
        run = Active(ticket=ticket, lease=lease, started=time.monotonic())
        self.active[lease.name] = run
        run.future = self._pool.submit(self._work, run)
        run.future.add_done_callback(lambda _: self.wake.set())
        return True

    def _reap(self) -> None:
        for name, run in list(self.active.items()):
            if run.future is not None and run.future.done():
                del self.active[name]
                if (error := run.future.exception()) is not None:
                    logger.opt(exception=error).error("worker for {} crashed", name)

    # -- one ticket -----------------------------------------------------------------------------

    def _work(self, run: Active) -> None:
        ticket, lease = run.ticket, run.lease
        log_path = self.cfg.logging.dir / "tasks" / f"{pipeline.safe_name(ticket.id)}.log"
        with logs.ticket_log(log_path, ticket.id), logger.contextualize(ticket=ticket.id):
            run_id = self.store.start_run(
                lease.info["claimId"],
                lease.name,
                ticket.id,
                ticket.title,
                failures.iso(self.clock()),
                json.loads(self.redact(json.dumps(self.cfg.snapshot()))),
            )
            logger.info("claimed {} ({})", lease.name, ticket.title)
            s = settings(self.cfg, self.redact)
            s = dataclasses.replace(s, env={**s.env, LEASE_ENV: lease.marker})
            model = ticket.models[0] if ticket.models else s.models[0]
            try:
                delivered = pipeline.run(
                    ticket,
                    lease.path,
                    self.worktree(lease.name),
                    s,
                    stage=lambda name: self._stage(run, run_id, name),
                    cancel=run.cancel,
                    on_agent_start=lambda pid: lease.record(agentPgid=pid),
                )
            except Interrupted as e:
                self._requeue(run, run_id, e)
            except TicketdError as e:
                self._fail(
                    lease,
                    ticket.id,
                    e,
                    stage=run.stage,
                    model=model,
                    started=run.started,
                    run_id=run_id,
                )
            except Exception as e:  # an unknown error is recorded on the ticket, never passed over
                logger.opt(exception=e).error("unexpected error in stage {}", run.stage)
                error = TicketdError(
                    f"internal error in stage {run.stage}: {type(e).__name__}: {e}"
                )
                self._fail(
                    lease,
                    ticket.id,
                    error,
                    stage=run.stage,
                    model=model,
                    started=run.started,
                    run_id=run_id,
                )
            else:
                self._done(run, run_id, delivered)

    @contextmanager
    def _stage(self, run: Active, run_id: int, name: str) -> Iterator[None]:
        run.stage = name
        run.lease.record(stage=name)
        self.store.start_stage(run_id, name, failures.iso(self.clock()))
        start = time.monotonic()
        with logger.contextualize(stage=name):
            logger.info("stage {} started", name)
            try:
                yield
            except BaseException:
                took = time.monotonic() - start
                self.store.end_stage(run_id, name, took, "failed")
                logger.info("stage {} failed after {:.2f}s", name, took)
                raise
            took = time.monotonic() - start
            self.store.end_stage(run_id, name, took, "ok")
            logger.info("stage {} done in {:.2f}s", name, took)

    def _done(self, run: Active, run_id: int, delivered: pipeline.Delivered) -> None:
        branch, model = delivered.branch, delivered.model
        dst = self._close(run, run_id, "done", "done", [branch], branch=branch, model=model)
        logger.success(
            "done: pushed {} ({}); ticket is {}",
            delivered.branch,
            delivered.commit[:12],
            dst.relative_to(self.backlog.root),
        )

    def _requeue(self, run: Active, run_id: int, error: Interrupted) -> None:
        self._close(run, run_id, "todo", "requeued", error_code=error.code, error=error.message)
        logger.warning("interrupted in stage {}: back to todo/", run.stage)

    def _close(self, run: Active, run_id: int, folder: str, outcome: str,
               references: Sequence[str] = (), **result: str | None) -> Path:  # fmt: skip
        """Move the ticket to ``folder``, give up its lease, record the outcome."""
        now = self.clock()
        dst = self.backlog.move(run.lease.path, folder, now, references=references)
        self.backlog.release(run.lease)
        took = time.monotonic() - run.started
        self.store.finish_run(run_id, failures.iso(now), outcome, took, **result)
        return dst

    def _fail(
        self,
        lease: Lease,
        task_id: str,
        error: TicketdError,
        *,
        stage: str,
        model: str | None,
        started: float,
        run_id: int | None = None,
    ) -> None:
        now = self.clock()
        message = self.redact(error.message)
        if run_id is not None:
            self.store.finish_run(
                run_id,
                failures.iso(now),
                "failed",
                time.monotonic() - started,
                error_code=error.code,
                error=message,
                model=model,
            )
        dst = self.backlog.target("failed", lease.name)
        attempts = self.store.attempts(lease.name)
        if run_id is None:  # never started a run (invalid ticket): this failure is the attempt
            attempts.append(
                {
                    "at": failures.iso(now),
                    "stage": stage,
                    "errorCode": error.code,
                    "model": model,
                    "durationS": 0.0,
                }
            )
        log_file = self.cfg.logging.dir / "tasks" / f"{pipeline.safe_name(task_id)}.log"
        record = failures.build(
            task_id=task_id,
            file=dst.name,
            now=now,
            stage=stage,
            code=error.code,
            message=message,
            model=model,
            models_tried=[model] if model else [],
            log_file=_display(log_file),
            attempts=attempts,
        )
        failures.write(dst, record)
        self.backlog.move(lease.path, "failed", now, dst=dst)
        self.backlog.release(lease)
        self.failures += 1
        logger.error("failed in stage {} ({}): {}", stage, error.code, message)

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
            return {self.worktree(p.name) for p in self.backlog.files("in-progress")}

        try:
            repo = Repo(self.cfg.repo.path, timeout_s=self.cfg.repo.git_timeout_s)
            for path in repo.prune_worktrees(self.cfg.state_dir / "worktrees", keep):
                logger.info("removed stale worktree {}", path)
        except TicketdError as e:
            logger.error("cannot prune worktrees: {}", e.message)

    def worktree(self, ticket_name: str) -> Path:
        return (
            self.cfg.state_dir / "worktrees" / pipeline.safe_name(ticket_name.removesuffix(".md"))
        )

    def reload(self) -> None:
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
        self.redact.secrets = Redactor(new.secret_values()).secrets
        logger.info("configuration reloaded from {}", new.path)


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
