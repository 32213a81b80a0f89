"""A bubblewrap sandbox for the agent and the check commands: what a run sees and reaches.

This module owns the ``Spec``, finding a working bwrap, the mounts and the bwrap command line
(``Sandbox``); the daemon's side of the sandbox's network is ``daemon/relay.py``'s.

Inside, the system is read-only (``/`` bound read-only), the checkout (``Spec.workdir``) is
read-write and the working directory, ``/tmp`` is a fresh tmpfs, ``/dev`` minimal, ``/run``
empty (no docker or D-Bus sockets), ``/proc`` belongs to the sandbox's own PID namespace (the
daemon's ``/proc/<pid>/environ`` is not there), and there are no capabilities, even for root.
Each hidden path is an empty read-only tmpfs (a hidden file reads empty), so writes there fail
instead of vanishing; credential locations in the home folder and ``/etc/ticketd`` are hidden
always. Paths in ``Spec.read_only`` (and the Python running ticketd) show through hidden ones.

The network is the sandbox's own: loopback only. Each ``Spec.forward`` target is reached inside
at ``Sandbox.address(host, port)``; ``Spec.proxy_hosts`` are reachable through an HTTP proxy
(CONNECT and absolute-form ``http://`` requests, 403 for every other host) named by
``HTTPS_PROXY`` and friends. Both travel over Unix sockets: ``sandbox_init.py``, the sandbox's
first process, listens on loopback inside and relays each connection to a Unix socket in
``runtime_dir``, where the relay threads (``daemon/relay.py``) connect to the real target.

When that first process exits (with the command's exit status), the kernel kills every process
left in the sandbox: nothing started inside outlives a run. Usage::

    with Sandbox(spec, bwrap=bwrap, runtime_dir=state / "run") as box:
        argv, env = box.command(["aider", "--yes"], env)
        procs.run(argv, cwd=spec.workdir, env=env, ...)

``--die-with-parent`` ties the sandbox to the thread that starts it: start it from a thread
that waits for it (as ``procs.run`` does).
"""

from __future__ import annotations

import errno
import functools
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from daemon import procs
from daemon.relay import Relay, Route, split_host_port

HELPER = Path(__file__).with_name("sandbox_init.py")
TMP = "/tmp"  # noqa: S108  (the sandbox's own, fresh each run)
INSIDE = Path("/run/ticketd-sandbox")  # the helper and the relay's sockets, inside
OPTIONS = ("--unshare-all", "--as-pid-1", "--die-with-parent", "--new-session")
CREDENTIALS = (
    ".ssh", ".gnupg", ".aws", ".azure", ".config/gcloud", ".kube", ".docker", ".config/gh",
    ".netrc", ".git-credentials", ".pypirc", ".npmrc", ".config/ticketd",
)  # fmt: skip
HIDDEN_ALWAYS = (Path("/etc/ticketd"),)
PROXY_PORT = 3128
LOW_PORT_SHIFT = 10000  # ports under 1024 cannot be bound inside: 80 is reached at 10080
MAX_FORWARDS = 200
PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Spec:
    """What a run may see and reach. Paths are absolute; symlinks in them are followed, and
    missing ones are left out."""

    workdir: Path  # the checkout: read-write, the working directory
    hide: tuple[Path, ...] = ()  # empty and read-only inside (state dir, logs, backlog, repos)
    read_only: tuple[Path, ...] = ()  # shown read-only, even under a hidden path
    forward: tuple[tuple[str, int], ...] = ()  # TCP targets reachable inside (Ollama)
    proxy_hosts: tuple[str, ...] = ()  # "host:port" pairs the HTTP proxy lets through

    def __post_init__(self) -> None:
        for path in (self.workdir, *self.hide, *self.read_only):
            if not path.is_absolute():
                raise ValueError(f"sandbox paths must be absolute: {path}")
        if any(path == Path("/") for path in self.hide):
            raise ValueError("the sandbox cannot hide /")
        if len(self.forward) > MAX_FORWARDS:
            raise ValueError(f"at most {MAX_FORWARDS} forwarded targets")
        for host, port in self.forward:
            if not host or not 0 < port < 65536:
                raise ValueError(f"bad forward target {host}:{port}")
        for entry in self.proxy_hosts:
            split_host_port(entry)


