"""``ticketd doctor``: is this installation ready to run tickets, and if not, what to do.

``run`` yields one ``Check`` per line, in this order: the config, the agent program (on the
PATH the installed systemd unit gives the daemon), the sandbox, the repository, the remote and
its base branch, a dry-run push, Ollama (each host of a pool) and each model (present,
context long enough), the GitHub token (accepted, allowed to push), the writable folders,
the installed unit (still what ``install-service`` would write). A check that needs an
earlier one that failed is a FAIL whose detail starts with "skipped:". Every FAIL carries a
fix: a command to run or a config key to change. Nothing here prints, and no text carries a
secret: details pass through the same ``Redactor`` as the logs.

Git runs through ticketd's own runner (hooks off, no prompt), in ticketd's own repositories
under ``state_dir/git``; in the user's repository only to read the remote's URLs.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import httpx
from github import GithubException

from daemon import config as configuration
from daemon import preflight, procs, sandbox, service
from daemon.errors import ConfigError, TicketdError
from daemon.forge import Forge
from daemon.gitcmd import Remote, repo_from_remote, resolve_remote
from daemon.llm.client import check_health
from daemon.redact import Redactor
from daemon.repo import Repo

Status = Literal["ok", "warn", "FAIL"]
SKIPPED = "skipped:"
PUSH_CHECK_BRANCH = "doctor-check"  # after repo.branch_prefix; a dry run never creates it
GITHUB_TIMEOUT_S = 15
# The PATH systemd gives a service whose unit sets none.
SYSTEMD_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Check:
    """One line of the report. ``fix`` says what to do (always set on a FAIL)."""

    name: str
    status: Status
    detail: str
    fix: str | None = None

    @property
    def skipped(self) -> bool:
        """A FAIL because a check it needs failed: it found out nothing itself."""
        return self.status == "FAIL" and self.detail.startswith(SKIPPED)


def run(
    cfg: configuration.Config,
    *,
    home: Path,
    shell_path: str | None,
    executable: Path | None,
    starting: Callable[[str], None] = lambda name: None,
) -> Iterator[Check]:
    """Every check, in order, each as soon as it is done. ``home`` is where the user unit
    lives, ``shell_path`` the PATH of the shell running this, ``executable`` the ticketd
    that ``install-service`` would put in the unit; ``starting(name)`` is called before each
    check that may take a while."""
    redact = Redactor(cfg.secret_values())
    units = service.installed(home)
    for check in _checks(cfg, units, shell_path or os.defpath, executable, starting):
        yield replace(check, detail=redact(check.detail), fix=check.fix and redact(check.fix))


def _checks(
    cfg: configuration.Config,
    units: list[service.Installed],
    shell_path: str,
    executable: Path | None,
    starting: Callable[[str], None],
) -> Iterator[Check]:
    yield Check("config", "ok", f"loaded {cfg.path}")
    yield agent(cfg, units, shell_path)
    starting("sandbox")
    yield sandbox_check(cfg)
    starting("repo")
    check, remote = repo(cfg)
    yield check
    sha = None
    if remote is None:
        yield _skipped("remote", "repo")
    else:
        starting("remote")
        check, sha = remote_check(cfg, remote)
        yield check
    if remote is None or sha is None:
        yield _skipped("push", "repo" if remote is None else "remote")
    else:
        starting("push")
        yield push(cfg, remote, sha)
    starting("ollama")
    yield from ollama(cfg)
    if cfg.github.enabled:
        starting("github")
        yield github_check(cfg, remote)
    yield folders(cfg)
    yield layout(cfg)
    yield from unit_checks(cfg, units, shell_path, executable)


def _skipped(name: str, needs: str) -> Check:
    return Check(name, "FAIL", f"{SKIPPED} needs the {needs} check to pass", f"fix {needs} first")


# -- the agent and its sandbox ------------------------------------------------------------------


def agent(cfg: configuration.Config, units: list[service.Installed], shell_path: str) -> Check:
    """The command agent's program is on the PATH the daemon's agents get: ``agent.env``'s
    PATH, else the installed unit's, else this shell's."""
    if cfg.agent.kind == "builtin":
        return Check("agent", "ok", "builtin agent")
    program = preflight.agent_program(cfg)
    if program is None:
        first = cfg.agent.command[0]
        return Check("agent", "ok", f"agent.command's program is {first!r}: not checked")
    path, source = _agent_path(cfg, units, shell_path)
    found = procs.find_program(program, path, cfg.repo.path)
    if found is not None:
        if "/" in program:
            return Check("agent", "ok", f"{found} is executable")
        return Check("agent", "ok", f"{found}, found on {source}")
    fix = preflight.INSTALL_AGENT
    if units and "PATH" not in cfg.agent.env:
        fix = (
            "install it where that PATH finds it, or run `ticketd install-service` again from "
            "a shell whose PATH finds it (it writes that PATH into the unit), or set "
            "agent.env.PATH"
        )
    if "/" in program:
        where = cfg.repo.path / program
        return Check("agent", "FAIL", f"{where} is not an executable file", fix)
    return Check("agent", "FAIL", f"{program!r} is not on {source}: {path}", fix)


def _agent_path(
    cfg: configuration.Config, units: list[service.Installed], shell_path: str
) -> tuple[str, str]:
    """The agents' PATH and where it comes from."""
    if "PATH" in cfg.agent.env:
        return cfg.agent.env["PATH"], "agent.env.PATH"
    for unit in units:
        if unit.text is not None:
            path = service.unit_environment(unit.text).get("PATH")
            if path is not None:
                return path, f"the PATH of {unit.path}"
            return SYSTEMD_DEFAULT_PATH, f"systemd's default PATH, as {unit.path} sets none"
    return shell_path, "this shell's PATH, as no unit is installed"


