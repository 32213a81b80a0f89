"""Retries: eligibility and backoff (properties, injected clock), retry-failed, the
scheduled job, resuming where a run failed, duplicates."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from conftest import PY, SIDE_CHANNEL, Daemon, Project, git, ticketd, wait_until
from hypothesis import given
from hypothesis import strategies as st

from daemon import config as configuration
from daemon import failures
from daemon.supervisor import Supervisor

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
POLICY = failures.Policy(max_retries=3, max_age_days=7, backoff=failures.Backoff(300, 2, 21600))
CODES = st.sampled_from(["AGENT_FAILED", "PUSH_FAILED", "CHECKS_FAILED", "UNSAFE_EDIT"])


def record(
    code: str = "AGENT_FAILED",
    *,
    retry_count: int = 0,
    failed_ago: timedelta = timedelta(hours=1),
    due_in: timedelta = timedelta(0),
    sha: str = "abc",
) -> dict:
    from daemon.errors import CODES as TABLE

    return {
        "taskId": "task-1",
        "errorCode": code,
        "retryable": TABLE[code].retryable,
        "retryCount": retry_count,
        "timestamp": failures.iso(NOW - failed_ago),
        "nextRetryAt": failures.iso(NOW + due_in),
        "contentSha256": sha,
    }


@given(
    code=CODES,
    count=st.integers(0, 10),
    ago_h=st.integers(0, 400),
    due_s=st.integers(-(10**5), 10**5),
)
def test_eligibility_rules(code: str, count: int, ago_h: int, due_s: int) -> None:
    r = record(
        code, retry_count=count, failed_ago=timedelta(hours=ago_h), due_in=timedelta(seconds=due_s)
    )
    ok, why, exhausted = failures.eligibility(r, "abc", NOW, POLICY)
    # a nextRetryAt beyond the longest backoff means the clock stepped back: due at once
    stepped_back = due_s > 21600 + failures.CLOCK_SLACK.total_seconds()
    expected = r["retryable"] and count < 3 and ago_h <= 7 * 24 and (due_s <= 0 or stepped_back)
    assert ok == expected, why
    if exhausted:
        assert not ok and (count >= 3 or ago_h > 7 * 24)
    # forcing ignores backoff, limits and age
    assert failures.eligibility(r, "abc", NOW, POLICY, force=True)[0]
    # a person who edited the ticket makes it eligible at once, even after a permanent error
    assert failures.eligibility(r, "edited", NOW, POLICY) == (True, "edited since it failed", False)


@given(st.booleans())
def test_an_unchanged_invalid_ticket_waits_even_when_forced(force: bool) -> None:
    r = record("INVALID_TICKET")
    assert failures.eligibility(r, "abc", NOW, POLICY, force=force)[0] is False
    assert failures.eligibility(r, "fixed", NOW, POLICY, force=force)[0] is True


@given(count=st.integers(0, 40), seed=st.integers(0, 2**32))
def test_backoff_is_exponential_jittered_and_capped(count: int, seed: int) -> None:
    import random

    b = POLICY.backoff
    delay = min(21600, 300 * 2**count)
    at = failures.next_retry_at(count, NOW, b, random.Random(seed))
    assert NOW + timedelta(seconds=delay * 0.5) <= at <= NOW + timedelta(seconds=delay)
    assert b.delay(count + 1) >= b.delay(count)


def write_failed(project: Project, name: str, rec: dict) -> Path:
    path = project.ticket(name, folder="failed", status="Failed")
    rec = {**rec, "file": name, "contentSha256": failures.sha256(path.read_bytes())}
    failures.write(path.with_name(path.stem + ".error.json"), rec)
    return path


def test_retry_failed_reports_each_ticket_and_moves_the_due_ones(project: Project) -> None:
    real_now = datetime.now(UTC)
    due = {
        **record(),
        "taskId": "task-1",
        "timestamp": failures.iso(real_now - timedelta(hours=1)),
        "nextRetryAt": failures.iso(real_now - timedelta(minutes=1)),
    }
    old = {**due, "taskId": "task-2", "timestamp": failures.iso(real_now - timedelta(days=30))}
    permanent = {**due, "taskId": "task-3", "errorCode": "UNSAFE_EDIT", "retryable": False}
    waiting = {
        **due,
        "taskId": "task-4",
        "nextRetryAt": failures.iso(real_now + timedelta(hours=2)),
    }
    write_failed(project, "task-1 - Due.md", due)
    write_failed(project, "task-2 - Old.md", old)
    write_failed(project, "task-3 - Permanent.md", permanent)
    write_failed(project, "task-4 - Waiting.md", waiting)
    cfg = ["--config", str(project.config_path)]

    dry = ticketd("retry-failed", "--dry-run", "--json", *cfg)
    assert dry.returncode == 0, dry.stderr
    rows = {t["taskId"]: t for t in json.loads(dry.stdout)["tickets"]}
    assert rows["task-1"] == {
        "taskId": "task-1",
        "eligible": True,
        "reason": "due",
        "action": "would retry",
    }
    assert rows["task-2"]["eligible"] is False and "more than 7 days" in rows["task-2"]["reason"]
    assert "UNSAFE_EDIT is permanent" in rows["task-3"]["reason"]
    assert rows["task-4"]["reason"].startswith("backing off until")
    assert len(project.where()["failed"]) == 4  # a dry run changes nothing

    real = ticketd("retry-failed", "--json", *cfg)
    actions = {t["taskId"]: t["action"] for t in json.loads(real.stdout)["tickets"]}
    assert actions == {
        "task-1": "retried",
        "task-2": "marked not retryable",
        "task-3": "none",
        "task-4": "none",
    }
    assert project.where()["todo"] == ["task-1 - Due.md"]
    assert not (project.folder("failed") / "task-1 - Due.error.json").exists()
    marked = json.loads((project.folder("failed") / "task-2 - Old.error.json").read_text())
    assert marked["retryable"] is False and "more than 7 days" in marked["retryNote"]

    forced = ticketd("retry-failed", "--force", "--task-id", "TASK-4", "--json", *cfg)
    assert json.loads(forced.stdout)["tickets"][0]["action"] == "retried"
    missing = ticketd("retry-failed", "--task-id", "task-99", *cfg)
    assert missing.returncode == 1 and "no failed ticket task-99" in missing.stderr


def test_editing_a_failed_ticket_makes_it_eligible(project: Project) -> None:
    path = write_failed(project, "task-5 - Broken.md", {**record("UNSAFE_EDIT")})
    cfg = ["--config", str(project.config_path)]
    before = json.loads(ticketd("retry-failed", "--dry-run", "--json", *cfg).stdout)["tickets"][0]
    assert before["eligible"] is False
    path.write_text(path.read_text() + "\nClarified: do not touch files outside the repo.\n")
    after = json.loads(ticketd("retry-failed", "--dry-run", "--json", *cfg).stdout)["tickets"][0]
    assert (after["eligible"], after["reason"]) == (True, "edited since it failed")


def test_the_scheduled_job_retries_a_due_ticket_by_itself(project: Project, daemons: list) -> None:
    project.write_config(retry={"check_interval_s": 0.3})
    real_now = datetime.now(UTC)
    write_failed(
        project,
        "task-6 - Later.md",
        {
            **record(),
            "taskId": "task-6",
            "timestamp": failures.iso(real_now),
            "nextRetryAt": failures.iso(real_now),
        },
    )
    daemons.append(d := Daemon(project))
    wait_until(lambda: project.where() == {"done": ["task-6 - Later.md"]}, what="retried and done")
    assert "retrying task-6 - Later.md (due)" in d.text()


def run_once(project: Project) -> int:
    cfg = configuration.load(project.config_path)
    return Supervisor(cfg, once=True, log_to_stderr=False).run()


def test_push_failed_resumes_from_the_committed_branch(project: Project, tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    agent = [PY, "-c", f"open({str(starts)!r}, 'a').write('x'); open('f.txt', 'w').write('f')"]
    hook = project.remote / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'remote is read-only today' >&2\nexit 1\n")
    hook.chmod(0o755)
    project.write_config(agent={"command": agent, **SIDE_CHANNEL})
    name = "task-7 - Push.md"
    project.ticket(name)
    assert run_once(project) == 1
    assert (
        json.loads((project.folder("failed") / "task-7 - Push.error.json").read_text())["errorCode"]
        == "PUSH_FAILED"
    )

    hook.unlink()
    (project.folder("failed") / name).rename(project.folder("todo") / name)
    assert run_once(project) == 0

    assert starts.read_text() == "x"  # the agent ran once
    assert git(project.remote, "show", "ticketd/task-7-push:f.txt") == "f"
    assert project.where() == {"done": [name]}


def test_a_retry_after_an_agent_failure_tells_the_agent_what_failed(project: Project) -> None:
    agent = [PY, "-c", "import sys; sys.exit('the build tool is missing')"]
    project.write_config(agent={"command": agent, **SIDE_CHANNEL})
    name = "task-8 - Again.md"
    project.ticket(name)
    assert run_once(project) == 1
    (project.folder("failed") / name).rename(project.folder("todo") / name)
    assert run_once(project) == 1
    prompt = (project.root / "state" / "prompts" / "task-8.prompt.md").read_text()
    assert "## A previous attempt failed" in prompt
    assert "AGENT_FAILED in stage agent: agent exited with status 1" in prompt
    assert "the build tool is missing" in prompt


def test_a_duplicate_of_a_done_ticket_goes_to_review(project: Project) -> None:
    body = "Make the login page redirect back to where the user came from."
    project.ticket("task-1 - Fix-login-redirect.md", folder="done", body=body, status="Done")
    project.ticket("task-9 - Fix-login-redirect.md", body=body)
    project.ticket("task-10 - Something-else.md", body="Add a dark mode toggle to settings.")
    assert run_once(project) == 0
    assert project.where()["review"] == ["task-9 - Fix-login-redirect.md"]
    rec = json.loads(
        (project.folder("review") / "task-9 - Fix-login-redirect.review.json").read_text()
    )
    assert rec["reason"] == "DUPLICATE" and rec["message"].startswith("duplicate of task-1")
    assert "task-10 - Something-else.md" in project.where()["done"]


def test_retries_queue_behind_fresh_tickets_of_the_same_priority(
    project: Project, tmp_path: Path
) -> None:
    order = tmp_path / "order"
    fail_once = [
        PY,
        "-c",
        (
            "import os, sys\n"
            f"open({str(order)!r}, 'a').write(sys.argv[1] + ' ')\n"
            f"flag = {str(tmp_path)!r} + '/failed-' + sys.argv[1]\n"
            "if sys.argv[1] == 'task-1' and not os.path.exists(flag):\n"
            "    open(flag, 'w').close(); sys.exit('first time fails')\n"
            "open('out.txt', 'w').write(sys.argv[1])\n"
        ),
        "{ticket_id}",
    ]
    project.write_config(agent={"command": fail_once, **SIDE_CHANNEL})
    project.ticket("task-1 - First.md", body="Alpha work item.")
    assert run_once(project) == 1
    (project.folder("failed") / "task-1 - First.md").rename(
        project.folder("todo") / "task-1 - First.md"
    )
    project.ticket("task-2 - Second.md", body="Beta work item, unrelated.")
    assert run_once(project) == 0
    assert order.read_text().split() == ["task-1", "task-2", "task-1"]


def test_a_failure_landing_beside_a_same_named_file_keeps_its_record_beside_it(
    project: Project,
) -> None:
    """failed/ already holds a file of that name (a person's copy): the ticket lands as
    ``X (2).md`` and its ``.error.json`` is ``X (2).error.json``, where retries read it."""
    name = "task-1 - Twice.md"
    project.ticket(name, folder="failed", status="Failed")
    project.ticket(name)
    project.write_config(agent={"command": [sys.executable, "-c", "raise SystemExit(3)"]})
    cfg = ["--config", str(project.config_path)]
    assert ticketd("run", "--once", *cfg).returncode == 1
    assert project.where() == {"failed": ["task-1 - Twice (2).md", name]}
    record = json.loads((project.folder("failed") / "task-1 - Twice (2).error.json").read_text())
    assert (record["file"], record["errorCode"]) == ("task-1 - Twice (2).md", "AGENT_FAILED")
    dry = ticketd("retry-failed", "--dry-run", "--json", *cfg)
    reasons = {t["reason"] for t in json.loads(dry.stdout)["tickets"]}
    assert "no readable .error.json beside it; use --force" in reasons  # the person's copy
    assert any(r.startswith("backing off until") for r in reasons)  # ticketd's, read
