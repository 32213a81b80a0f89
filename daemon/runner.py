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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from daemon import config as configuration
from daemon import failures, gates, insights, logs, pipeline, procs, pulls, review, tickets
from daemon.agent.chain import Result
from daemon.backlog import LEASE_ENV, Backlog
from daemon.confine import Plan
from daemon.errors import Cancelled, Interrupted, PRFailed, TicketdError
from daemon.llm.pool import Pool, Route, outage
from daemon.metrics import Metrics
from daemon.outcomes import Outcomes
from daemon.redact import Redactor
from daemon.repo import Repo
from daemon.runctx import Active, Stop
from daemon.store import Store

if TYPE_CHECKING:
    from daemon.forge import Forge


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
        plan: Plan,
        settings: pipeline.Settings,
        repo_name: str | None = None,
        metrics: Metrics | None = None,
        alert: Callable[[str, str], None] = lambda event, text: None,
    ) -> None:
        self.cfg = cfg
        self.backlog = backlog
        self.store = store
        self.redact = redact
        self.clock = clock
        self.repo = repo
        self.plan = plan
        self.repo_name = repo_name
        self.metrics = metrics
        self.settings = settings
        self.outcomes = Outcomes(
            backlog,
            store,
            redact,
            clock,
            backoff=failures.policy_from(cfg.retry).backoff,
            logs=cfg.logging.dir / "tasks",
            metrics=metrics,
            until_merged=cfg.github.enabled and cfg.github.done_when == "merged",
            alert=alert,
        )

    def worktree(self, ticket_name: str) -> Path:
        return (
            self.cfg.state_dir / "worktrees" / pipeline.safe_name(ticket_name.removesuffix(".md"))
        )

    def branch(self, ticket: tickets.Ticket) -> str:
        return pipeline.branch_name(self.cfg.repo.branch_prefix, ticket, self.redact)

    def route(self, pool: Pool, ticket: tickets.Ticket) -> Route | None:
        """The ticket's route to the Ollama host it is pinned to for its run: the host with
        the first model of its chain (and the review's) that has room; None: it waits."""
        s = self.settings
        chain = pipeline.model_chain(ticket, s.models, s.models_by_label)
        return pool.route(chain, s.review_model if s.review is not None else None)

    def work(self, run: Active) -> None:
        """The worker: run the ticket; whatever escapes (a bug) is recorded on the ticket."""
        ticket = run.ticket
        with (
            logs.ticket_log(self.outcomes.log_path(ticket.id), ticket.id),
            logger.contextualize(ticket=ticket.id),
        ):
            try:
                self._work(run)
            except BaseException as e:
                self._crashed(run, e)
                if not isinstance(e, Exception):
                    raise
            finally:
                if run.route is not None:
                    run.route.close()
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
        run.run_id = run_id
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
                builtin=dataclasses.replace(
                    s.builtin, lessons=lessons, learned_formats=self.store.edit_formats()
                ),
            )
        owner = self.store.branch_owner(run.branch, lease.name)
        if owner is not None:
            run.stage = "worktree"
            taken = TicketdError(
                f"branch {run.branch} belongs to another ticket file, {owner}: give this "
                "ticket another id or title",
                code="BRANCH_TAKEN",
            )
            self.outcomes.fail_run(run, run_id, taken)
            return
        previous = self.store.last_run(lease.name)
        stage = self._stage_hook(run, run_id)
        checkout = self.worktree(lease.name)
        prompt = pipeline.prompt_path(s.prompts, ticket.id)
        llm = run.route
        if llm is not None:
            self._pinned(run, run_id)
            llm.on_move = lambda: self._pinned(run, run_id)
        forge = self.forge()
        confine = self.plan.confinement(
            checkout, [prompt, lease.path], {LEASE_ENV: lease.marker}, ctx.event
        )
        tools = pipeline.Tools(self.repo, confine, self.redact, llm, forge)
        try:
            if run.revision is not None:
                self._revise(run, run_id, s, tools, stage)
            else:
                self._fresh(run, run_id, s, tools, stage, previous)
        finally:
            if forge is not None:
                forge.close()

    def _fresh(
        self,
        run: Active,
        run_id: int,
        s: pipeline.Settings,
        tools: pipeline.Tools,
        stage: pipeline.StageHook,
        previous: dict[str, Any] | None,
    ) -> None:
        """A ticket's run (or the rest of one that failed at the push or the pull request);
        where the ticket goes after."""
        ticket, ctx, forge = run.ticket, run.ctx, tools.forge
        try:
            with tools.confine:
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
                    delivered = self._deliver(run, s, tools, stage, previous=summary)
        except Interrupted as e:
            self.outcomes.requeue(run, run_id, e)
        except Cancelled as e:
            self.outcomes.cancelled(run, run_id, e)
        except gates.Held as e:
            self.outcomes.held(run, run_id, e)
        except TicketdError as e:
            run.stage = e.stage or run.stage
            result: Result | None = getattr(e, "result", None)
            ran = result is not None and result.attempts > 0  # a command agent: name its log
            agent_log = pipeline.agent_log(s.logs, ticket.id) if ran else None
            self._record_agent(run_id, result, None)
            if self._outage(run, e.code):
                self.outcomes.requeue(run, run_id, e)
            else:
                self.outcomes.fail_run(
                    run,
                    run_id,
                    e,
                    models=result.models_tried if result else [],
                    outcomes=result.outcomes if result else None,
                    agent_log=agent_log,
                )
        except Exception as e:  # an unknown error is recorded on the ticket, never passed over
            logger.opt(exception=e).error("unexpected error in stage {}", run.stage)
            error = TicketdError(f"internal error in stage {run.stage}: {type(e).__name__}: {e}")
            self.outcomes.fail_run(run, run_id, error)
        else:
            self._record_agent(run_id, delivered.agent, delivered.review)
            self.outcomes.done(run, run_id, delivered)
            self.repo.forget(delivered.branch)

    def _deliver(
        self,
        run: Active,
        s: pipeline.Settings,
        tools: pipeline.Tools,
        stage: pipeline.StageHook,
        **more: Any,
    ) -> pipeline.Delivered:
        """The pipeline for this run (``more``: what an earlier run left, or a revision)."""
        lease = run.lease
        return pipeline.run(
            run.ticket,
            lease.path,
            self.worktree(lease.name),
            s,
            tools,
            run.ctx,
            stage=stage,
            on_agent_start=lambda pid: lease.record(agentPgid=pid),
            on_model=lambda model: lease.record(model=model),
            still_ours=lambda: self._still_ours(run),
            log=logger.info,
            **more,
        )

    def _revise(
        self,
        run: Active,
        run_id: int,
        s: pipeline.Settings,
        tools: pipeline.Tools,
        stage: pipeline.StageHook,
    ) -> None:
        """A revision of the ticket's open pull request. Whatever happens the ticket returns
        to review/; a revision that pushed nothing says why on the pull request (a stop or
        an Ollama outage says nothing: the request stays open and is taken up again)."""
        revision = run.revision
        assert revision is not None and tools.forge is not None
        self.store.mark_revision(run_id, revision.number)
        lease = run.lease
        try:
            with tools.confine:
                delivered = self._deliver(run, s, tools, stage, revision=revision)
        except Interrupted as e:
            self.outcomes.back_to_review(run, run_id, e, outcome="requeued")
        except Cancelled as e:
            if e.reason == Stop.REMOVED.name or not self.backlog.present(lease):
                self.outcomes.gone(run, run_id, e.message)
            else:
                self._revision_failed(run, run_id, e, tools)
        except TicketdError as e:
            e.stage = e.stage or run.stage
            self._record_agent(run_id, getattr(e, "result", None), None)
            if self._outage(run, e.code):
                self.outcomes.back_to_review(run, run_id, e, outcome="requeued")
            else:
                self._revision_failed(run, run_id, e, tools)
        except Exception as e:
            logger.opt(exception=e).error("unexpected error in stage {}", run.stage)
            error = TicketdError(f"internal error in stage {run.stage}: {type(e).__name__}: {e}")
            error.stage = run.stage
            self._revision_failed(run, run_id, error, tools)
        else:
            self._record_agent(run_id, delivered.agent, delivered.review)
            self.outcomes.done(run, run_id, delivered)
            self.repo.forget(delivered.branch)

    def _revision_failed(
        self, run: Active, run_id: int, error: TicketdError, tools: pipeline.Tools
    ) -> None:
        """Say on the pull request why the revision pushed nothing; back to review/."""
        assert run.revision is not None and tools.forge is not None
        try:
            tools.forge.comment(run.revision.number, pulls.failed(run.revision, error, self.redact))
        except PRFailed as e:
            logger.warning("cannot tell the pull request: {}", e.message)
        self.outcomes.back_to_review(run, run_id, error, outcome="failed")

    def _crashed(self, run: Active, error: BaseException) -> None:
        """Last resort for an error the run could not handle (a bug, a full disk while
        recording): INTERNAL_ERROR on the ticket, or at least the lease given up, so that
        recovery returns the ticket to todo/."""
        logger.opt(exception=error).error("worker crashed in stage {}", run.stage)
        if run.lease.released:
            return
        with contextlib.suppress(Exception):
            if self.backlog.present(run.lease):
                crash = TicketdError(f"internal error in stage {run.stage}: {type(error).__name__}")
                if run.revision is not None and run.run_id is not None:
                    self.outcomes.back_to_review(run, run.run_id, crash, outcome="failed")
                else:
                    self.outcomes.fail_run(run, run.run_id, crash)
        if not run.lease.released:
            self.backlog.release(run.lease)

    def _pinned(self, run: Active, run_id: int) -> None:
        """Record the Ollama host the run is on (its lease for ``status``, the history), at
        its start and each time it moves."""
        assert run.route is not None
        host = run.route.url
        if not run.route.left:
            logger.info("pinned to Ollama at {}", host)
        run.lease.record(ollamaHost=host)
        self.store.set_host(run_id, host)

    def _still_ours(self, run: Active) -> None:
        """Raise when the ticket's file has left in-progress/ (moved or removed by hand)."""
        if not self.backlog.present(run.lease):
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

    def _observe_stage(self, stage: str, took: float) -> None:
        if self.metrics is not None:
            self.metrics.stage(stage, took)

    def _outage(self, run: Active, code: str) -> bool:
        """Is this error Ollama being away (every host the run could use), rather than
        something about the ticket?"""
        if run.route is None:
            return code == "OLLAMA_UNAVAILABLE"
        return outage(code, run.route.breaker)

    def _record_agent(
        self, run_id: int, result: Result | None, verdict: review.Review | None
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
            edit_format=result.edit_format if result else None,
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
        """Time and record each stage. Stages may nest (an agent's attempts have their
        changes and checks): leaving an inner one returns ``run.stage`` to the outer, and an
        error keeps the innermost stage it left in ``error.stage``."""
        open_stages: list[str] = []

        @contextmanager
        def stage(name: str) -> Iterator[None]:
            open_stages.append(name)
            run.stage = name
            run.lease.record(stage=name)
            self.store.start_stage(run_id, name, failures.iso(self.clock()))
            start = time.monotonic()
            outcome = "failed"
            with logger.contextualize(stage=name):
                logger.info("stage {} started", name)
                try:
                    yield
                    outcome = "ok"
                except TicketdError as e:
                    e.stage = e.stage or name
                    raise
                finally:
                    open_stages.pop()
                    run.stage = open_stages[-1] if open_stages else name
                    took = time.monotonic() - start
                    self.store.end_stage(run_id, name, took, outcome)
                    self._observe_stage(name, took)
                    said = "done in" if outcome == "ok" else "failed after"
                    logger.info("stage {} {} {:.2f}s", name, said, took)

        return stage
