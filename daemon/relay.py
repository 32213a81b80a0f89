"""The daemon's side of a sandbox's network: relay threads and the allow-listing HTTP proxy.

``sandbox_init.py``, the sandbox's first process, listens on loopback inside and relays each
connection to a Unix socket in a folder bound into the sandbox; a ``Relay`` accepts on those
sockets (one per ``Route``) and, in a thread per connection, either connects to the route's
TCP target or, for the proxy route, reads an HTTP proxy request first: ``CONNECT host:port``
or an absolute-form ``http://`` request to an allowed ``host:port`` is relayed, every other
host is answered 403 (and remembered, see ``Relay.refused``). Bytes are copied both ways by
``sandbox_init.pump``. ``daemon/sandbox.py`` decides the routes and starts and stops the relay.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import threading
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from daemon.sandbox_init import pump

CONNECT_TIMEOUT_S = 10.0
HEAD_TIMEOUT_S = 30.0
MAX_HEAD_BYTES = 65536


@dataclass(frozen=True)
class Route:
    inside: tuple[str, int]  # where the helper listens
    target: tuple[str, int] | None  # None: the HTTP proxy


def split_host_port(text: str) -> tuple[str, int]:
    """``"host:port"`` (``"[::1]:443"`` too) -> (lower-case host, port); ValueError if not."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]").lower()
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not host:port: {text!r}")
    return host, int(port)


class Relay:
    """The daemon's side of the sandbox's network: a thread accepting on one Unix socket per
    route, and a thread per connection, which connects to the target (or, for the proxy,
    reads the request first) and copies bytes both ways. ``stop()`` ends and joins them all."""

    def __init__(
        self, directory: Path, routes: Sequence[Route], allowed: frozenset[tuple[str, int]]
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
        self._listeners: dict[int, tuple[socket.socket, Route]] = {}
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

    def _start(self, conn: socket.socket, route: Route) -> None:
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

    def _serve(self, conn: socket.socket, route: Route) -> None:
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
                host, port = split_host_port(target)
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
