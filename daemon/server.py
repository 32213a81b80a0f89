"""HTTP endpoints for operators: /health, /ready, /health/ollama, /status, /metrics.

A stdlib ``ThreadingHTTPServer`` on its own thread; every answer comes from callables the
supervisor hands in, so this module knows nothing of the daemon's insides. With a token,
every request needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

Probe = Callable[[], tuple[int, dict[str, Any]]]  # (HTTP status, JSON body)


@dataclass(frozen=True)
class Probes:
    health: Probe
    ready: Probe
    ollama: Probe
    status: Probe


class Server:
    def __init__(
        self,
        host: str,
        port: int,
        probes: Probes,
        registry: CollectorRegistry,
        token: str | None = None,
    ) -> None:
        routes: dict[str, Probe] = {
            "/health": probes.health,
            "/ready": probes.ready,
            "/health/ollama": probes.ollama,
            "/status": probes.status,
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if token and not hmac.compare_digest(
                    self.headers.get("Authorization", ""), f"Bearer {token}"
                ):
                    return self._send(401, b'{"error": "unauthorized"}', "application/json")
                path = self.path.split("?", 1)[0].rstrip("/") or "/"
                if path == "/metrics":
                    return self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                probe = routes.get(path)
                if probe is None:
                    return self._send(404, b'{"error": "not found"}', "application/json")
                status, body = probe()
                self._send(status, json.dumps(body, default=str).encode(), "application/json")

            def _send(self, status: int, data: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # requests are not worth a log line each

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="http", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
