"""Read-only HTTP on a TCP port ([scheduler] metrics_port): /metrics and the status page at /.

Only GET. It serves from Redis through the same SchedulerService as the API, but with no
caller identity, so it never shows commands or environments.
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


class WebServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, bind: str, port: int, service: SchedulerService) -> None:
        self.service = service
        self.registry: CollectorRegistry = make_registry(service)
        super().__init__((bind, port), _Handler)


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
