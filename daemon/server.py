"""HTTP endpoints for operators: /health, /ready, /health/ollama, /status, /metrics; the
dashboard's pages (``/``, ``/tickets/ID``, ``/login``; ``daemon/web/dashboard.py``); and
``POST /webhooks/github`` for GitHub's deliveries (``daemon/webhook.py``: signed, not
bearer-token protected).

A stdlib ``ThreadingHTTPServer`` on its own thread; every answer comes from callables the
supervisor hands in, so this module knows nothing of the daemon's insides. With a token,
every request needs ``Authorization: Bearer <token>``, or the dashboard's session cookie
(the sign-in page and the static files excepted).

No client can exhaust the daemon's threads or file descriptors. At most ``max_connections``
connections are open at once, each with a thread; a client has ``read_timeout_s`` to send its
request (idle and slow clients are dropped) and each later read or write has as long. At the
limit a new connection takes the place of the oldest one that has not sent its request yet,
so a flood of idle connections cannot lock out a health check; when every connection is
being answered, the new one gets a 503 at once, from the listening thread, with no thread of
its own. The listening thread survives running out of descriptors.
"""

from __future__ import annotations

import errno
import hmac
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from daemon.web.dashboard import MAX_FORM, Dashboard, Request, Response, parse_form
from daemon.webhook import MAX_BODY as WEBHOOK_MAX_BODY
from daemon.webhook import PATH as WEBHOOK_PATH

MAX_CONNECTIONS = 64  # far above the few scrapers and operators that ask at once
READ_TIMEOUT_S = 5.0  # a local client sends its request in milliseconds
BUSY = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: 17\r\nConnection: close\r\n\r\n"
    b'{"error": "busy"}'
)

Probe = Callable[[], tuple[int, dict[str, Any]]]  # (HTTP status, JSON body)
Hook = Callable[[dict[str, str], bytes], tuple[int, dict[str, Any]]]  # headers, raw body


@dataclass(frozen=True)
class Probes:
    health: Probe
    ready: Probe
    ollama: Probe
    status: Probe


