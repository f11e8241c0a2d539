"""The scheduler's API: JSON over HTTP on a Unix socket, one thread per connection.

The caller's identity is the socket peer's uid (SO_PEERCRED), never something the client
says. The socket accepts every local user (mode 0666); permissions are checked per call.
Slow or broken clients time out on their own thread without blocking anyone else.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import re
import socket
import socketserver
import struct
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis

from jobs.api import API_PREFIX, JOB_ACTIONS, MAX_BODY_BYTES, ApiError
from scheduler.history import history_view
from scheduler.service import Caller, SchedulerService

log = logging.getLogger("gpulab.api")
_JOB_RE = re.compile(rf"^{API_PREFIX}/jobs/(\d{{1,12}})(?:/([a-z]+))?$")
_NODE_RE = re.compile(rf"^{API_PREFIX}/nodes/([A-Za-z0-9][A-Za-z0-9._:+@=-]{{0,127}})/(drain|resume)$")


def peer_caller(sock: socket.socket) -> Caller:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return Caller(uid=uid, user=user, pid=pid)


def one_line(message: str, limit: int = 500) -> str:
    """Errors may quote what the client sent: escape control characters so the answer stays
    one line and cannot drive the user's terminal."""
    safe = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    return safe if len(safe) <= limit else safe[: limit - 3] + "..."


class _Handler(BaseHTTPRequestHandler):
    server: ApiServer
    protocol_version = "HTTP/1.1"
    timeout = 15  # seconds a client may take to send its request

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("api: " + format, *args)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        try:
            caller = peer_caller(self.connection)
            body = self._read_body() if method == "POST" else None
            status, payload = 200, self._route(method, caller, body)
        except ApiError as exc:
            status, payload = exc.status, {"error": one_line(exc.message)}
        except redis.ConnectionError:
            status, payload = 503, {"error": "the scheduler cannot reach Redis right now; try again shortly"}
        except Exception:  # one bad request must never take the API down
            log.exception("api: unexpected error")
            status, payload = 500, {"error": "internal error in the scheduler (see its log)"}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise ApiError(400, "bad Content-Length") from None
        if length < 0 or length > MAX_BODY_BYTES:
            raise ApiError(413, f"request body must be at most {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(length)
        if len(raw) != length:
            raise ApiError(400, "request body was cut short")
        try:
            return json.loads(raw) if raw else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "request body is not valid JSON") from None

    def _route(self, method: str, caller: Caller, body: Any) -> Any:
        svc = self.server.service
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        path = url.path.rstrip("/")
        if path == f"{API_PREFIX}/health":
            return {"ok": True}
        if path == f"{API_PREFIX}/jobs":
            if method == "POST":
                return svc.submit(caller, body)
            return svc.list_jobs(caller, all_jobs=query.get("all") == "1")
        if path == f"{API_PREFIX}/gpus" and method == "GET":
            return svc.gpus(caller)
        if path == f"{API_PREFIX}/history" and method == "GET":
            return history_view(svc, caller, query)
        node_match = _NODE_RE.match(path)
        if node_match and method == "POST":
            why = body.get("reason", "") if isinstance(body, dict) else ""
            return svc.drain(caller, node_match[1], str(why), resume=node_match[2] == "resume")
        match = _JOB_RE.match(path)
        if not match:
            raise ApiError(404, f"no such API path: {method} {url.path}")
        job_id, action = int(match[1]), match[2] or ""
        if method == "GET" and action == "":
            return svc.show(caller, job_id)
        if method == "GET" and action == "log":
            return svc.log(caller, job_id, _int_param(query, "offset", 0))
        if method == "GET" and action == "wait":
            return svc.wait(caller, job_id, _float_param(query, "timeout", 30.0))
        if method == "POST" and action in JOB_ACTIONS:
            return getattr(svc, action)(caller, job_id)
        raise ApiError(404, f"no such API path: {method} {url.path}")


def _int_param(query: dict[str, str], name: str, default: int) -> int:
    try:
        return int(query.get(name, default))
    except ValueError:
        raise ApiError(400, f"'{name}' must be an integer") from None


def _float_param(query: dict[str, str], name: str, default: float) -> float:
    try:
        value = float(query.get(name, default))
    except ValueError:
        raise ApiError(400, f"'{name}' must be a number") from None
    if value != value or value < 0:
        raise ApiError(400, f"'{name}' must be a non-negative number")
    return value


class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # listen backlog; the default 5 refuses bursts of clients (EAGAIN)

    def __init__(self, socket_path: Path, service: SchedulerService) -> None:
        self.service = service
        socket_path.parent.mkdir(parents=True, exist_ok=True)
        if socket_path.exists() or socket_path.is_symlink():
            socket_path.unlink()
        super().__init__(str(socket_path), _Handler)
        os.chmod(socket_path, 0o666)  # every local user may call; identity is SO_PEERCRED

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up or stalls is its own problem: note it, keep serving."""
        error = sys.exc_info()[1]
        if isinstance(error, BrokenPipeError | ConnectionResetError | TimeoutError):
            log.debug("api: client went away: %s", error)
        else:
            log.exception("api: error while serving a request")
