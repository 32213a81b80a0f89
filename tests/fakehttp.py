"""The HTTP plumbing the test fakes (``fake_ollama``, ``fake_github``) share.

A fake is a ``FakeServer``: a real HTTP/1.1 server on 127.0.0.1 (``ThreadingHTTPServer`` in a
background thread) that ``start()`` opens on the same port as before, or a free one the first
time, and ``stop()`` ends at once: it wakes waits on ``stopping``, shuts every open connection,
closes the listening socket and joins all of the server's threads. Each request is handed to the
fake's ``_handle(handler, stopping)`` on a handler thread.
"""

from __future__ import annotations

import socket
import sys
import threading
from contextlib import suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Self


class FakeServer:
    """Lifecycle of a fake: ``port``, ``url``, ``start()``, ``stop()``, ``with``."""

    label: ClassVar[str]  # in ``errors`` and thread names: "fake Ollama", "fake-ollama:<port>"
    handler: ClassVar[type[Handler]]

    def __init__(self, port: int = 0) -> None:
        self.errors: list[str] = []  # exceptions raised inside the fake
        self._port = port
        self._lock = threading.Lock()
        self._server: Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError(f"{type(self).__name__} was never started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Listen (again) on the same port as before, or a free one the first time."""
        with self._lock:
            if self._server is not None:
                raise RuntimeError(f"{type(self).__name__} is already running")
            server = Server(self._port, self)
            self._port = server.server_address[1]
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.02},
                name=f"{self.label.replace(' ', '-').lower()}:{self._port}",
                daemon=True,
            )
            self._server, self._thread = server, thread
        thread.start()

    def stop(self) -> None:
        """Refuse connections from now on; end waits, drop open connections, join threads."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None or thread is None:
            return
        server.begin_stop()  # wakes waits on ``stopping``, shuts open connections
        server.shutdown()  # the accept loop ends
        server.server_close()  # closes the listening socket, joins handler threads
        thread.join()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _handle(self, h: Any, stopping: threading.Event) -> None:
        """Answer the request ``h`` holds (on a handler thread); ``stopping`` is set by
        ``stop()``."""
        raise NotImplementedError


class Server(ThreadingHTTPServer):
    """Tracks open connections so that ``begin_stop()`` can shut them; joins handler threads."""

    daemon_threads = True
    block_on_close = True  # server_close() joins every handler thread

    def __init__(self, port: int, fake: FakeServer) -> None:
        self.fake = fake
        self.stopping = threading.Event()
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(("127.0.0.1", port), fake.handler)

    def track(self, conn: socket.socket) -> None:
        with self._open_lock:
            self._open.add(conn)
            late = self.stopping.is_set()
        if late:
            _shut(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._open_lock:
            self._open.discard(conn)

    def begin_stop(self) -> None:
        with self._open_lock:
            self.stopping.set()
            conns = list(self._open)
        for conn in conns:
            _shut(conn)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):  # a dropped connection is expected, not an error
            with self.fake._lock:
                self.fake.errors.append(f"{self.fake.label} handler raised {error!r}")


def _shut(conn: socket.socket) -> None:
    """Unblock the handler thread reading or writing ``conn``; it closes the socket."""
    with suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked streams
    timeout = 60  # an idle keep-alive connection ends on its own (stop() ends it at once)
    disable_nagle_algorithm = True  # else headers then body cost a delayed ACK (40 ms)
    server: Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            with suppress(OSError):
                super().finish()
        finally:
            self.server.untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _dispatch(self) -> None:
        try:
            self.server.fake._handle(self, self.server.stopping)
        except OSError:
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_DELETE = _dispatch

    def send(
        self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        """A whole answer with ``Content-Length`` (no body for HEAD)."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
