"""Where an agent and its checks run: one function starts every such child.

A ``Plan`` (built from the config by ``wiring``) says how every run is confined: the
sandbox to use (bubblewrap, see ``daemon/sandbox.py``; None runs unsandboxed), what it hides,
what it shows read-only, which hosts it reaches. ``Plan.confinement`` makes one run's
``Confinement``, whose ``run`` puts a command in that sandbox, in its own process tree, with
the run's environment (never the daemon's tokens), its time limit, the run's cancel and, for
the agent, its memory limit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

from loguru import logger

from daemon import procs
from daemon.sandbox import Sandbox, Spec


@dataclass(frozen=True)
class Plan:
    """How every run of one configuration is confined."""

    bwrap: str | None  # None: no sandbox
    hide: tuple[Path, ...]  # ticketd's own folders and the user's repository
    read_only: tuple[Path, ...]  # shown to every run (the base objects)
    forward: tuple[tuple[str, int], ...]  # the Ollama host
    allow_hosts: tuple[str, ...]
    env: Mapping[str, str]
    grace_s: float
    max_memory_mb: float
    runtime: Path  # the sandboxes' sockets, one folder a run

    def confinement(
        self,
        workdir: Path,
        readable: Sequence[Path],
        env: Mapping[str, str],
        cancel: threading.Event,
    ) -> Confinement:
        """One run's confinement: ``workdir`` writable, ``readable`` files shown read-only,
        ``env`` added to the plan's environment."""
        sandbox = None
        if self.bwrap is not None:
            spec = Spec(
                workdir=workdir,
                hide=self.hide,
                read_only=(*self.read_only, *readable),
                forward=self.forward,
                proxy_hosts=self.allow_hosts,
            )
            sandbox = Sandbox(spec, bwrap=self.bwrap, runtime_dir=self.runtime / workdir.name)
        return Confinement(
            env={**self.env, **env},
            grace_s=self.grace_s,
            max_memory_mb=self.max_memory_mb,
            cancel=cancel,
            sandbox=sandbox,
        )


def host_port(url: str) -> tuple[str, int]:
    """``(host, port)`` of an ``http(s)://host:port`` URL (or a bare ``host:port``)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    return parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)


class Confinement:
    def __init__(
        self,
        *,
        env: Mapping[str, str],
        grace_s: float,
        max_memory_mb: float,
        cancel: threading.Event,
        sandbox: Sandbox | None = None,
    ) -> None:
        self.base_env = dict(env)
        self.grace_s = grace_s
        self.max_memory_mb = max_memory_mb
        self.cancel = cancel
        self.sandbox = sandbox
        self.env = self.base_env

    def __enter__(self) -> Confinement:
        if self.sandbox is not None:
            self.sandbox.__enter__()
            self.env = {k: self._inside(v) for k, v in self.base_env.items()}
            self.env.update(TMPDIR="/tmp", XDG_CACHE_HOME="/tmp/.cache")  # noqa: S108 - its own
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.sandbox is not None:
            if refused := self.sandbox.refused:  # say why the agent could not reach a host
                logger.warning(
                    "the sandbox refused {} (not in agent.allow_hosts)", ", ".join(refused)
                )
            self.sandbox.__exit__(kind, error, tb)

    def _inside(self, value: str) -> str:
        """A forwarded host's URL as the sandbox reaches it (``OLLAMA_HOST``)."""
        assert self.sandbox is not None
        try:
            url = urlsplit(value if "://" in value else f"http://{value}")
            port = url.port or (443 if url.scheme == "https" else 80)
        except ValueError:
            return value
        try:
            host, inner = self.sandbox.address(url.hostname or "", port)
        except KeyError:  # not a forwarded host
            return value
        return urlunsplit((url.scheme or "http", f"{host}:{inner}", url.path, "", ""))

    def run(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        timeout_s: float,
        output: Path,
        on_start: Callable[[int], None] | None = None,
        filter: Callable[[str], str] | None = None,
        limit_memory: bool = False,
        env: Mapping[str, str] | None = None,
        max_output: int = 0,
    ) -> procs.Result:
        """Run ``argv`` confined (``env`` added to the run's environment); see ``procs.run``."""
        extra = dict(env or {})
        if self.sandbox is not None:
            extra = {k: self._inside(v) for k, v in extra.items()}
        command, full = list(argv), {**self.env, **extra}
        if self.sandbox is not None:
            command, full = self.sandbox.command(argv, full)
        return procs.run(
            command,
            cwd=cwd,
            timeout_s=timeout_s,
            output=output,
            env=full,
            grace_s=self.grace_s,
            cancel=self.cancel,
            on_start=on_start,
            max_memory_mb=self.max_memory_mb if limit_memory else 0,
            filter=filter,
            max_output=max_output,
        )
