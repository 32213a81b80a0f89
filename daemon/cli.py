"""The ``ticketd`` command: argument parsing, terminal output, exit statuses.

Exit status: 0 success; 1 the operation found or hit failures; 2 bad usage or bad
configuration. This is the only module that prints.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from daemon.errors import ConfigError, InvalidTicket, TicketdError

if TYPE_CHECKING:  # each command imports what it uses: `ticketd --help` loads none of it
    from daemon import config as configuration
    from daemon.backlog import Backlog

app = typer.Typer(
    help="ticketd: watch backlog/todo/ for Backlog.md tickets, run a coding agent on each in "
    "its own git worktree, push the branch. See README.md for the config and file formats.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: rich's would load 40 ms of modules first
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="config.yaml to use (default: $TICKETD_CONFIG, then ./config.yaml)."
    ),
]


def _load(path: Path | None) -> configuration.Config:
    from daemon import config as configuration

    try:
        return configuration.load(path)
    except ConfigError as e:
        err.print(f"ticketd: bad configuration: {e.message}", markup=False)
        raise typer.Exit(2) from None


def _backlog(cfg: configuration.Config) -> Backlog:
    from daemon.board import open_backlog

    try:
        return open_backlog(cfg)
    except ConfigError as e:
        err.print(f"ticketd: bad configuration: {e.message}", markup=False)
        raise typer.Exit(2) from None


@app.command(short_help="Run the daemon (--once: what is ready, then exit).")
def run(
    config: ConfigOption = None,
    once: Annotated[
        bool, typer.Option("--once", help="Process what is ready in todo/, then exit (cron, CI).")
    ] = False,
) -> None:
    """Run the daemon: watch todo/, claim tickets, run the agent, push branches.

    Stops gracefully on SIGTERM/SIGINT (running tickets get shutdown.grace_s to finish, then
    go back to todo/); a second signal stops at once. SIGHUP reloads config.yaml. With --once,
    exits 1 if any ticket failed.
    """
    from daemon import procs
    from daemon.sdnotify import Notifier
    from daemon.supervisor import Supervisor, preflight

    cfg = _load(config)
    procs.harden_self()  # before anything else runs: no other process may read our memory
    try:
        checked = preflight(cfg)
    except ConfigError as e:
        err.print(f"ticketd: bad configuration: {e.message}", markup=False)
        raise typer.Exit(2) from None
    try:
        from daemon.config import notify_env

        notifier = Notifier.from_env(notify_env())
        code = Supervisor(cfg, once=once, checked=checked, notifier=notifier).run()
    except ConfigError as e:
        err.print(f"ticketd: bad configuration: {e.message}", markup=False)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


SHOWN = 20  # rows of a long table ``ticketd status`` shows without --all


@app.command(short_help="Waiting, running and recent tickets, and why.")
def status(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    show_all: Annotated[
        bool, typer.Option("--all", help=f"List every waiting ticket, not the first {SHOWN}.")
    ] = False,
) -> None:
    """Show waiting tickets and why, running ones with stage, elapsed time and Ollama host,
    the tickets on each Ollama host of a pool, recent outcomes. Tables list the first
    few rows and say how many more there are; --json always has them all."""
    from daemon.status import collect
    from daemon.store import Store

    cfg = _load(config)
    backlog = _backlog(cfg)
    store = Store(cfg.state_dir / "history.sqlite3")
    try:
        report = collect(
            backlog, store, datetime.now(UTC), cfg.ollama.pool if cfg.needs_ollama else ()
        )
    finally:
        store.close()
    if as_json:
        out.print_json(json.dumps(report))
        return
    counts = "  ".join(f"{f}: {n}" for f, n in report["counts"].items())
    out.print(f"[bold]{cfg.backlog.dir}[/bold]  {counts}")
    _table(
        "Waiting in todo/",
        ["ticket", "file", "why"],
        [[w["taskId"] or "-", w["file"], w["reason"]] for w in report["waiting"]],
        limit=None if show_all else SHOWN,
    )
    _table(
        "Running",
        ["ticket", "stage", "elapsed", "owner", "ollama host"],
        [
            [
                r["taskId"],
                r["stage"] or "-",
                _secs(r["elapsedS"]),
                (r["owner"] or "-") + ("" if r["ownerAlive"] is not False else " (dead)"),
                r["ollamaHost"] or "-",
            ]
            for r in report["running"]
        ],
    )
    if len(report["ollamaHosts"]) > 1:
        _table(
            "Ollama hosts",
            ["host", "tickets", "max_tickets", "weight"],
            [
                [h["host"], str(h["tickets"]), str(h["maxTickets"] or "-"), f"{h['weight']:g}"]
                for h in report["ollamaHosts"]
            ],
        )
    _table(
        "Pull requests in review",
        ["ticket", "pull request", "revisions", "since"],
        [[r["taskId"], r["url"], str(r["revisions"]), r["since"]] for r in report["inReview"]],
        limit=None if show_all else SHOWN,
    )
    _table(
        "Recent outcomes",
        ["ticket", "outcome", "took", "model", "llm calls / tokens", "detail"],
        [
            [
                r["task_id"],
                r["outcome"],
                _secs(r["duration_s"]),
                r["model"] or "-",
                f"{r['llm_calls']} / {r['prompt_tokens']}+{r['eval_tokens']}"
                if r["llm_calls"]
                else "-",
                r["branch"] or (f"{r['error_code']}: {r['error']}" if r["error_code"] else ""),
            ]
            for r in report["recent"]
        ],
    )


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}s" if value < 120 else f"{value / 60:.1f}m"


def _table(title: str, columns: list[str], rows: list[list[Any]], limit: int | None = None) -> None:
    """A table of ``rows``, the first ``limit`` of them (a line says how many more)."""
    if not rows:
        out.print(f"{title}: none")
        return
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c)
    for row in rows[:limit]:
        table.add_row(*(str(v) for v in row))
    out.print(table)
    if limit is not None and len(rows) > limit:
        out.print(f"... and {len(rows) - limit} more (--all lists them)")


@app.command(short_help="Check that ticket files parse.")
def validate(
    files: Annotated[
        list[Path] | None,
        typer.Argument(help="Ticket files or folders; default: every ticket in the backlog."),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Check that ticket files parse; report per file; exit 1 if any is invalid.

    Files are read as the daemon reads them: a symbolic link, a directory, a FIFO or an empty
    file is INVALID, with the reason, and is never followed, opened or waited on.
    """
    from daemon import tickets
    from daemon.backlog import FOLDERS

    problems: dict[Path, str] = {}
    if files:  # a folder named on the command line stands for the .md entries in it
        paths = [m for p in files for m in (sorted(p.glob("*.md")) if p.is_dir() else [p])]
    else:  # each entry of the backlog's folders is one ticket, a directory named x.md too
        backlog = _backlog(_load(config))
        paths = [p for f in FOLDERS for p in backlog.files(f)]
        problems = backlog.problems()
        paths = sorted({*paths, *problems})
    bad = 0
    for path in paths:
        try:
            t = tickets.parse_file(path)
            if path in problems:
                raise InvalidTicket(problems[path])
        except InvalidTicket as e:
            bad += 1
            out.print(f"INVALID {path}: {e.message}", markup=False)
        except FileNotFoundError as e:
            bad += 1
            out.print(f"INVALID {path}: {e.strerror}", markup=False)
        else:
            out.print(f"ok      {path}: {t.id} {t.title!r}", markup=False)
    out.print(f"{len(paths) - bad} valid, {bad} invalid")
    raise typer.Exit(1 if bad else 0)


