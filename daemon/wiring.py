"""One place builds the running daemon from a ``Config``.

``preflight`` checks what a start needs and refuses to start on what is bound to fail (exit
status 2): the user's repository and its remote, the base branch there, a token for pull
requests, bubblewrap when ``agent.sandbox: required``. ``build`` makes every running part
from a config: the redactor, ticketd's git, the pool of Ollama hosts (each with its client,
breaker and health monitor), how runs are confined (``plan``), the runner and its settings,
and the scheduled work (the retry job, the learning loop, recovery of a dead daemon's
tickets); ``serve`` the HTTP server. The
supervisor calls ``build`` again on SIGHUP and swaps the whole set (running tickets finish
with the parts they started with); only the keys in ``RESTART_ONLY`` wait for a restart.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from apscheduler.util import undefined
from loguru import logger

from daemon import checks, failures, insights, pipeline, procs, pulls, review, tickets
from daemon import config as configuration
from daemon.agent import builtin, command
from daemon.backlog import LEASE_ENV, Backlog
from daemon.confine import Plan, host_port
from daemon.errors import ConfigError, TicketdError
from daemon.llm.breaker import CircuitBreaker
from daemon.llm.client import Ollama
from daemon.llm.health import Monitor
from daemon.llm.pool import Host, Pins, Pool
from daemon.metrics import Metrics
from daemon.preflight import Checked, git, holds, preflight
from daemon.redact import Redactor
from daemon.repo import Repo
from daemon.runner import Runner
from daemon.server import Hook, Probes, Server
from daemon.store import Store
from daemon.web.dashboard import Dashboard

RESTART_ONLY = ("backlog", "state_dir", "logging", "concurrency")
WATCH_TICK_S = 5  # how often the watch looks for pull requests due a poll (cheap)
START_NOW = ("retry-failed", "pull-requests")  # jobs that run at start too
GIT_MAINTENANCE_S = 3600  # how often git gc --auto looks at ticketd's own repository
Probe = Callable[[], tuple[int, dict[str, Any]]]


@dataclass(frozen=True)
class Hooks:
    """What the supervisor lends the parts it does not rebuild."""

    backlog: Backlog
    store: Store
    metrics: Metrics
    clock: Callable[[], datetime]
    wake: Callable[[], None]
    revise: Callable[[pulls.Open, pulls.Revision], bool] = lambda o, r: False
    pins: Pins = field(default_factory=Pins)  # tickets per Ollama host, across reloads
    alert: Callable[[str, str], None] = lambda event, text: None  # the notifications


@dataclass
class Parts:
    """Every running part built from one config."""

    cfg: configuration.Config
    checked: Checked
    redact: Redactor
    repo: Repo
    pool: Pool | None  # the Ollama hosts, when a run needs Ollama
    runner: Runner
    holds: tuple[str, ...] = ()  # why every ticket would fail now: the queue waits
    watch: pulls.Watch | None = None  # open pull requests (github.done_when: merged)

    def recheck(self) -> None:
        """Look again at what holds the queue (every reconcile interval while any does)."""
        if not self.holds:
            return
        self.holds = holds(self.cfg, self.checked.remote)
        if not self.holds:
            logger.info("nothing holds the queue any more; claiming again")

    def describe_ollama(self) -> tuple[int, dict[str, Any]]:
        return self.pool.describe() if self.pool else (200, {"enabled": False})

    def start(self, scheduler: BackgroundScheduler, hooks: Hooks, *, once: bool) -> None:
        for warning in self.checked.warnings:
            logger.warning("{}", warning)
        self.repo.ensure()
        if self.pool is not None:
            self.pool.start()
        self._schedule(scheduler, hooks, once=once)

    def _schedule(self, scheduler: BackgroundScheduler, hooks: Hooks, *, once: bool) -> None:
        cfg = self.cfg
        if self.watch is not None and once:
            self.watch.tick()  # a run from cron: look at the open pull requests once
        jobs = {
            "pull-requests": (self.watch.tick, min(WATCH_TICK_S, cfg.github.poll_interval_s))
            if self.watch is not None and not once
            else None,
            "retry-failed": (lambda: self.retry_due(hooks), cfg.retry.check_interval_s)
            if cfg.retry.enabled and not once
            else None,
            "insights": (lambda: self.learn(hooks), cfg.insights.interval_s)
            if cfg.agent.kind == "builtin" and not once
            else None,
            "git-maintenance": (self.maintain, GIT_MAINTENANCE_S) if not once else None,
        }
        for job_id, job in jobs.items():
            if job is None:
                if scheduler.get_job(job_id) is not None:
                    scheduler.remove_job(job_id)
                continue
            function, interval = job
            scheduler.add_job(
                function,
                IntervalTrigger(seconds=interval),
                id=job_id,
                replace_existing=True,
                coalesce=True,
                max_instances=1,
                # None would add the job paused; undefined: first run one interval from now
                next_run_time=datetime.now(UTC) if job_id in START_NOW else undefined,
            )

    def recover(self, hooks: Hooks, *, startup: bool = False) -> None:
        """Return tickets a dead daemon left in in-progress/ to todo/, ending its agents
        first; then remove the checkouts no live daemon uses."""
        now = hooks.clock()
        recovered = 0
        for lease in hooks.backlog.orphans():
            recovered += 1
            ended = procs.terminate(
                procs.with_env(LEASE_ENV, f"{lease.lock_path}:"), self.cfg.agent.kill_grace_s
            )
            task_id = tickets.id_from_filename(lease.path)
            hooks.store.interrupt(
                str(lease.info.get("claimId", "")), lease.name, task_id, failures.iso(now)
            )
            back = "review" if lease.info.get("revision") else "todo"  # a revision's PR is open
            with contextlib.suppress(FileNotFoundError):  # moved away by hand meanwhile
                hooks.backlog.move(lease.path, back, now)
            hooks.backlog.release(lease)
            logger.warning(
                "recovered {} from a stopped daemon to {}/ (ended {} agent process(es))",
                lease.name,
                back,
                ended,
            )
        if recovered or startup:
            self._prune(hooks)
        hooks.backlog.trim_cache()

    def _prune(self, hooks: Hooks) -> None:
        """Remove checkouts (and sandbox folders) no live daemon is using (left by a crash)."""

        def keep() -> set[Path]:  # checkouts of tickets some live daemon is running
            busy = hooks.backlog.files("in-progress")
            return {self.runner.worktree(hooks.backlog.key(p)) for p in busy}

        try:
            for path in self.repo.prune(self.cfg.state_dir / "worktrees", keep):
                logger.info("removed stale checkout {}", path)
            kept = {path.name for path in keep()}
            for path in (self.cfg.state_dir / "run").glob("*"):
                if path.name not in kept:
                    shutil.rmtree(path, ignore_errors=True)
        except (TicketdError, OSError) as e:
            logger.error("cannot prune checkouts: {}", e)

    def retry_due(self, hooks: Hooks) -> None:
        """The scheduled job: failed tickets whose retry is due go back to todo/."""
        now = hooks.clock()
        decisions = failures.plan(hooks.backlog, now, failures.policy_from(self.cfg.retry))
        for d in failures.apply(hooks.backlog, decisions, now, dry_run=False):
            if d.action == "retried":
                logger.info("retrying {} ({})", d.file, d.reason)
                hooks.wake()
            elif d.action == "marked not retryable":
                logger.warning("{} stays in failed/: {}", d.file, d.reason)

    def maintain(self) -> None:
        """The scheduled housekeeping of ticketd's own git repository."""
        try:
            self.repo.maintain()
        except TicketdError as e:
            logger.warning("git maintenance failed: {}", e.message)

    def learn(self, hooks: Hooks) -> None:
        """The scheduled analysis of recent runs (the learning loop); logs what it changed."""
        c = self.cfg.insights
        store = Store(self.cfg.state_dir / "history.sqlite3")
        try:
            now = hooks.clock()
            found = insights.analyse(store, now=now, window_days=c.window_days, min_runs=c.min_runs)
            for line in insights.apply(store, found, now):
                logger.info("insights: {}", line)
        finally:
            store.close()

    def stop(self) -> None:
        if self.watch is not None:
            self.watch.forge.close()
        if self.pool is not None:
            self.pool.stop()


