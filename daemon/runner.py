"""One ticket's run on a worker thread: history, per-ticket log, the pipeline, and where
the ticket goes after: ``done/``, ``review/``, ``failed/`` (with ``.error.json``) or back to
``todo/``.

A run cut off by the daemon stopping, or by an Ollama outage, goes back to ``todo/``:
neither says anything about the ticket. A run a person cancelled goes back to ``todo/`` (or
to ``failed/`` with CANCELLED); a run whose file was moved away by hand just ends, pushing
nothing. Every other error is recorded on the ticket, and whatever happens in a worker (a
bug included) ends with the ticket out of ``in-progress/`` or its lease given up for
recovery: never a ticket stuck.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from loguru import logger

from daemon import checks, failures, gates, insights, logs, pipeline, procs, review, tickets
from daemon import config as configuration
from daemon.agent import builtin
from daemon.backlog import LEASE_ENV, Backlog, Lease
from daemon.confine import Confinement
from daemon.errors import Cancelled, Interrupted, InvalidTicket, TicketdError
from daemon.files import atomic_write
from daemon.llm.breaker import State
from daemon.llm.client import Ollama
from daemon.metrics import Metrics
from daemon.redact import Redactor
from daemon.repo import Repo
from daemon.runctx import RunContext, Stop
from daemon.sandbox import Sandbox, Spec
from daemon.store import Store

if TYPE_CHECKING:
    from daemon.forge import Forge

OUTAGE_CODES = ("OLLAMA_UNAVAILABLE", "LLM_TIMEOUT")


def review_path(ticket: Path) -> Path:
    """``review/X.md`` -> ``review/X.review.json``."""
    return ticket.with_name(ticket.name.removesuffix(".md") + ".review.json")


def settings(cfg: configuration.Config) -> pipeline.Settings:
    return pipeline.Settings(
        base_branch=cfg.repo.base_branch,
        branch_prefix=cfg.repo.branch_prefix,
        push_retries=cfg.repo.push_retries,
        prompts=cfg.state_dir / "prompts",
        logs=cfg.logging.dir / "tasks",
        command=cfg.agent.command,
        timeout_s=cfg.agent.timeout_s,
        exclude=cfg.agent.exclude,
        models=cfg.ollama.models,
        kind=cfg.agent.kind,
        models_by_label=cfg.ollama.models_by_label,
        builtin=builtin.Settings(
            num_ctx=cfg.ollama.num_ctx,
            num_predict=cfg.ollama.num_predict,
            max_reflections=cfg.agent.max_reflections,
            max_context_files=cfg.agent.max_context_files,
            python_analysis=cfg.static_analysis.python,
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


@dataclass
class Active:
    ticket: tickets.Ticket
    lease: Lease
    started: float
    branch: str = ""
    ctx: RunContext = field(default_factory=RunContext)
    stage: str = "claimed"
    future: Future[None] | None = None


class Runner:
    def __init__(
        self,
        cfg: configuration.Config,
        backlog: Backlog,
        store: Store,
        redact: Redactor,
        clock: Callable[[], datetime],
        *,
        repo: Repo,
        llm: Ollama | None,
        bwrap: str | None,
        repo_name: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.backlog = backlog
        self.store = store
        self.redact = redact
        self.clock = clock
        self.repo = repo
        self.llm = llm
        self.bwrap = bwrap
        self.repo_name = repo_name
        self.metrics = metrics
        self.settings = settings(cfg)
        self.failed = 0  # tickets that ended in failed/ during this process's life

    def worktree(self, ticket_name: str) -> Path:
        return (
            self.cfg.state_dir / "worktrees" / pipeline.safe_name(ticket_name.removesuffix(".md"))
        )

    def branch(self, ticket: tickets.Ticket) -> str:
        return pipeline.branch_name(self.cfg.repo.branch_prefix, ticket, self.redact)

    def work(self, run: Active) -> None:
        """The worker: run the ticket; whatever escapes (a bug) is recorded on the ticket."""
        ticket = run.ticket
        with (
            logs.ticket_log(self._log_path(ticket.id), ticket.id),
            logger.contextualize(ticket=ticket.id),
        ):
            try:
                self._work(run)
            except BaseException as e:
                self._crashed(run, e)
                if not isinstance(e, Exception):
                    raise
            finally:
                procs.end_strays(self.cfg.agent.kill_grace_s)

    def _work(self, run: Active) -> None:
        ticket, lease, ctx = run.ticket, run.lease, run.ctx
        snapshot = self.redact.data(self.cfg.snapshot())
        run_id = self.store.start_run(
            lease.info["claimId"],
            lease.name,
            ticket.id,
            self.redact(ticket.title),
            failures.iso(self.clock()),
            snapshot,
            branch=run.branch,
        )
        run.stage = "claimed"
        logger.info("claimed {} ({})", lease.name, ticket.title)
        s = self.settings
        self.store.set_labels(run_id, list(ticket.labels))
        if s.kind == "builtin":  # what earlier runs taught: lessons, and chains per label
            version, lessons = insights.in_force(self.store)
            self.store.set_lesson_version(run_id, version)
            learned = insights.models_by_label(self.store, s.models_by_label)
            s = dataclasses.replace(
                s,
                models_by_label=learned,
                builtin=dataclasses.replace(s.builtin, lessons=lessons),
            )
        chain = pipeline.model_chain(ticket, s.models, s.models_by_label)
        owner = self.store.branch_owner(run.branch, lease.name)
        if owner is not None:
            self.fail(
                lease,
                ticket.id,
                TicketdError(
                    f"branch {run.branch} belongs to another ticket file, {owner}: give this "
                    "ticket another id or title",
                    code="BRANCH_TAKEN",
                ),
                stage="worktree",
                models=[],
                started=run.started,
                run_id=run_id,
            )
            return
        previous = self.store.last_run(lease.name)
        stage = self._stage_hook(run, run_id)
        checkout = self.worktree(lease.name)
        prompt = pipeline.prompt_path(s.prompts, ticket.id)
        llm = self.llm.session() if self.llm is not None else None
        forge = self.forge()
        confine = self._confinement(run, checkout, [prompt, lease.path])
        tools = pipeline.Tools(self.repo, confine, self.redact, llm, forge)
        try:
            with confine, ctx.on_cancel(llm.abort if llm else lambda: None):
                after = previous["error_code"] if previous else None
                if after == "PUSH_FAILED" or (after == "PR_FAILED" and forge is not None):
                    delivered = pipeline.resume(
                        ticket, s, tools, ctx, after=str(after), stage=stage, log=logger.info
                    )
                else:
                    summary = None
                    if previous and previous["outcome"] == "failed":
                        p = previous
                        summary = f"{p['error_code']} in stage {p['stage']}: {p['error']}"
                    delivered = pipeline.run(
                        ticket,
                        lease.path,
                        checkout,
                        s,
                        tools,
                        ctx,
                        stage=stage,
                        on_agent_start=lambda pid: lease.record(agentPgid=pid),
                        still_ours=lambda: self._still_ours(run),
                        log=logger.info,
                        previous=summary,
                    )
        except Interrupted as e:
            self._requeue(run, run_id, e)
        except Cancelled as e:
            self._cancelled(run, run_id, e)
        except gates.Held as e:
            self._hold(run, run_id, e)
        except TicketdError as e:
            result: builtin.Result | None = getattr(e, "result", None)
            self._record_agent(run_id, result, None)
            if e.code in OUTAGE_CODES and self._outage(e.code):
                self._requeue(run, run_id, e)
            else:
                self.fail(
                    lease,
                    ticket.id,
                    e,
                    stage=run.stage,
                    models=(result.models_tried if result else None)
                    or (chain[:1] if s.kind == "builtin" or "{model}" in str(s.command) else []),
                    started=run.started,
                    run_id=run_id,
                    outcomes=result.outcomes if result else None,
                )
        except Exception as e:  # an unknown error is recorded on the ticket, never passed over
            logger.opt(exception=e).error("unexpected error in stage {}", run.stage)
            error = TicketdError(f"internal error in stage {run.stage}: {type(e).__name__}: {e}")
            self.fail(
                lease,
                ticket.id,
                error,
                stage=run.stage,
                models=[],
                started=run.started,
                run_id=run_id,
            )
        else:
            self._record_agent(run_id, delivered.agent, delivered.review)
            self._done(run, run_id, delivered)
        finally:
            if forge is not None:
                forge.close()
            if llm is not None:
                llm.close()

    def _crashed(self, run: Active, error: BaseException) -> None:
        """Last resort for an error the run could not handle (a bug, a full disk while
        recording): INTERNAL_ERROR on the ticket, or at least the lease given up, so that
        recovery returns the ticket to todo/."""
        logger.opt(exception=error).error("worker crashed in stage {}", run.stage)
        if run.lease.released:
            return
        with contextlib.suppress(Exception):
            if run.lease.path.exists():
                self.fail(
                    run.lease,
                    run.ticket.id,
                    TicketdError(f"internal error in stage {run.stage}: {type(error).__name__}"),
                    stage=run.stage,
                    models=[],
                    started=run.started,
                )
        if not run.lease.released:
            self.backlog.release(run.lease)

    def _confinement(self, run: Active, checkout: Path, readable: Sequence[Path]) -> Confinement:
        """The run's sandbox (when bubblewrap is usable and agent.sandbox allows it): the
        checkout writable, these files readable, ticketd's own folders hidden, Ollama and
        agent.allow_hosts reachable, nothing else."""
        cfg = self.cfg
        sandbox = None
        if self.bwrap is not None:
            url = urlsplit(
                cfg.ollama.host if "://" in cfg.ollama.host else f"http://{cfg.ollama.host}"
            )
            port = url.port or (443 if url.scheme == "https" else 80)
            spec = Spec(
                workdir=checkout,
                hide=(
                    cfg.state_dir,
                    cfg.logging.dir,
                    cfg.backlog.dir,
                    cfg.repo.path,
                    cfg.path.parent,
                ),
                read_only=(self.repo.objects, *readable),
                forward=((url.hostname or "127.0.0.1", port),),
                proxy_hosts=cfg.agent.allow_hosts,
            )
            runtime = cfg.state_dir / "run" / checkout.name
            sandbox = Sandbox(spec, bwrap=self.bwrap, runtime_dir=runtime)
        return Confinement(
            env={**cfg.agent_env(), LEASE_ENV: run.lease.marker},
            grace_s=cfg.agent.kill_grace_s,
            max_memory_mb=cfg.agent.max_memory_mb,
            cancel=run.ctx.event,
            sandbox=sandbox,
        )

    def _still_ours(self, run: Active) -> None:
        """Raise when the ticket's file has left in-progress/ (moved or removed by hand)."""
        if not os.path.lexists(run.lease.path):
            run.ctx.cancel(Stop.REMOVED)
            run.ctx.check()

    def forge(self) -> Forge | None:
        """A client for the pull requests, when ``github.enabled`` (checked by preflight)."""
        g = self.cfg.github
        token = self.cfg.github_token()
        if not g.enabled or token is None or self.repo_name is None:
            return None
        from daemon.forge import Forge  # PyGithub loads only when pull requests are on

        return Forge(
            self.repo_name,
            token,
            base_url=g.base_url,
            retries=g.retries,
            max_rate_limit_wait_s=g.max_rate_limit_wait_s,
        )

    def _hold(self, run: Active, run_id: int, held: gates.Held) -> None:
        """A gate stopped the change: to review/ with ``.review.json`` (or to failed/)."""
        if held.folder == "failed":
            self.fail(
                run.lease,
                run.ticket.id,
                held,
                stage=run.stage,
                models=[],
                started=run.started,
                run_id=run_id,
            )
            return
        self.hold(run.lease, run.ticket.id, held, stage=run.stage)
        took = time.monotonic() - run.started
        self._observe_outcome("review", took)
        self.store.finish_run(
            run_id,
            failures.iso(self.clock()),
            "review",
            took,
            error_code=held.code,
            error=self.redact(held.message),
        )

    def _observe_stage(self, stage: str, took: float) -> None:
        if self.metrics is not None:
            self.metrics.stage(stage, took)

    def _observe_outcome(self, outcome: str, took: float) -> None:
        if self.metrics is not None:
            self.metrics.finished(outcome, took)

    def hold(self, lease: Lease, task_id: str, held: gates.Held, *, stage: str) -> None:
        """Write ``review/X.review.json`` and move the ticket to review/."""
        now = self.clock()
        dst = self.backlog.target("review", lease.name)
        record = {
            "taskId": task_id,
            "file": dst.name,
            "timestamp": failures.iso(now),
            "stage": stage,
            "reason": held.code,
            "message": held.message,
            **held.details,
        }
        record = self.redact.data(record)
        atomic_write(review_path(dst), json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        self.backlog.move(lease.path, "review", now, dst=dst)
        self.backlog.release(lease)
        logger.bind(ticket=task_id).warning(
            "held for a person ({}): {}; ticket is review/{}", held.code, held.message, dst.name
        )

    def _outage(self, code: str) -> bool:
        """Is this error Ollama being away, rather than something about the ticket?"""
        return code == "OLLAMA_UNAVAILABLE" or (
            self.llm is not None and self.llm.breaker.state is not State.CLOSED
        )

    def _record_agent(
        self, run_id: int, result: builtin.Result | None, verdict: review.Review | None
    ) -> None:
        """The run's LLM calls (agent and review), totals, model outcomes and quality."""
        calls = (result.calls if result else []) + (verdict.calls if verdict else [])
        if result is None and not calls:
            return
        if self.metrics is not None:
            self.metrics.calls(calls)
        self.store.record_calls(
            run_id,
            calls,
            quality=result.quality if result else None,
            outcomes=result.outcomes if result else {},
        )
        prompt = sum(c.prompt_tokens for c in calls)
        evals = sum(c.eval_tokens for c in calls)
        logger.info("llm: {} calls, {} prompt + {} eval tokens", len(calls), prompt, evals)
        if result is not None:
            logger.info(
                "models tried {}; reflections {}; auto-fixes {}; quality {}",
                result.models_tried,
                result.reflections,
                result.fixes,
                result.quality,
            )

    def _stage_hook(self, run: Active, run_id: int) -> pipeline.StageHook:
        @contextmanager
        def stage(name: str) -> Iterator[None]:
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
                    self._observe_stage(name, took)
                    logger.info("stage {} failed after {:.2f}s", name, took)
                    raise
                took = time.monotonic() - start
                self.store.end_stage(run_id, name, took, "ok")
                self._observe_stage(name, took)
                logger.info("stage {} done in {:.2f}s", name, took)

        return stage

    def _done(self, run: Active, run_id: int, delivered: pipeline.Delivered) -> None:
        branch, model = delivered.branch, delivered.model
        refs = [branch, *([delivered.pr_url] if delivered.pr_url else [])]
        dst = self._close(run, run_id, "done", "done", refs, branch=branch, model=model)
        if dst is not None:
            logger.success(
                "done: pushed {} ({}); ticket is {}",
                delivered.branch,
                delivered.commit[:12],
                dst.relative_to(self.backlog.root),
            )

    def _requeue(self, run: Active, run_id: int, error: TicketdError) -> None:
        self._close(run, run_id, "todo", "requeued", error_code=error.code, error=error.message)
        logger.warning("{} in stage {}: back to todo/", error.message, run.stage)

    def _cancelled(self, run: Active, run_id: int, error: Cancelled) -> None:
        """A person ended the run: back to todo/, or failed/ with CANCELLED (``--fail``); a
        file moved away by hand stays where the person put it."""
        if error.reason == Stop.REMOVED.name or not os.path.lexists(run.lease.path):
            self._gone(run, run_id, error.message)
        elif run.ctx.fail:
            self.fail(
                run.lease,
                run.ticket.id,
                error,
                stage=run.stage,
                models=[],
                started=run.started,
                run_id=run_id,
            )
        else:
            self._close(
                run, run_id, "todo", "cancelled", error_code=error.code, error=error.message
            )
            logger.warning("cancelled in stage {}: back to todo/", run.stage)

    def _gone(self, run: Active, run_id: int, message: str) -> None:
        """The ticket's file left in-progress/ by hand: record it, give up the lease."""
        took = time.monotonic() - run.started
        self.store.finish_run(
            run_id,
            failures.iso(self.clock()),
            "cancelled",
            took,
            error_code="CANCELLED",
            error=message,
        )
        self.backlog.release(run.lease)
        logger.warning(
            "{} was moved or removed by hand in stage {}: the run ended, nothing was pushed",
            run.lease.name,
            run.stage,
        )

    def _close(
        self,
        run: Active,
        run_id: int,
        folder: str,
        outcome: str,
        references: Sequence[str] = (),
        **result: str | None,
    ) -> Path | None:
        """Move the ticket to ``folder``, give up its lease, record the outcome. None when
        its file is gone (moved by hand meanwhile)."""
        now = self.clock()
        try:
            dst = self.backlog.move(run.lease.path, folder, now, references=references)
        except FileNotFoundError:
            self._gone(run, run_id, f"the file left in-progress/ before it could go to {folder}/")
            return None
        self.backlog.release(run.lease)
        took = time.monotonic() - run.started
        if outcome in ("done", "failed", "review"):
            self._observe_outcome(outcome, took)
        self.store.finish_run(run_id, failures.iso(now), outcome, took, **result)
        return dst

    def fail(
        self,
        lease: Lease,
        task_id: str,
        error: TicketdError,
        *,
        stage: str,
        models: Sequence[str],
        started: float,
        run_id: int | None = None,
        outcomes: dict[str, str] | None = None,
    ) -> None:
        """Write ``.error.json`` and move the ticket to failed/."""
        now = self.clock()
        message = self.redact(error.message)
        model = models[-1] if models else None
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
        attempts: list[dict[str, Any]] = self.store.attempts(lease.name)
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
        self.backlog.rewrite(lease.path, "failed", now)  # as it will read in failed/
        b = self.cfg.retry.backoff
        record = failures.build(
            content_sha256=_content_sha256(lease.path),
            backoff=failures.Backoff(b.base_s, b.factor, b.max_s),
            task_id=task_id,
            file=dst.name,
            now=now,
            stage=stage,
            code=error.code,
            message=message,
            model=model,
            models_tried=list(models),
            model_outcomes=outcomes or {},
            log_file=_display(self._log_path(task_id)),
            attempts=attempts,
        )
        failures.write(dst, self.redact.data(record))
        self.backlog.move(lease.path, "failed", now, dst=dst)
        self.backlog.release(lease)
        self.failed += 1
        self._observe_outcome("failed", time.monotonic() - started)
        logger.error("failed in stage {} ({}): {}", stage, error.code, message)

    def _log_path(self, task_id: str) -> Path:
        return self.cfg.logging.dir / "tasks" / f"{pipeline.safe_name(task_id)}.log"


def _content_sha256(path: Path) -> str:
    """The SHA-256 of a ticket file ("" when it is no readable ticket file: a link, a FIFO)."""
    try:
        return failures.sha256(tickets.read_bytes(path))
    except (InvalidTicket, OSError):
        return ""


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