def sandbox_check(cfg: configuration.Config) -> Check:
    if cfg.agent.sandbox == "off":
        detail = "agent.sandbox is off: agents see all the daemon can see"
        return Check("sandbox", "warn", detail, "set agent.sandbox: auto")
    bwrap = sandbox.find_bwrap()
    if bwrap is not None:
        return Check("sandbox", "ok", f"bubblewrap works: {bwrap}")
    why = sandbox.unavailable_reason()
    fix = (
        "apt install bubblewrap"
        if "not installed" in why
        else "let bwrap create user namespaces here, or set agent.sandbox: off"
    )
    if cfg.agent.sandbox == "required":
        return Check("sandbox", "FAIL", f"agent.sandbox is required but {why}", fix)
    return Check("sandbox", "warn", f"agents would run unsandboxed: {why}", fix)


# -- git ----------------------------------------------------------------------------------------


def repo(cfg: configuration.Config) -> tuple[Check, Remote | None]:
    """The user's repository and the URLs of ``repo.remote`` there."""
    try:
        remote = resolve_remote(preflight.git(cfg), cfg.repo.path, cfg.repo.remote)
    except TicketdError as e:
        fix = "set repo.path to a git repository, and repo.remote to one of its remotes or a URL"
        return Check("repo", "FAIL", e.message, fix), None
    urls = remote.fetch_url
    if remote.push_url != remote.fetch_url:
        urls += f" (push: {remote.push_url})"
    return Check("repo", "ok", f"{cfg.repo.path}, remote {cfg.repo.remote}: {urls}"), remote


def remote_check(cfg: configuration.Config, remote: Remote) -> tuple[Check, str | None]:
    """The remote answers, and has ``repo.base_branch``; returns its commit."""
    base = cfg.repo.base_branch
    git_repo = Repo(cfg.state_dir / "git", remote, preflight.git(cfg))
    try:
        heads = git_repo.remote_heads(base)
    except TicketdError as e:
        fix = (
            f"check that `git ls-remote {remote.fetch_url}` works for this user (network, "
            "ssh key or credential helper), or change repo.remote"
        )
        return Check("remote", "FAIL", f"cannot reach {remote.fetch_url}: {e.message}", fix), None
    if base not in heads:
        try:
            others = sorted(git_repo.remote_heads())[:5]
        except TicketdError:
            others = []
        has = f" (it has: {', '.join(others)})" if others else " (it has no branches)"
        fix = f"set repo.base_branch to a branch of the remote{has}, or push {base} there"
        return Check("remote", "FAIL", f"{remote.fetch_url} has no branch {base!r}", fix), None
    sha = heads[base]
    return Check("remote", "ok", f"{remote.fetch_url} has {base} at {sha[:12]}"), sha