def build(cfg: configuration.Config, hooks: Hooks, checked: Checked | None = None) -> Parts:
    """Every running part for ``cfg`` (``checked``: preflight's answer, made when not given)."""
    checked = checked or preflight(cfg)
    redact = Redactor(cfg.secret_values())
    repo = Repo(cfg.state_dir / "git", checked.remote, git(cfg))
    pool = _pool(cfg, hooks)
    runner = Runner(
        cfg,
        hooks.backlog,
        hooks.store,
        redact,
        hooks.clock,
        repo=repo,
        plan=plan(cfg, checked.bwrap, repo),
        settings=settings(cfg),
        repo_name=checked.repo_name,
        metrics=hooks.metrics,
        alert=hooks.alert,
    )
    watch = _watch(cfg, hooks, runner, checked.repo_name, redact)
    return Parts(cfg, checked, redact, repo, pool, runner, checked.holds, watch)


def _watch(
    cfg: configuration.Config,
    hooks: Hooks,
    runner: Runner,
    repo_name: str | None,
    redact: Redactor,
) -> pulls.Watch | None:
    """The watch on open pull requests, when a ticket with one is done only once merged."""
    g = cfg.github
    forge = runner.forge()
    if forge is None or g.done_when != "merged":
        return None

    def recent() -> int:
        return hooks.store.revisions_since(failures.iso(hooks.clock() - timedelta(hours=1)))

    return pulls.Watch(
        pulls.Settings(
            trigger=g.trigger,
            allowed_logins=g.allowed_logins,
            revise_on_changes_requested=g.revise_on_changes_requested,
            poll_interval_s=g.poll_interval_s,
            full_read_s=g.full_read_s,
            debounce_s=g.debounce_s,
            max_revisions=g.max_revisions,
            max_revisions_per_hour=g.max_revisions_per_hour,
        ),
        forge,
        hooks.backlog,
        merged=runner.outcomes.merged,
        closed=runner.outcomes.closed,
        revise=hooks.revise,
        recent_revisions=recent,
        done_revisions=hooks.store.revisions_of,
        redact=redact,
        clock=hooks.clock,
    )


