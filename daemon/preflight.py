"""What a start needs, checked before anything runs.

``preflight`` refuses a configuration the runs could not use (``ConfigError``, exit status
2): the user's repository and its remote, the base branch there, a token for pull requests,
bubblewrap when ``agent.sandbox: required``. ``holds`` finds what would make every ticket
fail and can change without a new config (the agent program not installed, the remote out of
reach): the daemon holds its queue while any is true, and looks again every reconcile
interval. ``ticketd doctor`` runs the same checks and more.
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon import config as configuration
from daemon import procs, sandbox
from daemon.errors import ConfigError, TicketdError
from daemon.gitcmd import Git, Remote, repo_from_remote, resolve_remote
from daemon.repo import Repo


@dataclass(frozen=True)
class Checked:
    """What ``preflight`` found out."""

    remote: Remote
    repo_name: str | None  # GitHub owner/name, with github.enabled
    bwrap: str | None  # the sandbox to use; None: agents run unsandboxed
    warnings: tuple[str, ...] = ()
    holds: tuple[str, ...] = ()  # why no ticket can run now (the queue waits)


def git(cfg: configuration.Config) -> Git:
    return Git(cfg.git_env(), timeout_s=cfg.repo.git_timeout_s)


def preflight(cfg: configuration.Config) -> Checked:
    """Refuse to start on a configuration the runs could not use (``ConfigError``)."""
    try:
        remote = resolve_remote(git(cfg), cfg.repo.path, cfg.repo.remote)
    except TicketdError as e:
        raise ConfigError(f"{cfg.path}: repo: {e.message}") from None
    warnings = []
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
    found = holds(cfg, remote, missing_base_is_error=True)
    return Checked(remote, _github(cfg, remote), bwrap, tuple(warnings), found)


def holds(
    cfg: configuration.Config, remote: Remote, *, missing_base_is_error: bool = False
) -> tuple[str, ...]:
    """Why every ticket would fail now: each reason a line that says what to do."""
    found = []
    if (problem := agent_problem(cfg)) is not None:
        found.append(problem)
    try:
        heads = Repo(cfg.state_dir / "git", remote, git(cfg)).remote_heads(cfg.repo.base_branch)
    except TicketdError as e:
        found.append(f"cannot reach the remote {remote.fetch_url}: {_first_line(e.message)}")
    else:
        if cfg.repo.base_branch not in heads:
            missing = (
                f"the remote {remote.fetch_url} has no branch {cfg.repo.base_branch!r} "
                "(repo.base_branch)"
            )
            if missing_base_is_error:
                raise ConfigError(f"{cfg.path}: repo.base_branch: {missing}")
            found.append(missing)
    return tuple(found)


INSTALL_AGENT = "install it (aider: pipx install aider-chat) or change agent.command"


def agent_program(cfg: configuration.Config) -> str | None:
    """The command agent's program (``agent.command``'s first item), None for the builtin
    agent or a program named by a placeholder."""
    if cfg.agent.kind != "command" or "{" in cfg.agent.command[0]:
        return None
    return cfg.agent.command[0]


def agent_problem(cfg: configuration.Config) -> str | None:
    """Why the agent cannot start (its program is not on the agents' PATH), or None."""
    program = agent_program(cfg)
    if program is None:
        return None
    if procs.find_program(program, cfg.agent_env().get("PATH"), cfg.repo.path) is not None:
        return None
    return (
        f"the agent program {program!r} is not on the agents' PATH: {INSTALL_AGENT} "
        "(`ticketd doctor` shows the PATH)"
    )


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text)[:300]


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
