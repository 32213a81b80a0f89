"""A bubblewrap sandbox for the agent and the check commands.

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
``runtime_dir``, where this module's relay threads connect to the real target.

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
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

from daemon.sandbox_init import pump

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
CONNECT_TIMEOUT_S = 10.0
HEAD_TIMEOUT_S = 30.0
MAX_HEAD_BYTES = 65536


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
            _split_host_port(entry)


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


@dataclass(frozen=True)
class _Route:
    inside: tuple[str, int]  # where the helper listens
    target: tuple[str, int] | None  # None: the HTTP proxy


class Sandbox:
    """One sandboxed run; a context manager (the relay threads live inside ``with``)."""

    def __init__(self, spec: Spec, *, bwrap: str, runtime_dir: Path) -> None:
        self._spec = spec
        self._bwrap = bwrap
        self._runtime_dir = runtime_dir
        self._routes = [
            _Route((f"127.0.0.{2 + i}", _inner_port(port)), (host, port))
            for i, (host, port) in enumerate(spec.forward)
        ]
        if spec.proxy_hosts:
            self._routes.append(_Route((f"127.0.0.{2 + len(spec.forward)}", PROXY_PORT), None))
        self._dir: Path | None = None
        self._relay: _Relay | None = None

    def __enter__(self) -> Self:
        self._runtime_dir.mkdir(parents=True, exist_ok=True)
        self._dir = Path(tempfile.mkdtemp(prefix="sandbox-", dir=self._runtime_dir))
        try:
            (self._dir / "empty").touch(mode=0o444)  # bound over hidden files
            if self._routes:
                allowed = frozenset(_split_host_port(entry) for entry in self._spec.proxy_hosts)
                self._relay = _Relay(self._dir / "net", self._routes, allowed)
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
    if "/" in name:
        candidate = workdir / name  # an absolute name replaces workdir
        found = candidate.is_file() and os.access(candidate, os.X_OK)
    else:
        found = shutil.which(name, path=path if path is not None else os.defpath) is not None
    if not found:
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


def _split_host_port(text: str) -> tuple[str, int]:
    """``"host:port"`` (``"[::1]:443"`` too) -> (lower-case host, port); ValueError if not."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]").lower()
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not host:port: {text!r}")
    return host, int(port)