def find_bwrap() -> str | None:
    """A bwrap that can create a sandbox here, else None (``unavailable_reason()`` says why):
    not installed, no user namespaces (some containers), or no new ``/proc`` allowed (a
    systemd unit with ``ProtectKernelTunables=`` or ``ProtectKernelLogs=``). Probed once per
    process with a trivial sandbox."""
    return _probe()[0]


def unavailable_reason() -> str:
    """One line on why ``find_bwrap()`` is None; empty when it is not."""
    return _probe()[1]


@functools.cache
def _probe() -> tuple[str | None, str]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None, "bwrap is not installed (Debian package: bubblewrap)"
    argv = [bwrap, *OPTIONS, *_caps(), "--ro-bind", "/", "/", "--dev", "/dev"]
    argv += ["--proc", "/proc", "--tmpfs", TMP, "--", "true"]
    try:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=PROBE_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return None, f"{bwrap} did not finish a trial sandbox within {PROBE_TIMEOUT_S:g}s"
    except OSError as e:
        return None, f"{bwrap} cannot be run: {e.strerror}"
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines() or ["(no message)"]
        return None, f"{bwrap} cannot create a sandbox here: {lines[-1]}"
    return bwrap, ""


def _caps() -> list[str]:
    return ["--cap-drop", "ALL"] if os.geteuid() == 0 else []


class Sandbox:
    """One sandboxed run; a context manager (the relay threads live inside ``with``)."""

    def __init__(self, spec: Spec, *, bwrap: str, runtime_dir: Path) -> None:
        self._spec = spec
        self._bwrap = bwrap
        self._runtime_dir = runtime_dir
        self._routes = [
            Route((f"127.0.0.{2 + i}", _inner_port(port)), (host, port))
            for i, (host, port) in enumerate(spec.forward)
        ]
        if spec.proxy_hosts:
            self._routes.append(Route((f"127.0.0.{2 + len(spec.forward)}", PROXY_PORT), None))
        self._dir: Path | None = None
        self._relay: Relay | None = None

    def __enter__(self) -> Self:
        self._runtime_dir.mkdir(parents=True, exist_ok=True)
        self._dir = Path(tempfile.mkdtemp(prefix="sandbox-", dir=self._runtime_dir))
        try:
            (self._dir / "empty").touch(mode=0o444)  # bound over hidden files
            if self._routes:
                allowed = frozenset(split_host_port(entry) for entry in self._spec.proxy_hosts)
                self._relay = Relay(self._dir / "net", self._routes, allowed)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._relay is not None:
            self._relay.stop()
            self._relay = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def address(self, host: str, port: int) -> tuple[str, int]:
        """Where the forwarded target ``host:port`` is reached inside."""
        for route in self._routes:
            if route.target == (host, port):
                return route.inside
        raise KeyError(f"{host}:{port} is not forwarded into the sandbox")

    @property
    def refused(self) -> tuple[str, ...]:
        """``host:port`` targets the proxy refused so far (to explain a failed run)."""
        return self._relay.refused() if self._relay is not None else ()

    def command(
        self, argv: Sequence[str], env: Mapping[str, str]
    ) -> tuple[list[str], dict[str, str]]:
        """The bwrap argument list that runs ``argv`` inside, and the environment to start it
        with (``env`` plus the proxy variables). Raises ``FileNotFoundError`` when ``argv[0]``
        is not a program (on ``env``'s PATH, or relative to the workdir), or the workdir is
        missing."""
        if self._dir is None:
            raise RuntimeError("enter the sandbox first: `with Sandbox(...) as box`")
        if not argv:
            raise ValueError("no command to run")
        workdir = self._spec.workdir.resolve()
        if not workdir.is_dir():
            raise FileNotFoundError(errno.ENOENT, "no such folder", str(workdir))
        _check_program(argv[0], workdir, env.get("PATH"))
        hide = [*HIDDEN_ALWAYS, *_credentials(env.get("HOME")), *self._spec.hide]
        python = (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix)
        python_paths = [*map(Path, python), Path(sys.executable).resolve()]
        helper_binds = [(HELPER, INSIDE / "init.py")]
        listen: list[str] = []
        if self._relay is not None:
            helper_binds.append((self._relay.directory, INSIDE / "net"))
            for i, route in enumerate(self._routes):
                host, port = route.inside
                listen += ["--listen", f"{host}:{port}={INSIDE / 'net' / str(i)}"]
        mounts = _mount_args(
            workdir, hide, [*self._spec.read_only, *python_paths], helper_binds, self._dir / "empty"
        )
        inner = [sys.executable, "-I", "-S", str(INSIDE / "init.py"), *listen, "--", *argv]
        bwrap = [self._bwrap, *OPTIONS, *_caps(), *mounts, "--chdir", str(workdir), "--"]
        return [*bwrap, *inner], {**env, **self._proxy_env()}

    def _proxy_env(self) -> dict[str, str]:
        proxy = next((r for r in self._routes if r.target is None), None)
        if proxy is None:
            return {}
        url = f"http://{proxy.inside[0]}:{proxy.inside[1]}"
        local = ["localhost", "127.0.0.1", "::1", *(r.inside[0] for r in self._routes)]
        no_proxy = ",".join([*local, "127.0.0.0/8"])
        names = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
        return {**dict.fromkeys(names, url), "NO_PROXY": no_proxy, "no_proxy": no_proxy}