def push(cfg: configuration.Config, remote: Remote, sha: str) -> Check:
    """A dry-run push of the base commit to ``<branch_prefix>doctor-check``, from ticketd's
    own repository, as the daemon pushes (nothing is sent)."""
    branch = f"{cfg.repo.branch_prefix}{PUSH_CHECK_BRANCH}"
    git = preflight.git(cfg)
    git_repo = Repo(cfg.state_dir / "git", remote, git)
    try:
        git_repo.ensure()
    except OSError as e:
        detail = f"{SKIPPED} cannot use ticketd's repository {git_repo.root}: {e.strerror or e}"
        return Check("push", "FAIL", detail, "fix folders first")
    try:
        git_repo.fetch_base(cfg.repo.base_branch, sha)
        git(
            "push",
            "--dry-run",
            "--quiet",
            "--no-verify",
            remote.push_url,
            f"{sha}:refs/heads/{branch}",
            git_dir=git_repo.work_dir,
            code="PUSH_FAILED",
        )
    except TicketdError as e:
        fix = (
            f"give this user write access to {remote.push_url} (ssh key, credential helper "
            "or token with push rights), or change the push URL: "
            f"`git -C {cfg.repo.path} remote set-url --push {cfg.repo.remote} URL`"
        )
        return Check("push", "FAIL", f"{remote.push_url} refuses a push: {e.message}", fix)
    return Check("push", "ok", f"{remote.push_url} accepts a push to {branch} (dry run)")


# -- Ollama -------------------------------------------------------------------------------------


def ollama(cfg: configuration.Config) -> Iterator[Check]:
    """Each Ollama host answers, then each model: pulled (on some host of a pool), and its
    context at least ``num_ctx``. In a pool, a host down while another answers is a
    warning: tickets go to the others."""
    if not cfg.needs_ollama:
        yield Check("ollama", "ok", "not used by this configuration")
        return
    hosts, wanted = cfg.ollama.pool, cfg.wanted_models
    with ThreadPoolExecutor(len(hosts)) as asking:
        healths = list(
            asking.map(
                lambda h: check_health(h.url, wanted, cfg.ollama.health_check.timeout_s), hosts
            )
        )
    single = len(hosts) == 1
    up = [(h.url, health) for h, health in zip(hosts, healths, strict=True) if health.ok]
    for h, health in zip(hosts, healths, strict=True):
        where = h.url
        name = "ollama" if single else f"ollama {where}"
        if not health.ok:
            fix = f"start Ollama (`ollama serve` or `systemctl start ollama`) at {where}"
            said = f"no answer from {where}: {health.error}"
            yield Check(name, "warn", said, fix) if up else Check(name, "FAIL", said, fix)
            continue
        has = "" if single else "; has " + (", ".join(filter(health.has, wanted)) or "no model")
        yield Check(name, "ok", f"Ollama {health.version} at {where}{has}")
    for name in wanted:
        on = [url for url, health in up if health.has(name)]
        if not up:
            yield _skipped(f"model {name}", "ollama")
        elif not on:
            anywhere = "" if single else " on any host"
            yield Check(f"model {name}", "FAIL", f"not pulled{anywhere}", f"ollama pull {name}")
        else:
            yield model(cfg, name, on)


