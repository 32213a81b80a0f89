"""Checks of an agent's work: static analysis of the changed files (with auto-fix), then
the project's own check commands. Each command runs through the run's ``Confinement`` (in
the agent's sandbox: it runs code the model wrote) with its own timeout, never past the run's
deadline. Files are read only when they are regular files of a sane size: the worktree is
the model's."""

from __future__ import annotations

import ast
import fnmatch
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from daemon import files, procs
from daemon.confine import Confinement
from daemon.runctx import RunContext

# ruff rules that mean the code cannot run: syntax errors, undefined names, bad comparisons.
RUFF_FATAL = "E9,F63,F7,F82"
MAX_SOURCE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Command:
    name: str
    run: tuple[str, ...]
    timeout_s: float
    glob: str = "*"  # for static analysis: which changed files it applies to


@dataclass
class Outcome:
    ok: bool = True
    failures: list[str] = field(default_factory=list)  # one text per failed check, with output
    fixes: int = 0  # files an auto-fixer changed
    passed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Suite:
    """What checks an agent's work: static analysis, then the project's checks."""

    python: bool = True
    analysis: tuple[Command, ...] = ()
    checks: tuple[Command, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.analysis or self.checks)

    def verify(
        self, worktree: Path, changed: Sequence[str], *, confine: Confinement, ctx: RunContext
    ) -> Outcome:
        """Static analysis of the changed files (with auto-fix); the checks when it passes."""
        out = analyse(
            worktree, changed, python=self.python, commands=self.analysis, confine=confine, ctx=ctx
        )
        if out.ok:
            fixes = out.fixes
            out = run_checks(worktree, self.checks, confine=confine, ctx=ctx)
            out.fixes = fixes
        return out


def analyse(
    worktree: Path,
    changed: Sequence[str],
    *,
    python: bool,
    commands: Sequence[Command],
    confine: Confinement,
    ctx: RunContext,
) -> Outcome:
    """Static analysis of the changed files: Python syntax (and ruff --fix when on PATH),
    then each configured command on the files matching its glob (``{files}`` expands)."""
    out = Outcome()
    py = [f for f in changed if f.endswith(".py") and _source(worktree / f) is not None]
    if python and py:
        for rel in py:
            source = _source(worktree / rel) or ""
            try:
                ast.parse(source, filename=rel)
            except SyntaxError as e:
                out.ok = False
                out.failures.append(f"syntax error in {rel} line {e.lineno}: {e.msg}")
        ruff = _ruff()
        if out.ok and ruff:
            before = {rel: _source(worktree / rel) for rel in py}
            fix = [ruff, "check", "--fix", "--exit-zero", "--quiet", "--no-cache", *py]
            _run(worktree, "ruff --fix", fix, 60, confine, ctx)
            out.fixes += sum(_source(worktree / rel) != before[rel] for rel in py)
            fatal = [ruff, "check", "--quiet", "--no-cache", "--select", RUFF_FATAL, *py]
            _record(out, "ruff", _run(worktree, "ruff", fatal, 60, confine, ctx))
    for command in commands:
        files = [f for f in changed if fnmatch.fnmatch(f, command.glob) and (worktree / f).exists()]
        if files:
            argv = [a for arg in command.run for a in (files if arg == "{files}" else [arg])]
            _record(
                out,
                command.name,
                _run(worktree, command.name, argv, command.timeout_s, confine, ctx),
            )
    return out


def run_checks(
    worktree: Path, commands: Sequence[Command], *, confine: Confinement, ctx: RunContext
) -> Outcome:
    """The project's checks (tests, linters) in the worktree; all run, failures collected."""
    out = Outcome()
    for command in commands:
        _record(
            out,
            command.name,
            _run(worktree, command.name, list(command.run), command.timeout_s, confine, ctx),
        )
    return out


def _source(path: Path) -> str | None:
    """A changed file's text when it is a regular file (not a link, FIFO or device) of at
    most ``MAX_SOURCE_BYTES``; else None."""
    try:
        return files.read_regular(path, MAX_SOURCE_BYTES).decode("utf-8", "replace")
    except (files.NotAFile, files.TooLarge, OSError):
        return None


def _ruff() -> str | None:
    """ruff from PATH, or installed beside the Python running ticketd (its virtualenv)."""
    beside = Path(sys.executable).parent / "ruff"
    return shutil.which("ruff") or (str(beside) if beside.is_file() else None)


def _record(out: Outcome, name: str, failure: str | None) -> None:
    if failure is None:
        out.passed.append(name)
    else:
        out.ok = False
        out.failures.append(failure)


def _run(
    worktree: Path,
    name: str,
    argv: list[str],
    timeout_s: float,
    confine: Confinement,
    ctx: RunContext,
) -> str | None:
    """None when the command passes; else what failed with the tail of its output."""
    ctx.check()
    with tempfile.TemporaryDirectory(prefix="ticketd-check-") as tmp:
        output = Path(tmp) / "output"
        try:
            result = confine.run(
                argv, cwd=worktree, timeout_s=ctx.timeout(timeout_s), output=output
            )
        except OSError as e:
            return f"check {name!r} could not start {argv[0]!r}: {e.strerror}"
        tail = procs.tail(output, 3000).strip()
    ctx.check()  # ended by a cancel or the run's deadline: not the check's failure
    if result.timed_out:
        return f"check {name!r} ran past {timeout_s:g}s and was ended\n{tail}"
    if result.returncode != 0:
        return f"check {name!r} failed (exit {result.returncode}):\n{tail}"
    return None