@app.command(short_help="Write a new ticket into todo/.")
def new(
    title: Annotated[str, typer.Argument(help="The ticket's title.")],
    description: Annotated[
        str, typer.Option("--description", "-d", help="What to do and why.")
    ] = "",
    priority: Annotated[
        str | None, typer.Option("--priority", "-p", help="high, medium or low.")
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", "-l", help="A label (repeatable).")
    ] = None,
    ac: Annotated[
        list[str] | None, typer.Option("--ac", help="An acceptance criterion (repeatable).")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Write a new Backlog.md ticket into todo/ with the next free id, and print its path.

    In a Backlog.md project (backlog.layout), the task goes into tasks/ assigned to
    backlog.assignee, with the id Backlog.md itself would give it next.
    """
    if priority is not None and priority not in ("high", "medium", "low"):
        err.print(
            f"ticketd: --priority must be high, medium or low, not {priority!r}", markup=False
        )
        raise typer.Exit(2)
    if not title.strip():
        err.print("ticketd: the title must not be empty", markup=False)
        raise typer.Exit(2)
    from daemon import tickets
    from daemon.files import atomic_write, rename_noreplace

    cfg = _load(config)
    backlog = _backlog(cfg)
    backlog.ensure()
    ticket_id = backlog.new_id(cfg.backlog.id_prefix)
    text = tickets.render_new(
        ticket_id,
        title.strip(),
        description=description,
        priority=priority,
        labels=label or [],
        acceptance_criteria=ac or [],
        created=datetime.now(),
        **backlog.new_ticket_fields(),
    )
    path = backlog.new_ticket_path(ticket_id, title.strip())
    try:
        tmp = path.parent / f".{path.name}.new"
        atomic_write(tmp, text)
        rename_noreplace(tmp, path)
    except FileExistsError:
        tmp.unlink()
        err.print(f"ticketd: {path} already exists", markup=False)
        raise typer.Exit(1) from None
    out.print(str(path), markup=False)


@app.command(short_help="End a running ticket, back to todo/ (or failed/).")
def cancel(
    task_id: Annotated[str, typer.Argument(help="The running ticket's id, e.g. task-42.")],
    fail: Annotated[
        bool,
        typer.Option("--fail", help="Send it to failed/ with CANCELLED instead of back to todo/."),
    ] = False,
    wait_s: Annotated[
        float, typer.Option("--wait", help="Seconds to wait for the run to end.")
    ] = 60,
    config: ConfigOption = None,
) -> None:
    """End a running ticket's agent and put the ticket back in todo/ (or failed/ with --fail).

    The daemon that runs it ends the run at once (the agent's process tree, a model call,
    checks); nothing is pushed. Exits 1 when no running ticket has that id or the run did not
    end within --wait seconds.
    """
    import time

    from daemon import tickets as ticket_files
    from daemon.files import atomic_write as write

    cfg = _load(config)
    backlog = _backlog(cfg)
    matches = []
    for path in backlog.files("in-progress"):
        try:
            found = backlog.read(path).id
        except (InvalidTicket, OSError):
            found = ticket_files.id_from_filename(path)
        if ticket_files.same_id(found, task_id):
            matches.append(backlog.key(path))
    if not matches:
        err.print(f"ticketd: no running ticket {task_id}", markup=False)
        raise typer.Exit(1)
    claims = {name: _claim_id(backlog, name) for name in matches}
    for name in matches:
        write(backlog.cancel_path(name), json.dumps({"fail": fail}) + "\n")
    deadline = time.monotonic() + wait_s
    left = list(claims)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [n for n in left if _claim_id(backlog, n) == claims[n] and claims[n]]
    if left:
        for name in left:
            backlog.cancel_path(name).unlink(missing_ok=True)
        err.print(
            f"ticketd: {', '.join(left)} still runs after {wait_s:g}s (is its daemon up?)",
            markup=False,
        )
        raise typer.Exit(1)
    for name in claims:
        where = backlog.state_of(name)
        if where == "in-progress":
            out.print(
                f"cancelled {name}; it went back to todo/ and was claimed again", markup=False
            )
        else:
            out.print(f"cancelled {name}" + (f"; it is in {where}/" if where else ""), markup=False)


def _claim_id(backlog: Backlog, name: str) -> str:
    """The claim recorded in a running ticket's lease file ("" when none)."""
    try:
        info = json.loads(backlog.lock_path(name).read_bytes() or b"{}")
    except (OSError, ValueError):
        return ""
    return str(info.get("claimId", "")) if isinstance(info, dict) else ""


@app.command("retry-failed", short_help="Move eligible failed tickets back to todo/.")
def retry_failed(
    config: ConfigOption = None,
    task_id: Annotated[
        str | None,
        typer.Option("--task-id", help="Only this ticket (exit 1 if it is not in failed/)."),
    ] = None,
    max_age_days: Annotated[
        float | None, typer.Option("--max-age-days", help="Override retry.max_age_days.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be done; change nothing.")
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Ignore backoff, retry limit and age (an unchanged INVALID_TICKET still waits).",
        ),
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option("--json", help='Print {"tickets": [{taskId, eligible, reason, action}]}.'),
    ] = False,
) -> None:
    """Move eligible tickets from failed/ back to todo/, and say for each why or why not.

    Eligible: retryable, `retryCount` below `retry.max_retries`, `nextRetryAt` passed, failed
    within `retry.max_age_days`; or edited since it failed, whatever the error.
    """
    from daemon import failures

    cfg = _load(config)
    backlog = _backlog(cfg)
    backlog.ensure()
    now = datetime.now(UTC)
    decisions = failures.plan(
        backlog,
        now,
        failures.policy_from(cfg.retry, max_age_days=max_age_days),
        force=force,
        task_id=task_id,
    )
    if task_id is not None and not decisions:
        err.print(f"ticketd: no failed ticket {task_id}", markup=False)
        raise typer.Exit(1)
    done = failures.apply(backlog, decisions, now, dry_run=dry_run)
    if as_json:
        rows = [
            {"taskId": d.task_id, "eligible": d.eligible, "reason": d.reason, "action": d.action}
            for d in done
        ]
        out.print_json(json.dumps({"tickets": rows}))
        return
    _table(
        "Failed tickets",
        ["ticket", "file", "eligible", "why", "action"],
        [[d.task_id, d.file, "yes" if d.eligible else "no", d.reason, d.action] for d in done],
    )


@app.command(short_help="Success rates, stage durations, tokens.")
def stats(
    config: ConfigOption = None,
    days: Annotated[float, typer.Option("--days", help="The window: the last N days.")] = 14,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Success rates by model, label and error code; stage durations p50/p95; tokens per
    ticket; first-try and escalation rates; over the last --days days."""
    from daemon import stats as statistics
    from daemon.store import Store

    cfg = _load(config)
    store = Store(cfg.state_dir / "history.sqlite3")
    try:
        now = datetime.now(UTC)
        until = now + timedelta(seconds=1)  # the window's end is exclusive, to the second
        report = statistics.collect(store, since=now - timedelta(days=days), until=until)
    finally:
        store.close()
    _report(report, statistics.rows(report), as_json)


@app.command(short_help="What the learning loop changed, and why.")
def insights(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """What the learning loop changed: model chains per label with their evidence, prompt
    lessons with their version, status and success before/after, and its log."""
    from daemon import insights as learning
    from daemon.store import Store

    cfg = _load(config)
    store = Store(cfg.state_dir / "history.sqlite3")
    try:
        report = learning.report(store, window_days=cfg.insights.window_days)
    finally:
        store.close()
    _report(report, learning.rows(report), as_json)


def _report(report: Any, tables: dict[str, list[list[str]]], as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(report, default=str))
        return
    for title, rows in tables.items():
        _table(title, rows[0], rows[1:])


@app.command("install-service", short_help="Install the systemd unit.")
def install_service(
    config: ConfigOption = None,
    user: Annotated[
        bool,
        typer.Option("--user", help="A user unit (systemctl --user) instead of a system unit."),
    ] = False,
    print_only: Annotated[
        bool, typer.Option("--print", help="Print the unit; install nothing.")
    ] = False,
    run_as: Annotated[
        str | None,
        typer.Option(
            "--run-as", help="System unit: the user to run as (default: the config file's owner)."
        ),
    ] = None,
) -> None:
    """Render the systemd unit for this installation (this ticketd, this config) and install it.

    The unit sets `Environment=PATH=` to this shell's PATH, so that the daemon (and its
    agents) find the programs this shell finds; run it again after PATH changes (under
    sudo: `sudo env "PATH=$PATH" ticketd install-service`). `ticketd doctor` says whether the
    installed unit is still what this command would write.

    Then: `systemctl [--user] daemon-reload && systemctl [--user] enable --now ticketd`;
    logs with `journalctl [--user] -u ticketd -f`.
    """
    from daemon import service

    cfg = _load(config)
    exe = service.find_executable(sys.argv[0], sys.executable)
    if exe is None:
        err.print("ticketd: cannot find the ticketd executable on PATH", markup=False)
        raise typer.Exit(2)
    for folder in service.writable_paths(cfg):
        folder.mkdir(parents=True, exist_ok=True)
    try:
        text = service.unit_for(
            cfg,
            user_unit=user,
            executable=exe,
            user=run_as or service.default_user(cfg.path),
            path=os.environ.get("PATH") or os.defpath,
        )
    except ValueError as e:
        err.print(f"ticketd: cannot render the unit: {e}", markup=False)
        raise typer.Exit(2) from None
    if print_only:
        out.print(text, markup=False, end="")
        return
    path = service.unit_path(user, Path.home())
    try:
        service.install(text, path)
    except OSError as e:
        err.print(
            f"ticketd: cannot write {path}: {e.strerror} (a system unit needs root)", markup=False
        )
        raise typer.Exit(1) from None
    scope = " --user" if user else ""
    out.print(
        f"installed {path}\nnext: systemctl{scope} daemon-reload && "
        f"systemctl{scope} enable --now ticketd",
        markup=False,
    )


@app.command(short_help="Check that this installation can run tickets.")
def doctor(
    config: ConfigOption = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help='Print {"ok": bool, "checks": [{name, status, detail, fix}]}.'),
    ] = False,
) -> None:
    """Check that this installation can run tickets; one line per check: ok, FAIL or warn,
    its name, what was found and, for a FAIL, the fix (a command or a config key).

    In order: **config** (the file loaded); **agent** (agent.command's program is on the PATH
    the daemon will have: the installed unit's `Environment=PATH=`, else this shell's);
    **sandbox** (bubblewrap works); **repo** (repo.path and repo.remote); **remote** (it
    answers and has repo.base_branch); **push** (it accepts a dry-run push); **ollama** and
    **model NAME** (when a model is used: Ollama answers, each model is pulled and its context
    length reaches ollama.num_ctx); **github** (with github.enabled: the token is accepted and
    may push); **folders** (state_dir, logging.dir, backlog.dir writable; made when missing);
    **backlog** (the layout; a Backlog.md project's statuses and hand-off);
    **unit** (an installed systemd unit is what `ticketd install-service` writes now). A
    check that needs a failed one is a FAIL marked "skipped". Tokens are never shown.

    Exit status: 0 when nothing FAILs (warnings allowed), 1 when a check FAILs, 2 when the
    config cannot be read.
    """
    from daemon import doctor as diagnosis
    from daemon import service

    cfg = _load(config)
    spinner = err.status("checking...")  # on a terminal, while a slow check runs; never stdout
    show_progress = err.is_terminal and not as_json

    def starting(name: str) -> None:
        if show_progress:
            spinner.update(f"checking {name}...")
            spinner.start()

    found = []
    try:
        for check in diagnosis.run(
            cfg,
            home=Path.home(),
            shell_path=os.environ.get("PATH"),
            executable=service.find_executable(sys.argv[0], sys.executable),
            starting=starting,
        ):
            spinner.stop()
            found.append(check)
            if not as_json:
                fix = f" -- fix: {check.fix}" if check.fix else ""
                out.print(f"{check.status:<4}  {check.name:<8}  {check.detail}{fix}", markup=False)
    finally:
        spinner.stop()
    failed = sum(c.status == "FAIL" for c in found)
    skipped = sum(c.skipped for c in found)
    if as_json:
        rows = [
            {"name": c.name, "status": c.status, "detail": c.detail, "fix": c.fix} for c in found
        ]
        out.print_json(json.dumps({"ok": not failed, "checks": rows}))
    else:
        warned = sum(c.status == "warn" for c in found)
        out.print(
            f"{len(found)} checks: {failed - skipped} failed, {skipped} skipped, "
            f"{warned} warning{'' if warned == 1 else 's'}",
            markup=False,
        )
    raise typer.Exit(1 if failed else 0)


secrets_app = typer.Typer(
    help="Secret scanning: the same scan the daemon runs on each change before committing.",
    no_args_is_help=True,
)
app.add_typer(secrets_app, name="secrets", short_help="Secret scanning, as the daemon does it.")


@secrets_app.command("scan", short_help="Scan files for secrets.")
def secrets_scan(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders to scan (recursively).")],
    as_json: Annotated[
        bool, typer.Option("--json", help='Print {"findings": [{file, line, rule, redacted}]}.')
    ] = False,
    baseline: Annotated[
        Path | None, typer.Option("--baseline", help="Ignore the findings listed in this file.")
    ] = None,
    write_baseline: Annotated[
        Path | None,
        typer.Option("--write-baseline", help="Write the findings to this file as a baseline."),
    ] = None,
) -> None:
    """Scan files for secrets; exit 1 when anything is found.

    Values are shown redacted (at most their first 4 characters). Lines with
    `gitleaks:allow` or `pragma: allowlist secret` are skipped.
    """
    from daemon import secrets

    missing = [p for p in paths if not p.exists()]
    if missing:
        err.print(f"ticketd: no such file or folder: {missing[0]}", markup=False)
        raise typer.Exit(2)
    findings = secrets.scan_paths(paths, baseline=baseline)
    if write_baseline is not None:
        secrets.write_baseline(write_baseline, findings)
    if as_json:
        rows = [
            {"file": f.file, "line": f.line, "rule": f.rule, "redacted": f.redacted}
            for f in findings
        ]
        out.print_json(json.dumps({"findings": rows}))
    else:
        for f in findings:
            out.print(f"{f.file}:{f.line}: {f.rule}: {f.redacted}", markup=False)
        out.print(f"{len(findings)} finding(s)")
    raise typer.Exit(1 if findings and write_baseline is None else 0)


def main() -> None:
    try:
        app()
    except TicketdError as e:  # anything a command did not map itself
        err.print(f"ticketd: {e.message}", markup=False)
        sys.exit(1)