def model(cfg: configuration.Config, name: str, hosts: list[str]) -> Check:
    """The model's context length (``POST /api/show`` on the first of ``hosts`` that have
    it) against ``ollama.num_ctx``."""
    check = f"model {name}"
    num_ctx = cfg.ollama.num_ctx
    on = "" if len(cfg.ollama.pool) == 1 else f" on {', '.join(hosts)}"
    try:
        with httpx.Client(base_url=hosts[0], timeout=cfg.ollama.timeout_s) as http:
            info = http.post("/api/show", json={"model": name}).raise_for_status().json()
        details = info.get("model_info") or {}
        length = details.get(f"{details.get('general.architecture')}.context_length")
    except (httpx.HTTPError, ValueError, AttributeError) as e:
        return Check(check, "warn", f"pulled{on}; context length unknown (/api/show: {e})")
    if not isinstance(length, int):
        return Check(check, "warn", f"pulled{on}; /api/show gives no context length")
    if length < num_ctx:
        fix = f"set ollama.num_ctx to at most {length} or use a model with a longer context"
        return Check(check, "FAIL", f"context length {length} < ollama.num_ctx {num_ctx}", fix)
    return Check(check, "ok", f"pulled{on}, context length {length} >= ollama.num_ctx {num_ctx}")


# -- GitHub -------------------------------------------------------------------------------------


def github_check(cfg: configuration.Config, remote: Remote | None) -> Check:
    """The token is set and accepted, and may push to the repository: a classic token with
    the ``repo`` scope (``public_repo`` for a public one), or a fine-grained one whose
    repository permissions include push."""
    var = cfg.github.token_env
    token = cfg.github_token()
    if token is None:
        fix = (
            f"export {var}=<token> before starting ticketd (under systemd: a {var}=... line "
            "in /etc/ticketd/env or ~/.config/ticketd/env), or set github.token_env"
        )
        return Check("github", "FAIL", f"${var} is not set", fix)
    name = cfg.github.repo or (repo_from_remote(remote.push_url) if remote else None)
    if name is None:
        detail = "github.repo is not set and the remote's URL names no owner/name"
        return Check("github", "FAIL", detail, "set github.repo to owner/name")
    forge = Forge(name, token, base_url=cfg.github.base_url, retries=0, timeout_s=GITHUB_TIMEOUT_S)
    try:
        access = forge.access()
    except GithubException as e:
        return _github_refused(cfg, name, e)
    except OSError as e:  # requests' errors: refused, reset, timed out
        detail = f"cannot reach {cfg.github.base_url or 'GitHub'}: {e}"
        return Check("github", "FAIL", detail, "check the network or github.base_url")
    finally:
        forge.close()
    login, scopes, private, can_push = access.login, access.scopes, access.private, access.can_push
    fix = f"use a token that may push to {name} in ${var}"
    if scopes is not None:  # a classic token says its scopes
        listed = ", ".join(s for s in scopes if s) or "none"
        if "repo" in scopes or ("public_repo" in scopes and not private):
            return Check("github", "ok", f"{login} on {name}; token scopes: {listed}")
        needed = "repo" if private else "public_repo"
        detail = f"the token in ${var} lacks the {needed} scope (it has: {listed})"
        return Check("github", "FAIL", detail, f"{fix}: a classic token with the {needed} scope")
    if can_push:
        return Check("github", "ok", f"{login} on {name}; fine-grained token that may push")
    fix += ": a fine-grained token with Contents and Pull requests read-write"
    return Check("github", "FAIL", f"the token in ${var} may not push to {name}", fix)


def _github_refused(cfg: configuration.Config, name: str, e: GithubException) -> Check:
    var = cfg.github.token_env
    if e.status == 401:
        detail, fix = "was rejected (401)", f"put a valid token in ${var} (expired? revoked?)"
    elif e.status == 404:
        detail, fix = f"cannot see {name}", "set github.repo, and give the token access to it"
    else:
        message = e.data.get("message") if isinstance(e.data, dict) else e.message
        detail, fix = f"got {e.status} {message or ''}".strip(), "check github.base_url"
    return Check("github", "FAIL", f"the token in ${var} {detail}", fix)


# -- folders and the unit ---------------------------------------------------------------------