def serve(
    cfg: configuration.Config,
    probes: Probes,
    metrics: Metrics,
    redact: Callable[[Any], Any],
    webhook: Hook | None = None,
    web: Callable[[str | None], Dashboard] | None = None,
) -> Server:
    """The HTTP server for ``server.*`` (its probes read the current parts when called, so
    it outlives a reload that leaves ``server`` as it was)."""
    c = cfg.server
    token = cfg.server_token()
    try:
        server = Server(
            c.host,
            c.port,
            probes,
            metrics.registry,
            token=token,
            redact=redact,
            webhook=webhook,
            web=web(token) if web is not None else None,
        )
    except OSError as e:
        raise ConfigError(f"{cfg.path}: server: cannot listen on {c.host}:{c.port}: {e}") from e
    server.start()
    logger.info(
        "serving /health, /ready, /health/ollama, /status, /metrics on {} (the dashboard: /)",
        server.url,
    )
    return server


def _pool(cfg: configuration.Config, hooks: Hooks) -> Pool | None:
    """The Ollama hosts (``ollama.hosts``, else ``ollama.host``), each with its client,
    breaker and health monitor, when a run needs Ollama."""
    if not cfg.needs_ollama:
        return None
    o = cfg.ollama
    b = o.circuit_breaker
    hosts = []
    for h in o.pool:
        breaker = CircuitBreaker(
            failure_threshold=b.failure_threshold,
            success_threshold=b.success_threshold,
            half_open_requests=b.half_open_requests,
            reset_timeout_s=b.reset_timeout_s,
        )
        llm = Ollama(
            h.url,
            breaker=breaker,
            timeout_s=o.timeout_s,
            connect_timeout_s=o.health_check.timeout_s,
            num_ctx=o.num_ctx,
            num_predict=o.num_predict,
            keep_alive=o.keep_alive,
            temperature=o.temperature,
            seed=o.seed,
            retries=o.retries,
        )
        monitor = Monitor(
            llm,
            cfg.wanted_models,
            interval_s=o.health_check.interval_s,
            timeout_s=o.health_check.timeout_s,
            on_available=hooks.wake,
            on_change=_alert_host(hooks, h.url),
            warm=o.models[0],
            warn_missing=len(o.pool) == 1,
        )
        hosts.append(Host(h.url, h.weight, h.max_tickets, llm, monitor))
    return Pool(hosts, hooks.pins)