class _Relay:
    """The daemon's side of the sandbox's network: a thread accepting on one Unix socket per
    route, and a thread per connection, which connects to the target (or, for the proxy,
    reads the request first) and copies bytes both ways. ``stop()`` ends and joins them all."""

    def __init__(
        self, directory: Path, routes: Sequence[_Route], allowed: frozenset[tuple[str, int]]
    ) -> None:
        self.directory = directory
        self._allowed = allowed
        self._lock = threading.Lock()
        self._stopping = False
        self._threads: set[threading.Thread] = set()
        self._socks: set[socket.socket] = set()
        self._refused: dict[str, None] = {}  # ordered, unique
        self._stop_r, self._stop_w = socket.socketpair()
        directory.mkdir(mode=0o700)
        self._listeners: dict[int, tuple[socket.socket, _Route]] = {}
        # Bound through the folder's descriptor: a Unix socket path is limited to 107 bytes.
        folder = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i, route in enumerate(routes):
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._listeners[listener.fileno()] = (listener, route)
                listener.bind(f"/proc/self/fd/{folder}/{i}")
                listener.listen(64)
        except OSError:
            self._close()
            raise
        finally:
            os.close(folder)
        self._acceptor = threading.Thread(target=self._accept, name="sandbox-relay", daemon=True)
        self._acceptor.start()

    def refused(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._refused)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            socks = list(self._socks)
        self._stop_w.send(b"x")  # wakes every selector waiting on _stop_r
        for sock in socks:  # and every blocked send
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._acceptor.join()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join()
        self._close()

    def _close(self) -> None:
        for listener, _ in self._listeners.values():
            listener.close()
        self._stop_r.close()
        self._stop_w.close()

    def _accept(self) -> None:
        with selectors.DefaultSelector() as sel:
            for fd in self._listeners:
                sel.register(fd, selectors.EVENT_READ)
            sel.register(self._stop_r, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    if key.fileobj is self._stop_r:
                        return
                    listener, route = self._listeners[key.fd]
                    with suppress(OSError):
                        conn, _ = listener.accept()
                        self._start(conn, route)

    def _start(self, conn: socket.socket, route: _Route) -> None:
        with self._lock:
            if self._stopping:
                conn.close()
                return
            self._socks.add(conn)
            self._threads = {t for t in self._threads if t.is_alive()}  # joined by stop()
            thread = threading.Thread(
                target=self._serve, args=(conn, route), name="sandbox-connection", daemon=True
            )
            self._threads.add(thread)
        thread.start()

    def _serve(self, conn: socket.socket, route: _Route) -> None:
        upstream: socket.socket | None = None
        try:
            target = route.target
            upstream = self._connect(*target) if target is not None else self._proxy(conn)
            if upstream is not None:
                with self._lock:
                    self._socks.add(upstream)  # a stop from now on finds it in pump
                pump(conn, upstream, self._stop_r.fileno())
        finally:
            conn.close()
            with self._lock:
                self._socks.discard(conn)
                if upstream is not None:
                    self._socks.discard(upstream)

    def _connect(self, host: str, port: int) -> socket.socket | None:
        """A socket connected to ``host:port``; None when it cannot be reached in time or the
        relay stops meanwhile."""
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        try:
            addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            return None
        for family, kind, proto, _, address in addresses:
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            with selectors.DefaultSelector() as sel:
                sel.register(sock, selectors.EVENT_WRITE)
                sel.register(self._stop_r, selectors.EVENT_READ)
                if sock.connect_ex(address) in (0, errno.EINPROGRESS):
                    ready = sel.select(max(0.0, deadline - time.monotonic()))
                    if any(key.fileobj is self._stop_r for key, _ in ready):
                        sock.close()
                        return None
                    if ready and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                        sock.setblocking(True)
                        return sock
            sock.close()
        return None

    def _proxy(self, conn: socket.socket) -> socket.socket | None:
        """Read a proxy request from ``conn``; return the upstream connection it is relayed
        to, or answer the error and return None."""
        head = self._read_head(conn)
        if head is None:
            return None
        end = head.index(b"\r\n\r\n")
        lines, rest = head[:end].decode("latin-1").split("\r\n"), head[end + 4 :]
        parts = lines[0].split(" ")
        if len(parts) != 3:
            _answer(conn, "400 Bad Request", "not an HTTP request")
            return None
        method, target, version = parts
        try:
            if method == "CONNECT":
                host, port = _split_host_port(target)
            else:
                url = urlsplit(target)
                if url.scheme != "http" or not url.hostname:
                    raise ValueError(target)
                host, port = url.hostname, url.port or 80
        except ValueError:
            _answer(conn, "400 Bad Request", "use CONNECT host:port or http://host/...")
            return None
        if (host, port) not in self._allowed:
            with self._lock:
                self._refused[f"{host}:{port}"] = None
            _answer(conn, "403 Forbidden", f"{host}:{port} is not allowed from here")
            return None
        upstream = self._connect(host, port)
        if upstream is None:
            _answer(conn, "502 Bad Gateway", f"{host}:{port} cannot be reached")
            return None
        try:
            if method == "CONNECT":
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                upstream.sendall(rest)
            else:
                path = (url.path or "/") + (f"?{url.query}" if url.query else "")
                skip = ("proxy-", "connection:", "keep-alive:")
                headers = [line for line in lines[1:] if not line.lower().startswith(skip)]
                request = [f"{method} {path} {version}", *headers, "Connection: close", "", ""]
                upstream.sendall("\r\n".join(request).encode("latin-1") + rest)
        except OSError:
            upstream.close()
            return None
        return upstream

    def _read_head(self, conn: socket.socket) -> bytes | None:
        """The request up to its blank line (and what came with it); None on a timeout, end of
        file, an oversized head, or a stop."""
        data = b""
        deadline = time.monotonic() + HEAD_TIMEOUT_S
        with selectors.DefaultSelector() as sel:
            sel.register(conn, selectors.EVENT_READ)
            sel.register(self._stop_r, selectors.EVENT_READ)
            while b"\r\n\r\n" not in data:
                ready = sel.select(max(0.0, deadline - time.monotonic()))
                if not ready or any(key.fileobj is self._stop_r for key, _ in ready):
                    return None
                try:
                    chunk = conn.recv(MAX_HEAD_BYTES)
                except OSError:
                    return None
                if not chunk or len(data) + len(chunk) > MAX_HEAD_BYTES:
                    return None
                data += chunk
        return data


def _answer(conn: socket.socket, status: str, text: str) -> None:
    body = f"{text}\n".encode()
    head = f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
    with suppress(OSError):
        conn.sendall(f"{head}Connection: close\r\n\r\n".encode() + body)