def folders(cfg: configuration.Config) -> Check:
    """state_dir, logging.dir and backlog.dir exist (made when missing, as the daemon would)
    and a file can be written in each."""
    wanted = {
        "state_dir": cfg.state_dir,
        "logging.dir": cfg.logging.dir,
        "backlog.dir": cfg.backlog.dir,
    }
    for key, folder in wanted.items():
        fix = f"make {folder} a folder this user can write, or change {key}"
        if os.path.lexists(folder) and not folder.is_dir():
            return Check("folders", "FAIL", f"{key} {folder} is not a folder", fix)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder, prefix=".ticketd-doctor-"):
                pass
        except OSError as e:
            return Check("folders", "FAIL", f"{key} {folder}: {e.strerror or e}", fix)
    return Check("folders", "ok", ", ".join(str(f) for f in wanted.values()) + " are writable")


def layout(cfg: configuration.Config) -> Check:
    """The backlog's layout; in a Backlog.md project, the statuses ticketd writes and who
    hands tasks over."""
    from daemon.board import Board, open_backlog

    try:
        backlog = open_backlog(cfg)
    except ConfigError as e:
        fix = "fix the file it names, or set backlog.layout: folders"
        return Check("backlog", "FAIL", e.message, fix)
    if not isinstance(backlog, Board):
        return Check("backlog", "ok", f"folders under {backlog.root}")
    s = backlog.statuses
    flow = " -> ".join(dict.fromkeys(s[f] for f in ("todo", "in-progress", "review", "done")))
    who = backlog.assignee + (f" or label {backlog.label}" if backlog.label else "")
    return Check("backlog", "ok", f"Backlog.md project {backlog.root}: tasks for {who}; {flow}")


def unit_checks(
    cfg: configuration.Config,
    units: list[service.Installed],
    shell_path: str,
    executable: Path | None,
) -> Iterator[Check]:
    """Each installed unit is what ``install-service`` would write now. Its ``User=`` and
    ``PATH`` are taken as installed (``--run-as``, the installing shell's PATH): the agent
    check tests that PATH."""
    if not units:
        detail = "not installed (fine for a foreground run; `ticketd install-service` to install)"
        yield Check("unit", "warn", detail)
        return
    for unit in units:
        yield _unit(cfg, unit, shell_path, executable)


def _unit(
    cfg: configuration.Config, unit: service.Installed, shell_path: str, executable: Path | None
) -> Check:
    scope = " --user" if unit.user_unit else ""
    if executable is None:
        detail = f"{unit.path} is installed, but no ticketd is on PATH to compare it with"
        return Check("unit", "FAIL", detail, "put ticketd on PATH (pip install .)")
    if unit.text is None:
        return Check("unit", "FAIL", f"cannot read {unit.path}", _reinstall(cfg, unit, executable))
    path = service.unit_environment(unit.text).get("PATH") or shell_path
    users = service.unit_settings(unit.text, "User")
    user = users[-1] if users else None
    try:
        wanted = service.unit_for(
            cfg,
            user_unit=unit.user_unit,
            executable=executable,
            user=user or service.default_user(cfg.path),
            path=path,
        )
    except ValueError as e:
        return Check("unit", "FAIL", f"cannot render the unit: {e}", "fix the paths in the config")
    if wanted == unit.text:
        return Check("unit", "ok", f"{unit.path} is up to date (systemctl{scope})")
    changed = service.changed_lines(unit.text, wanted)
    first = f"; first: {changed[0]!r}" if changed else ""
    detail = (
        f"{unit.path} differs from what install-service writes now ({len(changed)} lines{first})"
    )
    return Check("unit", "FAIL", detail, _reinstall(cfg, unit, executable, user))


def _reinstall(
    cfg: configuration.Config, unit: service.Installed, executable: Path, user: str | None = None
) -> str:
    if unit.user_unit:
        return (
            f"run `ticketd install-service --user --config {cfg.path}` again, then "
            "`systemctl --user daemon-reload && systemctl --user restart ticketd`"
        )
    return (
        f'run `sudo env "PATH=$PATH" {executable} install-service --config {cfg.path}'
        f"{f' --run-as {user}' if user else ''}` again, then "
        "`sudo systemctl daemon-reload && sudo systemctl restart ticketd`"
    )