def _alert_host(hooks: Hooks, url: str) -> Callable[[bool], None]:
    """Tell the notifications when the Ollama host at ``url`` goes away or comes back."""

    def tell(up: bool) -> None:
        said = "answers again" if up else "stopped answering"
        hooks.alert("ollama_up" if up else "ollama_down", f"Ollama at {url} {said}")

    return tell


def plan(cfg: configuration.Config, bwrap: str | None, repo: Repo) -> Plan:
    """How runs are confined: ticketd's folders and the user's repository hidden, the base
    objects shown, the Ollama hosts reachable (and agent.allow_hosts through the proxy)."""
    return Plan(
        bwrap=bwrap,
        hide=(cfg.state_dir, cfg.logging.dir, cfg.backlog.dir, cfg.repo.path),
        read_only=(repo.objects,),
        forward=tuple(host_port(h.url) for h in cfg.ollama.pool),
        allow_hosts=cfg.agent.allow_hosts,
        env=cfg.agent_env(),
        grace_s=cfg.agent.kill_grace_s,
        max_memory_mb=cfg.agent.max_memory_mb,
        runtime=cfg.state_dir / "run",
    )


def backlog_inside(cfg: configuration.Config) -> tuple[str, ...]:
    """The backlog folder as a path in the repository, when it is in it: what an agent
    changes there (Backlog.md's AGENTS.md tells agents to edit their task file) never goes
    into a ticket's branch."""
    try:
        inside = cfg.backlog.dir.resolve().relative_to(cfg.repo.path.resolve()).as_posix()
    except (ValueError, OSError):
        return ()
    return (inside,) if inside != "." else ()


def settings(cfg: configuration.Config) -> pipeline.Settings:
    return pipeline.Settings(
        base_branch=cfg.repo.base_branch,
        branch_prefix=cfg.repo.branch_prefix,
        push_retries=cfg.repo.push_retries,
        prompts=cfg.state_dir / "prompts",
        logs=cfg.logging.dir / "tasks",
        timeout_s=cfg.agent.timeout_s,
        exclude=(*cfg.agent.exclude, *backlog_inside(cfg)),
        models=cfg.ollama.models,
        kind=cfg.agent.kind,
        models_by_label=cfg.ollama.models_by_label,
        builtin=builtin.Settings(
            num_ctx=cfg.ollama.num_ctx,
            num_predict=cfg.ollama.num_predict,
            max_reflections=cfg.agent.max_reflections,
            max_context_files=cfg.agent.max_context_files,
            whole_files=cfg.agent.whole_files,
            candidates=cfg.agent.candidates,
            edit_format=cfg.agent.edit_format,
        ),
        command=command.Settings(
            cfg.agent.command,
            cfg.agent.env,
            uses_ollama=cfg.agent_uses_ollama,
            max_reflections=cfg.agent.max_reflections,
        ),
        suite=checks.Suite(
            python=cfg.static_analysis.python,
            analysis=tuple(
                checks.Command(c.glob, c.run, c.timeout_s, c.glob)
                for c in cfg.static_analysis.commands
            ),
            checks=tuple(checks.Command(c.name, c.run, c.timeout_s) for c in cfg.checks),
        ),
        sensitive_paths=cfg.repo.sensitive_paths,
        sign_commits=cfg.repo.sign_commits,
        secrets=cfg.secrets.enabled,
        secrets_on_finding=cfg.secrets.on_finding,
        secrets_baseline=cfg.secrets.baseline,
        review=review.Policy(r.strictness, r.check_for, r.block_on_critical, r.on_error)
        if (r := cfg.review).enabled
        else None,
        review_model=cfg.ollama.review_model or cfg.ollama.models[0],
        review_on_block=cfg.review.on_block,
        pr=pipeline.PRSettings(cfg.github.draft, cfg.github.labels) if cfg.github.enabled else None,
    )
