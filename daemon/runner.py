"""One ticket's run on a worker thread: history, per-ticket log, the pipeline, and where
the ticket goes after: ``done/``, ``failed/`` (with ``.error.json``) or back to ``todo/``.

A run cut off by the daemon stopping, or by an Ollama outage, goes back to ``todo/``:
neither says anything about the ticket. Every other error is recorded on the ticket.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from daemon import checks, failures, gates, insights, logs, pipeline, review, tickets
from daemon import config as configuration
from daemon.agent import builtin
from daemon.backlog import LEASE_ENV, Backlog, Lease
from daemon.errors import Interrupted, TicketdError
from daemon.files import atomic_write
from daemon.llm.breaker import State
from daemon.llm.client import Ollama
from daemon.metrics import Metrics
from daemon.redact import Redactor
from daemon.store import Store

if TYPE_CHECKING:
    from daemon.forge import Forge

OUTAGE_CODES = ("OLLAMA_UNAVAILABLE", "LLM_TIMEOUT")


def review_path(ticket: Path) -> Path:
    """``review/X.md`` -> ``review/X.review.json``."""
    return ticket.with_name(ticket.name.removesuffix(".md") + ".review.json")


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
            grace_s=cfg.agent.kill_grace_s,
        ),
        sign_commits=cfg.repo.sign_commits,
        max_memory_mb=cfg.agent.max_memory_mb,
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
    cancel: threading.Event = field(default_factory=threading.Event)
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
        llm: Ollama | None,
        repo_name: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.backlog = backlog
        self.store = store
        self.redact = redact
        self.clock = clock
        self.llm = llm
        self.repo_name = repo_name
        self.metrics = metrics
        self.failed = 0  # tickets that ended in failed/ during this process's life

    def worktree(self, ticket_name: str) -> Path:
        return (
            self.cfg.state_dir / "worktrees" / pipeline.safe_name(ticket_name.removesuffix(".md"))
        )

    def work(self, run: Active) -> None:
        ticket, lease = run.ticket, run.lease
        with (
            logs.ticket_log(self._log_path(ticket.id), ticket.id),
            logger.contextualize(ticket=ticket.id),
        ):
            snapshot = json.loads(self.redact(json.dumps(self.cfg.snapshot())))
            run_id = self.store.start_run(
                lease.info["claimId"],
                lease.name,
                ticket.id,
                ticket.title,
                failures.iso(self.clock()),
                snapshot,
            )
            logger.info("claimed {} ({})", lease.name, ticket.title)
            s = settings(self.cfg, self.redact)
            s = dataclasses.replace(s, env={**s.env, LEASE_ENV: lease.marker})
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
            forge = self.forge()
            previous = self.store.last_run(lease.name)
            try:
                after = previous["error_code"] if previous else None
                if after == "PUSH_FAILED" or (after == "PR_FAILED" and forge is not None):
                    delivered = pipeline.resume(
                        ticket,
                        s,
                        forge,
                        after=str(after),
                        stage=lambda name: self._stage(run, run_id, name),
                        log=logger.info,
                    )
                else:
                    summary = None
                    if previous and previous["outcome"] == "failed":
                        p = previous
                        summary = f"{p['error_code']} in stage {p['stage']}: {p['error']}"
                    delivered = pipeline.run(
                        ticket,
                        lease.path,
                        self.worktree(lease.name),
                        s,
                        stage=lambda name: self._stage(run, run_id, name),
                        cancel=run.cancel,
                        on_agent_start=lambda pid: lease.record(agentPgid=pid),
                        llm=self.llm,
                        forge=forge,
                        log=logger.info,
                        previous=summary,
                    )
            except Interrupted as e:
                self._requeue(run, run_id, e)
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
                        models=(result.models_tried if result else None) or chain[:1],
                        started=run.started,
                        run_id=run_id,
                        outcomes=result.outcomes if result else None,
                    )
            except Exception as e:  # an unknown error is recorded on the ticket, never passed over
                logger.opt(exception=e).error("unexpected error in stage {}", run.stage)
                error = TicketdError(
                    f"internal error in stage {run.stage}: {type(e).__name__}: {e}"
                )
                self.fail(
                    lease,
                    ticket.id,
                    error,
                    stage=run.stage,
                    models=chain[:1],
                    started=run.started,
                    run_id=run_id,
                )
            else:
                self._record_agent(run_id, delivered.agent, delivered.review)
                self._done(run, run_id, delivered)
            finally:
                if forge is not None:
                    forge.close()

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
            "message": self.redact(held.message),
            **held.details,
        }
        atomic_write(review_path(dst), json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        self.backlog.move(lease.path, "review", now, dst=dst)
        self.backlog.release(lease)
        logger.bind(ticket=task_id).warning(
            "held for a person ({}): {}; ticket is review/{}",
            held.code,
            self.redact(held.message),
            dst.name,
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
                self._observe_stage(name, took)
                logger.info("stage {} failed after {:.2f}s", name, took)
                raise
            took = time.monotonic() - start
            self.store.end_stage(run_id, name, took, "ok")
            self._observe_stage(name, took)
            logger.info("stage {} done in {:.2f}s", name, took)

    def _done(self, run: Active, run_id: int, delivered: pipeline.Delivered) -> None:
        branch, model = delivered.branch, delivered.model
        refs = [branch, *([delivered.pr_url] if delivered.pr_url else [])]
        dst = self._close(run, run_id, "done", "done", refs, branch=branch, model=model)
        logger.success(
            "done: pushed {} ({}); ticket is {}",
            delivered.branch,
            delivered.commit[:12],
            dst.relative_to(self.backlog.root),
        )

    def _requeue(self, run: Active, run_id: int, error: TicketdError) -> None:
        self._close(run, run_id, "todo", "requeued", error_code=error.code, error=error.message)
        logger.warning("{} in stage {}: back to todo/", error.message, run.stage)

    def _close(
        self,
        run: Active,
        run_id: int,
        folder: str,
        outcome: str,
        references: Sequence[str] = (),
        **result: str | None,
    ) -> Path:
        """Move the ticket to ``folder``, give up its lease, record the outcome."""
        now = self.clock()
        dst = self.backlog.move(run.lease.path, folder, now, references=references)
        self.backlog.release(run.lease)
        took = time.monotonic() - run.started
        if outcome != "requeued":
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
            content_sha256=failures.sha256(lease.path.read_bytes()),
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
        failures.write(dst, record)
        self.backlog.move(lease.path, "failed", now, dst=dst)
        self.backlog.release(lease)
        self.failed += 1
        self._observe_outcome("failed", time.monotonic() - started)
        logger.error("failed in stage {} ({}): {}", stage, error.code, message)

    def _log_path(self, task_id: str) -> Path:
        return self.cfg.logging.dir / "tasks" / f"{pipeline.safe_name(task_id)}.log"


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
