"""Where a ticket goes when its run ends, and the record of it: ``done/``, ``review/``
(with ``.review.json``), ``failed/`` (with ``.error.json``), back to ``todo/``, or nowhere when
a person moved its file away meanwhile. Each writes its record (through the redactor)
atomically, moves the ticket, gives up the lease and finishes the run in the history.

With pull requests reviewed on GitHub (``github.done_when: merged``) a delivered ticket waits
in ``review/`` (``PR_OPEN``) until ``daemon/pulls.py`` sees its pull request merged
(``merged``: to done/) or closed (``closed``: to failed/ with PR_CLOSED); a revision run
returns it there.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from loguru import logger

from daemon import failures, gates, pulls, tickets
from daemon.backlog import Backlog, Lease
from daemon.errors import Cancelled, InvalidTicket, TicketdError
from daemon.files import atomic_write
from daemon.metrics import Metrics
from daemon.pipeline import Delivered, safe_name
from daemon.redact import Redactor
from daemon.runctx import Active, Stop
from daemon.store import Store


class Outcomes:
    def __init__(
        self,
        backlog: Backlog,
        store: Store,
        redact: Redactor,
        clock: Callable[[], datetime],
        *,
        backoff: failures.Backoff,
        logs: Path,
        metrics: Metrics | None = None,
        until_merged: bool = False,
        alert: Callable[[str, str], None] = lambda event, text: None,
    ) -> None:
        self.until_merged = until_merged  # a ticket with a pull request waits for its merge
        self.alert = alert  # tells the operator's notifications (daemon/alerts.py)
        self.backlog = backlog
        self.store = store
        self.redact = redact
        self.clock = clock
        self.backoff = backoff
        self.logs = logs  # the per-ticket logs' folder
        self.metrics = metrics
        self.failed = 0  # tickets that ended in failed/ during this process's life

    def held(self, run: Active, run_id: int, held: gates.Held) -> None:
        """A gate stopped the change: to review/ with ``.review.json`` (or to failed/)."""
        if held.folder == "failed":
            self.fail_run(run, run_id, held)
            return
        self.hold(run.lease, run.ticket.id, held, stage=run.stage)
        took = time.monotonic() - run.started
        self._observe("review", took)
        self.store.finish_run(
            run_id,
            failures.iso(self.clock()),
            "review",
            took,
            error_code=held.code,
            error=self.redact(held.message),
        )

    def _observe(self, outcome: str, took: float) -> None:
        if self.metrics is not None:
            self.metrics.finished(outcome, took)

    def hold(
        self,
        lease: Lease,
        task_id: str,
        held: gates.Held,
        *,
        stage: str,
        quiet: bool = False,
        references: Sequence[str] = (),
    ) -> None:
        """Write ``review/X.review.json`` and move the ticket to review/."""
        now = self.clock()
        dst = self.backlog.target("review", lease.name)
        path = self.backlog.record("review", self.backlog.key(dst))  # beside it, as it lands
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
        atomic_write(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        self.backlog.move(lease.path, "review", now, references=references, dst=dst)
        self.backlog.release(lease)
        if quiet:
            return
        logger.bind(ticket=task_id).warning(
            "held for a person ({}): {}; ticket is review/{}", held.code, held.message, dst.name
        )
        self.alert("held", self.redact(f"{task_id}: {held.code}: {held.message}"))

    def done(self, run: Active, run_id: int, delivered: Delivered) -> None:
        if delivered.pr_number is not None and (self.until_merged or delivered.revision):
            self.in_review(run, run_id, delivered)
            return
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

    def in_review(self, run: Active, run_id: int, delivered: Delivered) -> None:
        """The pull request is open: the ticket waits in review/ (PR_OPEN) for its merge."""
        number, url, revision = delivered.pr_number, delivered.pr_url, delivered.revision
        held = gates.Held(
            f"pull request #{number} is open ({url}); the ticket is done when it is merged",
            code="PR_OPEN",
            folder="review",
            details={
                "prNumber": number,
                "prUrl": url,
                "branch": delivered.branch,
                "commit": delivered.commit,
                "revisions": revision.index if revision else 0,
            },
        )
        now = self.clock()
        refs = [delivered.branch, *([url] if url else [])]
        self.hold(run.lease, run.ticket.id, held, stage="pr", quiet=True, references=refs)
        if revision is None and number is not None and url is not None:
            self.store.pull_opened(number, run.lease.name, run.ticket.id, url, failures.iso(now))
            self.alert("pr_opened", f"{run.ticket.id}: pull request #{number} opened: {url}")
        if self.metrics is not None and revision is not None:
            self.metrics.revision("done")
        elif self.metrics is not None:
            self.metrics.pull("opened")
        took = time.monotonic() - run.started
        self._observe("review", took)
        self.store.finish_run(
            run_id, failures.iso(now), "done", took, branch=delivered.branch, model=delivered.model
        )
        what = f"revision {revision.index} pushed" if revision else "pull request open"
        logger.success(
            "{}: {} ({}); the ticket waits in review/ until it is merged",
            what,
            url,
            delivered.commit[:12],
        )

    def back_to_review(
        self, run: Active, run_id: int, error: TicketdError, *, outcome: str
    ) -> None:
        """A revision that pushed nothing: the ticket returns to review/, its pull request
        still open."""
        message = self.redact(error.message)
        self._close(run, run_id, "review", outcome, error_code=error.code, error=message)
        if self.metrics is not None:
            self.metrics.revision(outcome)
        logger.warning("revision {} ({}): {}; back to review/", outcome, error.code, message)

    def merged(self, pull: pulls.Open, at: datetime | None) -> None:
        """The pull request was merged: the ticket goes from review/ to done/."""
        lease = self.backlog.take(pull.name, "review")
        if lease is None:
            return  # a revision or a person has it; asked again later
        now = self.clock()
        try:
            self.backlog.move(lease.path, "done", now, references=[pull.branch, pull.url])
        finally:
            self.backlog.release(lease)
        self.backlog.record("review", pull.name).unlink(missing_ok=True)
        self.store.pull_finished(pull.number, "merged", failures.iso(at or now))
        if self.metrics is not None:
            self.metrics.pull("merged")
        logger.success("pull request #{} was merged: {} is done", pull.number, pull.ticket.name)
        self.alert("pr_merged", f"{pull.ticket.name}: pull request #{pull.number} merged")

    def closed(self, pull: pulls.Open) -> None:
        """The pull request was closed unmerged: the ticket goes to failed/ with PR_CLOSED."""
        lease = self.backlog.take(pull.name, "review")
        if lease is None:
            return
        try:
            task_id = self.backlog.read(lease.path).id
        except (InvalidTicket, OSError):
            task_id = tickets.id_from_filename(lease.path)
        error = TicketdError(
            f"pull request #{pull.number} was closed without being merged ({pull.url}); move "
            "the ticket back to todo/ to run it again",
            code="PR_CLOSED",
        )
        self.fail(lease, task_id, error, stage="pr", models=[], started=time.monotonic())
        self.backlog.record("review", pull.name).unlink(missing_ok=True)
        self.store.pull_finished(pull.number, "closed", failures.iso(self.clock()))
        if self.metrics is not None:
            self.metrics.pull("closed")

    def requeue(self, run: Active, run_id: int, error: TicketdError) -> None:
        self._close(run, run_id, "todo", "requeued", error_code=error.code, error=error.message)
        logger.warning("{} in stage {}: back to todo/", error.message, run.stage)

    def cancelled(self, run: Active, run_id: int, error: Cancelled) -> None:
        """A person ended the run: back to todo/, or failed/ with CANCELLED (``--fail``); a
        file moved away by hand stays where the person put it."""
        if error.reason == Stop.REMOVED.name or not self.backlog.present(run.lease):
            self.gone(run, run_id, error.message)
        elif run.ctx.fail:
            self.fail_run(run, run_id, error)
        else:
            self._close(
                run, run_id, "todo", "cancelled", error_code=error.code, error=error.message
            )
            logger.warning("cancelled in stage {}: back to todo/", run.stage)

    def gone(self, run: Active, run_id: int, message: str) -> None:
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
            self.gone(run, run_id, f"the file left in-progress/ before it could go to {folder}/")
            return None
        self.backlog.release(run.lease)
        took = time.monotonic() - run.started
        if outcome in ("done", "failed", "review"):
            self._observe(outcome, took)
        self.store.finish_run(run_id, failures.iso(now), outcome, took, **result)
        return dst

    def fail_run(
        self,
        run: Active,
        run_id: int | None,
        error: TicketdError,
        *,
        models: Sequence[str] = (),
        outcomes: dict[str, str] | None = None,
        agent_log: Path | None = None,
    ) -> None:
        """The run failed in its current stage: ``fail`` with what the run knows."""
        self.fail(
            run.lease,
            run.ticket.id,
            error,
            stage=run.stage,
            models=models,
            started=run.started,
            run_id=run_id,
            outcomes=outcomes,
            agent_log=agent_log,
        )

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
        agent_log: Path | None = None,
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
        record = failures.build(
            backoff=self.backoff,
            task_id=task_id,
            file=dst.name,
            now=now,
            stage=stage,
            code=error.code,
            message=message,
            model=model,
            models_tried=list(models),
            model_outcomes=outcomes or {},
            log_file=_display(self.log_path(task_id)),
            agent_log=_display(agent_log) if agent_log is not None else None,
            attempts=attempts,
        )
        note = self.backlog.failure_note(record, now)
        self.backlog.rewrite(lease.path, "failed", now, note=note)  # as it will read in failed/
        record["contentSha256"] = failures.content_sha256(lease.path)
        failures.write(
            self.backlog.record("failed", self.backlog.key(dst)), self.redact.data(record)
        )
        self.backlog.move(lease.path, "failed", now, dst=dst, note=note)
        self.backlog.release(lease)
        self.failed += 1
        self._observe("failed", time.monotonic() - started)
        logger.error("failed in stage {} ({}): {}", stage, error.code, message)
        self.alert("failed", f"{task_id}: {error.code} in stage {stage}: {message}")

    def log_path(self, task_id: str) -> Path:
        return self.logs / f"{safe_name(task_id)}.log"


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
