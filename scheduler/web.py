"""Read-only HTTP on a TCP port ([scheduler] metrics_port): /metrics and the status page at /.

Only GET. It serves from Redis through the same SchedulerService as the API, but with no
caller identity, so it never shows commands or environments. Connections are bounded like
the API's (scheduler/connections.py): anyone on the host can reach this port.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import redis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from jobs.config import Config
from scheduler.connections import BoundedConnections, ConnectionLimits
from scheduler.metrics import make_registry
from scheduler.service import SchedulerService
from scheduler.status_page import render_page

log = logging.getLogger("gpulab.web")


class _Handler(BaseHTTPRequestHandler):
    server: WebServer
    timeout = 15

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("web: " + format, *args)

    def do_GET(self) -> None:
        if not self.server.request_read(self.connection):
            return  # dropped as too slow
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(self.server.registry))
            elif path in ("/", "/index.html"):
                self._send(200, "text/html; charset=utf-8", render_page(self.server.service).encode())
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found: try / or /metrics\n")
        except redis.RedisError:
            self._send(503, "text/plain; charset=utf-8", b"the scheduler cannot reach Redis right now\n")
        except Exception:  # a scrape must never take the scheduler down
            log.exception("web: error while serving %s", path)
            self._send(500, "text/plain; charset=utf-8", b"internal error (see the scheduler's log)\n")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors are the client's (an unknown method: 405, not 501)."""
        super().send_error({501: 405, 505: 400}.get(code, code), message, explain)


class WebServer(BoundedConnections, ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, bind: str, port: int, service: SchedulerService) -> None:
        self.service = service
        self.registry: CollectorRegistry = make_registry(service)
        super().__init__((bind, port), _Handler)
        s = service.config.scheduler
        # One key for every client (TCP has no peer uid): the total cap only.
        self.init_bounds(
            ConnectionLimits(max(1, s.max_api_connections), 0, max(0.5, s.api_request_timeout_s), lifetime_s=120.0)
        )


def start_web(config: Config, service: SchedulerService) -> WebServer | None:
    """Serve metrics and the status page in a daemon thread when metrics_port > 0.

    The thread dies with the process; the scheduler never waits for a scrape in flight."""
    if config.scheduler.metrics_port <= 0:
        return None
    try:
        server = WebServer(config.scheduler.metrics_bind, config.scheduler.metrics_port, service)
    except OSError as exc:  # scheduling matters more than metrics: say so loudly, carry on
        log.error("metrics: cannot listen on %s:%d (%s); no metrics or status page",
                  config.scheduler.metrics_bind, config.scheduler.metrics_port, exc)  # fmt: skip
        return None
    threading.Thread(target=server.serve_forever, name="web", daemon=True).start()
    print(f"gpulab metrics and status page on http://{config.scheduler.metrics_bind}:{server.server_port}/", flush=True)
    return server
