"""One place builds the running daemon from a ``Config``.

``preflight`` checks what a start needs and refuses to start on what is bound to fail (exit
status 2): the user's repository and its remote, the base branch there, a token for pull
requests, bubblewrap when ``agent.sandbox: required``. ``build`` makes every running part
from a config: the redactor, ticketd's git, the Ollama client and its health monitor, the
runner, the HTTP server and the scheduled jobs. The supervisor calls it again on SIGHUP and
swaps the whole set (running tickets finish with the parts they started with); only the
keys in ``RESTART_ONLY`` wait for a restart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from loguru import logger

from daemon import config as configuration
from daemon import sandbox
from daemon.backlog import Backlog
from daemon.errors import ConfigError, TicketdError
from daemon.llm.breaker import CircuitBreaker
from daemon.llm.client import Ollama
from daemon.llm.health import Monitor
from daemon.metrics import Metrics
from daemon.redact import Redactor
from daemon.repo import Git, Remote, Repo, repo_from_remote, resolve_remote
from daemon.runner import Runner
from daemon.server import Probes, Server
from daemon.store import Store

RESTART_ONLY = ("backlog", "state_dir", "logging", "concurrency")
Probe = Callable[[], tuple[int, dict[str, Any]]]


@dataclass(frozen=True)
class Checked:
    """What ``preflight`` found out."""

    remote: Remote
    repo_name: str | None  # GitHub owner/name, with github.enabled
    bwrap: str | None  # the sandbox to use; None: agents run unsandboxed
    warnings: tuple[str, ...] = ()


def git(cfg: configuration.Config) -> Git:
    return Git(cfg.git_env(), timeout_s=cfg.repo.git_timeout_s)


def preflight(cfg: configuration.Config) -> Checked:
    """Refuse to start on a configuration the runs could not use (``ConfigError``)."""
    g = git(cfg)
    warnings = []
    try:
        remote = resolve_remote(g, cfg.repo.path, cfg.repo.remote)
    except TicketdError as e:
        raise ConfigError(f"{cfg.path}: repo: {e.message}") from None
    repo = Repo(cfg.state_dir / "git", remote, g)
    base = cfg.repo.base_branch
    try:
        heads = repo.remote_heads(base)
    except TicketdError as e:
        warnings.append(f"cannot reach the remote {remote.fetch_url} now ({e.message})")
    else:
        if base not in heads:
            raise ConfigError(
                f"{cfg.path}: repo.base_branch: the remote {remote.fetch_url} has no branch "
                f"{base!r}"
            )
    bwrap = None
    if cfg.agent.sandbox != "off":
        bwrap = sandbox.find_bwrap()
        if bwrap is None:
            why = sandbox.unavailable_reason()
            if cfg.agent.sandbox == "required":
                raise ConfigError(
                    f"{cfg.path}: agent.sandbox is required but bubblewrap cannot run here "
                    f"({why}); install it (Debian: apt install bubblewrap) or set "
                    "agent.sandbox: auto"
                )
            warnings.append(
                f"agents run without a sandbox: {why} (install bubblewrap; agent.sandbox)"
            )
    return Checked(remote, _github(cfg, remote), bwrap, tuple(warnings))


def _github(cfg: configuration.Config, remote: Remote) -> str | None:
    if not cfg.github.enabled:
        return None
    if cfg.github_token() is None:
        raise ConfigError(
            f"{cfg.path}: github.enabled is true but ${cfg.github.token_env} is not set "
            "(github.token_env names the variable holding the token)"
        )
    name = cfg.github.repo or repo_from_remote(remote.push_url)
    if name is None:
        raise ConfigError(
            f"{cfg.path}: github.repo: cannot tell owner/name from remote {cfg.repo.remote!r}; "
            "set github.repo"
        )
    return name


@dataclass(frozen=True)
class Hooks:
    """What the supervisor lends the parts it does not rebuild."""

    backlog: Backlog
    store: Store
    metrics: Metrics
    clock: Callable[[], datetime]
    wake: Callable[[], None]
    retry_job: Callable[[], None]
    learn_job: Callable[[], None]


@dataclass
class Parts:
    """Every running part built from one config."""

    cfg: configuration.Config
    checked: Checked
    redact: Redactor
    repo: Repo
    llm: Ollama | None
    monitor: Monitor | None
    runner: Runner

    def describe_ollama(self) -> tuple[int, dict[str, Any]]:
        return self.monitor.describe() if self.monitor else (200, {"enabled": False})

    def start(self, scheduler: BackgroundScheduler, hooks: Hooks, *, once: bool) -> None:
        for warning in self.checked.warnings:
            logger.warning("{}", warning)
        self.repo.ensure()
        if self.monitor is not None:
            health = self.monitor.check_now()
            if health is not None and not health.ok:
                self.monitor.breaker.trip()  # down at start: wait for it, do not try tickets
            self.monitor.start()
        self._schedule(scheduler, hooks, once=once)

    def _schedule(self, scheduler: BackgroundScheduler, hooks: Hooks, *, once: bool) -> None:
        cfg = self.cfg
        jobs = {
            "retry-failed": (hooks.retry_job, cfg.retry.check_interval_s)
            if cfg.retry.enabled and not once
            else None,
            "insights": (hooks.learn_job, cfg.insights.interval_s)
            if cfg.agent.kind == "builtin" and not once
            else None,
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
                next_run_time=datetime.now(UTC) if job_id == "retry-failed" else None,
            )

    def stop(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
        if self.llm is not None:
            self.llm.close()


def build(cfg: configuration.Config, hooks: Hooks, checked: Checked | None = None) -> Parts:
    """Every running part for ``cfg`` (``checked``: preflight's answer, made when not given)."""
    checked = checked or preflight(cfg)
    redact = Redactor(cfg.secret_values())
    repo = Repo(cfg.state_dir / "git", checked.remote, git(cfg))
    llm, monitor = _ollama(cfg, hooks.wake)
    runner = Runner(
        cfg,
        hooks.backlog,
        hooks.store,
        redact,
        hooks.clock,
        repo=repo,
        llm=llm,
        bwrap=checked.bwrap,
        repo_name=checked.repo_name,
        metrics=hooks.metrics,
    )
    return Parts(cfg, checked, redact, repo, llm, monitor, runner)


def serve(
    cfg: configuration.Config,
    probes: Probes,
    metrics: Metrics,
    redact: Callable[[Any], Any],
) -> Server:
    """The HTTP server for ``server.*`` (its probes read the current parts when called, so
    it outlives a reload that leaves ``server`` as it was)."""
    c = cfg.server
    try:
        server = Server(
            c.host, c.port, probes, metrics.registry, token=cfg.server_token(), redact=redact
        )
    except OSError as e:
        raise ConfigError(f"{cfg.path}: server: cannot listen on {c.host}:{c.port}: {e}") from e
    server.start()
    logger.info("serving /health, /ready, /health/ollama, /status, /metrics on {}", server.url)
    return server


def _ollama(
    cfg: configuration.Config, wake: Callable[[], None]
) -> tuple[Ollama | None, Monitor | None]:
    """The Ollama client and its health monitor, when a run needs Ollama."""
    if cfg.agent.kind != "builtin" and not cfg.review.enabled:
        return None, None
    o = cfg.ollama
    b = o.circuit_breaker
    breaker = CircuitBreaker(
        failure_threshold=b.failure_threshold,
        success_threshold=b.success_threshold,
        half_open_requests=b.half_open_requests,
        reset_timeout_s=b.reset_timeout_s,
    )
    llm = Ollama(
        o.host,
        breaker=breaker,
        timeout_s=o.timeout_s,
        connect_timeout_s=o.health_check.timeout_s,
        num_ctx=o.num_ctx,
        num_predict=o.num_predict,
        keep_alive=o.keep_alive,
        retries=o.retries,
    )
    monitor = Monitor(
        llm,
        [*o.models, *([o.review_model] if cfg.review.enabled and o.review_model else [])],
        interval_s=o.health_check.interval_s,
        timeout_s=o.health_check.timeout_s,
        on_available=wake,
        warm=o.models[0],
    )
    return llm, monitor
