"""The scheduler's API: JSON over HTTP on a Unix socket, one thread per connection.

The caller's identity is the socket peer's uid (SO_PEERCRED), never something the client
says. The socket accepts every local user (mode 0666); permissions are checked per call.
Connections are bounded in number (in all and per uid) and in time (scheduler/connections.py),
one request each. Whatever a client sends, it gets one line of JSON: 4xx for what it got
wrong, 500 (logged, no traceback to the client) for what we did.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pwd
import re
import socket
import socketserver
import struct
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis

from jobs.api import API_PREFIX, JOB_ACTIONS, MAX_BODY_BYTES, MAX_WAIT_S, ApiError
from jobs.config import Config
from scheduler.bulk import bulk_action
from scheduler.connections import BoundedConnections, ConnectionLimits
from scheduler.history import history_view
from scheduler.job_listing import parse_query
from scheduler.notify.api import notify_route
from scheduler.service import Caller, SchedulerService

log = logging.getLogger("gpulab.api")
_JOB_RE = re.compile(rf"^{API_PREFIX}/jobs/(\d{{1,12}})(?:/([a-z]+))?$")
_BULK_RE = re.compile(rf"^{API_PREFIX}/jobs/({'|'.join(JOB_ACTIONS)})$")
_NODE_RE = re.compile(rf"^{API_PREFIX}/nodes/([A-Za-z0-9][A-Za-z0-9._:+@=-]{{0,127}})/(drain|resume)$")


REDIS_SILENT = (
    "Redis did not answer the scheduler in time; what you asked may or may not be done: "
    "look (gpulab show), then try again"
)


class SocketInUse(RuntimeError):
    """Something answers on the API socket's path: another scheduler. We never replace it."""


def _peer_creds(sock: socket.socket) -> tuple[int, int, int]:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


def peer_caller(sock: socket.socket) -> Caller:
    pid, uid, _gid = _peer_creds(sock)
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
    timeout = 15  # seconds any one read or write may stall (the whole request: connections.py)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("api: " + format, *args)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        self.close_connection = True  # one request a connection: the read deadline covers it
        try:
            caller = peer_caller(self.connection)
            body = self._read_body() if method == "POST" else None
            if not self.server.request_read(self.connection):
                return  # dropped as too slow: what we read may be cut short; nobody is listening
            status, payload = 200, self._route(method, caller, body)
            data = json.dumps(payload, allow_nan=False).encode()
        except ApiError as exc:
            status, data = exc.status, _error(exc.message)
        except redis.ConnectionError:
            status, data = 503, _error("the scheduler cannot reach Redis right now; try again shortly")
        except redis.TimeoutError:  # a stalled or cut-off Redis: the call may still have been applied
            status, data = 503, _error(REDIS_SILENT)
        except Exception:  # one bad request must never take the API down
            log.exception("api: unexpected error in %s %s", method, one_line(self.path, 200))
            status, data = 500, _error("internal error in the scheduler (see its log)")
        self._send(status, data)

    def _send(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a malformed request line or header, an unknown method,
        a bad HTTP version) are the client's: one line of JSON with a 4xx, like ours (an
        unknown method is 405 here, not http.server's 501: a 5xx says the server failed)."""
        self.close_connection = True
        self.request_version = self.protocol_version  # else an unparsed line is answered as HTTP/0.9, bare
        status = {501: 405, 505: 400}.get(code, code if 400 <= code < 500 else 400)
        with contextlib.suppress(OSError):
            self._send(status, _error(f"bad request: {message or HTTPStatus(code).phrase}"))

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
            return json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float) if raw else {}
        except RecursionError:  # deep but valid nesting: json raises this, not a ValueError
            raise ApiError(400, "request body is nested too deeply") from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, ints over the digit limit, NaN
            raise ApiError(400, f"request body is not valid JSON ({type(exc).__name__})") from None

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
            return svc.list_jobs(caller, all_jobs=False, query=parse_query(query, caller.user))
        if path == f"{API_PREFIX}/gpus" and method == "GET":
            return svc.gpus(caller)
        if path == f"{API_PREFIX}/history" and method == "GET":
            return history_view(svc, caller, query)
        if path.startswith(f"{API_PREFIX}/notify"):
            return notify_route(svc, method, path, caller, body)
        bulk_match = _BULK_RE.match(path)
        if bulk_match and method == "POST":
            return bulk_action(svc, caller, bulk_match[1], body)
        if path == f"{API_PREFIX}/profiles" and method == "GET":
            return svc.profiles(caller, query.get("user", ""))
        if path == f"{API_PREFIX}/profiles/resolve" and method == "POST":
            return svc.preview_memory(caller, body)
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
            offset, wait_s = _int_param(query, "offset", 0), _float_param(query, "wait", 0.0)
            encoding = query.get("encoding", "text")
            if encoding not in ("text", "base64"):
                raise ApiError(400, "'encoding' must be text or base64")
            return svc.log(caller, job_id, offset, wait_s, as_base64=encoding == "base64")
        if method == "GET" and action == "wait":
            return svc.wait(caller, job_id, _float_param(query, "timeout", 30.0))
        if method == "POST" and action in JOB_ACTIONS:
            return getattr(svc, action)(caller, job_id)
        raise ApiError(404, f"no such API path: {method} {url.path}")


def _error(message: str) -> bytes:
    return json.dumps({"error": one_line(message)}).encode()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("a number out of range")
    return value


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


def api_limits(config: Config) -> ConnectionLimits:
    s = config.scheduler
    return ConnectionLimits(
        total=max(1, s.max_api_connections),
        per_user=s.max_api_connections_per_user,
        request_timeout_s=max(0.5, s.api_request_timeout_s),
        lifetime_s=MAX_WAIT_S + 60.0,  # the longest `wait`, and time to send its answer
    )


class ApiServer(BoundedConnections, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Create it only while holding the state directory's lock (scheduler/instance.py): it
    replaces a stale socket file, and removes its own at close."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # listen backlog; the default 5 refuses bursts of clients (EAGAIN)

    def __init__(self, socket_path: Path, service: SchedulerService, limits: ConnectionLimits | None = None) -> None:
        self.service = service
        self.socket_path = socket_path
        socket_path.parent.mkdir(parents=True, exist_ok=True)
        if socket_path.exists() or socket_path.is_symlink():
            if _answers(socket_path):  # a scheduler with another lock (another state dir) serves it
                raise SocketInUse(f"another process serves {socket_path}; not replacing it")
            socket_path.unlink()  # stale: left by a scheduler that was killed
        super().__init__(str(socket_path), _Handler)
        os.chmod(socket_path, 0o666)  # every local user may call; identity is SO_PEERCRED
        self._inode = os.stat(socket_path).st_ino
        self.init_bounds(limits or api_limits(service.config))  # before serve_forever accepts anyone

    def client_key(self, request: Any) -> Any:
        return _peer_creds(request)[1]  # the uid: one user's connections are capped together

    def remove_socket(self) -> None:
        """Unlink the socket file if it is still ours (never one another process bound since)."""
        try:
            if os.stat(self.socket_path).st_ino == self._inode:
                self.socket_path.unlink()
        except OSError:
            pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up or stalls is its own problem: note it, keep serving."""
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # hung up, stalled, or dropped by the watchdog
            log.debug("api: client went away: %s", error)
        else:
            log.exception("api: error while serving a request")


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