def _inner_port(port: int) -> int:
    return port if port >= 1024 else port + LOW_PORT_SHIFT


def _credentials(home: str | None) -> list[Path]:
    """Credential locations in the user's home folders (the account's and ``$HOME``)."""
    homes = dict.fromkeys([Path(pwd.getpwuid(os.getuid()).pw_dir), *([Path(home)] if home else [])])
    return [h / name for h in homes if h.is_absolute() for name in CREDENTIALS]


def _check_program(name: str, workdir: Path, path: str | None) -> None:
    if procs.find_program(name, path, workdir) is None:
        raise FileNotFoundError(errno.ENOENT, "no such program", name)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _existing(paths: Iterable[Path]) -> list[Path]:
    """Resolved, deduplicated, in order; the ones that do not exist left out."""
    found: dict[Path, None] = {}
    for path in paths:
        real = path.resolve()
        if real.exists() and real != Path("/"):
            found[real] = None
    return list(found)


def _mount_args(
    workdir: Path,
    hide: Iterable[Path],
    read_only: Iterable[Path],
    helper_binds: Iterable[tuple[Path, Path]],
    empty_file: Path,
) -> list[str]:
    """bwrap's mount options. Parents are mounted before what lies inside them (bwrap makes
    the mount points inside a hidden tmpfs); at one path, read-only binds go over hiding and
    the read-write workdir over both; hidden tmpfs are made read-only last."""
    hidden = [Path("/run"), *_existing(hide)]
    shown = [*_existing(read_only), workdir]

    def gone(path: Path, bound: Path | None = None) -> bool:
        """Is ``path`` hidden: in a hidden path, with no bind (but ``bound``) in between?"""
        return any(
            _inside(path, h)
            and not any(b != bound and _inside(b, h) and _inside(path, b) for b in shown)
            for h in hidden
        )

    ops: list[tuple[int, int, list[str]]] = []  # (depth, rank at the same path, options)
    remount: list[str] = []
    for path in hidden:
        if gone(path.parent):
            continue  # already empty
        if path.is_dir():
            ops.append((len(path.parts), 0, ["--tmpfs", str(path)]))
            remount += ["--remount-ro", str(path)]
        else:
            ops.append((len(path.parts), 0, ["--ro-bind", str(empty_file), str(path)]))
    for path in shown[:-1]:
        if gone(path, path) or _inside(path, Path(TMP)) or _inside(path, workdir):
            ops.append((len(path.parts), 1, ["--ro-bind", str(path), str(path)]))
    ops.append((len(workdir.parts), 2, ["--bind", str(workdir), str(workdir)]))
    for source, dest in helper_binds:
        ops.append((len(dest.parts), 1, ["--ro-bind", str(source), str(dest)]))
    ops.sort(key=lambda op: op[:2])
    base = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", TMP]
    return [*base, *(arg for _, _, args in ops for arg in args), *remount]