class _Listener(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` that bounds its connections and the time to send a request.

    Connections are ``waiting`` (accepted, request not read yet; oldest first, with when they
    were accepted) or ``busy`` (being answered). Both sets change under ``_guard``, and a
    socket leaves them before it is closed, so the listening thread never touches a closed
    socket whose descriptor was reused."""

    daemon_threads = True
    request_queue_size = 128  # the stdlib's 5 drops connections in a burst

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        max_connections: int,
        read_timeout_s: float,
    ) -> None:
        self.max_connections = max_connections
        self.read_timeout_s = read_timeout_s
        self._guard = threading.Lock()
        self._waiting: dict[socket.socket, float] = {}
        self._busy: set[socket.socket] = set()
        super().__init__(address, handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            return super().get_request()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                # Out of descriptors (elsewhere in the daemon): free one if a client idles,
                # and do not spin on a listening socket that stays readable.
                with self._guard:
                    if self._waiting:
                        self._drop(next(iter(self._waiting)))
                time.sleep(0.05)
            raise  # serve_forever ignores it and goes on

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._guard:
            if len(self._waiting) + len(self._busy) >= self.max_connections:
                if not self._waiting:
                    _refuse(request)
                    return
                self._drop(next(iter(self._waiting)))
            self._waiting[request] = time.monotonic()
        super().process_request(request, client_address)

    def begin(self, request: socket.socket) -> bool:
        """The handler read a whole request; False when the connection was dropped."""
        with self._guard:
            if self._waiting.pop(request, None) is None:
                return False
            self._busy.add(request)
            return True

    def service_actions(self) -> None:
        """Between accepts (at least every half second): drop clients too slow to ask."""
        too_old = time.monotonic() - self.read_timeout_s
        with self._guard:
            for request in [r for r, at in self._waiting.items() if at < too_old]:
                self._drop(request)

    def drop_waiting(self) -> None:
        with self._guard:
            for request in list(self._waiting):
                self._drop(request)

    def _drop(self, request: socket.socket) -> None:
        """End a waiting connection: its handler reads end of file and closes it."""
        del self._waiting[request]
        with suppress(OSError):  # the client is gone already
            request.shutdown(socket.SHUT_RDWR)

    def shutdown_request(self, request: Any) -> None:
        with self._guard:
            self._waiting.pop(request, None)
            self._busy.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return  # a client that went away is not worth a line
        logger.opt(exception=True).warning("http: answering {} failed", client_address[0])


def _refuse(request: socket.socket) -> None:
    """503 and close, without waiting on the client."""
    try:
        request.setblocking(False)
        request.send(BUSY)
    except OSError:
        pass  # its buffer is full or it is gone: closing says enough
    request.close()


class Server:
    def __init__(
        self,
        host: str,
        port: int,
        probes: Probes,
        registry: CollectorRegistry,
        token: str | None = None,
        *,
        max_connections: int = MAX_CONNECTIONS,
        read_timeout_s: float = READ_TIMEOUT_S,
        redact: Callable[[Any], Any] = lambda body: body,
        webhook: Hook | None = None,
        web: Dashboard | None = None,
    ) -> None:
        routes: dict[str, Probe] = {
            "/health": probes.health,
            "/ready": probes.ready,
            "/health/ollama": probes.ollama,
            "/status": probes.status,
        }

        class Handler(BaseHTTPRequestHandler):
            timeout = read_timeout_s  # each read and write of the connection

            def do_GET(self) -> None:
                if not cast(_Listener, self.server).begin(self.connection):
                    self.close_connection = True
                    return  # dropped while it was still sending
                path = self.path.split("?", 1)[0].rstrip("/") or "/"
                if web is not None and web.serves(path):
                    return self._page("GET")
                if not self._bearer() and not (web is not None and web.signed_in(self._lower())):
                    return self._send(401, b'{"error": "unauthorized"}', "application/json")
                if path == "/metrics":
                    return self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                probe = routes.get(path)
                if probe is None:
                    return self._send(404, b'{"error": "not found"}', "application/json")
                status, body = probe()
                text = json.dumps(redact(body), default=str)  # every answer passes the redactor
                self._send(status, text.encode(), "application/json")

            def do_POST(self) -> None:
                if not cast(_Listener, self.server).begin(self.connection):
                    self.close_connection = True
                    return
                path = self.path.split("?", 1)[0].rstrip("/")
                if web is not None and web.serves(path):
                    return self._page("POST")
                if webhook is None or path != WEBHOOK_PATH:
                    return self._json(404, {"error": "not found"})
                body = self._body(WEBHOOK_MAX_BODY)
                if body is None:
                    return
                headers = {k.lower(): v for k, v in self.headers.items()}
                self._json(*webhook(headers, body))

            def _bearer(self) -> bool:
                """No token is needed, or the request carries it as a bearer token."""
                given = self.headers.get("Authorization", "")
                return not token or hmac.compare_digest(given, f"Bearer {token}")

            def _lower(self) -> dict[str, str]:
                return {k.lower(): v for k, v in self.headers.items()}

            def _page(self, method: str) -> None:
                """A dashboard page or action (``daemon/web/dashboard.py``). Without the
                token, a page other than the sign-in sends the browser there."""
                assert web is not None
                path, _, raw = self.path.partition("?")
                path = path.rstrip("/") or "/"
                headers = self._lower()
                bearer = bool(token) and self._bearer()
                signed_in = bearer or web.signed_in(headers) or web.public(path)
                if token and method == "GET" and not signed_in:
                    return self._respond(Response(303, b"", "text/plain", {"Location": "/login"}))
                form: dict[str, str] = {}
                if method == "POST":
                    body = self._body(MAX_FORM)
                    if body is None:
                        return
                    form = parse_form(body)
                query = parse_form(raw.encode())
                try:
                    page = web.handle(Request(method, path, query, headers, form, bearer))
                except Exception as e:  # a bug in a page: say so, log it, keep serving
                    logger.opt(exception=e).error("dashboard: {} {} failed", method, path)
                    page = Response(500, b"internal error (see ticketd.log)", "text/plain")
                self._respond(page)

            def _body(self, limit: int) -> bytes | None:
                """The request's body, at most ``limit`` bytes; None when refused (411 or 413
                sent)."""
                try:
                    length = int(self.headers.get("Content-Length", ""))
                except ValueError:
                    self._json(411, {"error": "Content-Length required"})
                    return None
                if not 0 <= length <= limit:
                    self.close_connection = True
                    self._json(413, {"error": "body too large"})
                    return None
                return self.rfile.read(length)

            def _respond(self, page: Response) -> None:
                self._send(page.status, page.body, page.content_type, page.headers)

            def _json(self, status: int, body: dict[str, Any]) -> None:
                self._send(status, json.dumps(body).encode(), "application/json")

            def _send(
                self,
                status: int,
                data: bytes,
                content_type: str,
                headers: dict[str, str] | None = None,
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # requests are not worth a log line each

        self._httpd = _Listener(
            (host, port), Handler, max_connections=max_connections, read_timeout_s=read_timeout_s
        )
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="http", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.drop_waiting()  # their threads end now, not at their read timeout
        self._httpd.server_close()
        self._thread.join(timeout=5)
