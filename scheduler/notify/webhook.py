"""One webhook POST, written for a hostile receiver.

The request goes to an address `guard.resolve_allowed` approved (the name is resolved once
and the connection made to that address, so DNS cannot swap it afterwards), with a deadline
on the whole exchange, not per read: a receiver that trickles bytes or never answers costs
one `timeout_s`. Only the status line and headers are read, at most MAX_ANSWER_BYTES; the
answer's body is never read. Redirects are not followed, except a 307/308 to the very same
scheme, host and port (at most MAX_REDIRECTS), which keeps the method and body.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from scheduler.notify.guard import Network, Refused, Unresolved, resolve_allowed

MAX_ANSWER_BYTES = 64 * 1024
MAX_REDIRECTS = 3
USER_AGENT = "gpulab-notify/1"
# Answers worth trying again: the receiver is down, slow or asks us to come back.
RETRYABLE_4XX = frozenset({408, 425, 429})


@dataclass(frozen=True)
class Outcome:
    ok: bool
    retry: bool  # worth another attempt later
    status: int  # HTTP status, 0 when there was none
    error: str = ""  # one line for the user (`gpulab notify show`)


def signature(secret: str, body: bytes) -> str:
    """The X-Gpulab-Signature value: HMAC-SHA256 of the exact body bytes with the user's secret."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post(url: str, body: bytes, headers: Mapping[str, str], allow: Sequence[Network], timeout_s: float) -> Outcome:
    deadline = time.monotonic() + timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        try:
            addresses = resolve_allowed(url, allow)
            status, location = _exchange(url, addresses, body, headers, deadline)
        except Unresolved as exc:  # DNS may answer again later
            return Outcome(False, True, 0, str(exc))
        except Refused as exc:  # an address gpulab may not reach: trying again will not change that
            return Outcome(False, False, 0, str(exc))
        except (OSError, ValueError) as exc:  # refused, reset, timed out, TLS, a malformed answer
            return Outcome(False, True, 0, f"{type(exc).__name__}: {exc}"[:300])
        if 200 <= status < 300:
            return Outcome(True, False, status)
        if status in (307, 308) and location:
            target = urljoin(url, location)
            if _origin(target) == _origin(url):
                url = target
                continue
            return Outcome(False, False, status, f"HTTP {status} redirect to another host not followed")
        if 300 <= status < 400:
            return Outcome(False, False, status, f"HTTP {status} redirect not followed")
        retry = status >= 500 or status in RETRYABLE_4XX
        return Outcome(False, retry, status, f"HTTP {status}")
    return Outcome(False, False, 0, f"more than {MAX_REDIRECTS} redirects")


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or (443 if parts.scheme == "https" else 80)


def _exchange(
    url: str, addresses: Sequence[object], body: bytes, headers: Mapping[str, str], deadline: float
) -> tuple[int, str]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    sock = _connect([str(a) for a in addresses], port, deadline)
    try:
        if parts.scheme == "https":
            sock.settimeout(_left(deadline))
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = f"[{host}]" if ":" in host else host
        if parts.port:
            host_header += f":{parts.port}"
        lines = [f"POST {target} HTTP/1.1", f"Host: {host_header}", f"User-Agent: {USER_AGENT}"]
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body
        sock.settimeout(_left(deadline))
        sock.sendall(request)
        return _read_head(sock, deadline)
    finally:
        sock.close()


def _connect(addresses: list[str], port: int, deadline: float) -> socket.socket:
    error: OSError = OSError("no address")
    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(_left(deadline))
            sock.connect((address, port))
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("no answer in time")
    return left


def _read_head(sock: socket.socket, deadline: float) -> tuple[int, str]:
    """The status and Location of the answer, reading no more than its head, by the deadline."""
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) > MAX_ANSWER_BYTES:
            raise ValueError(f"answer head over {MAX_ANSWER_BYTES} bytes")
        sock.settimeout(_left(deadline))
        chunk = sock.recv(8192)
        if not chunk:
            break
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0].decode("latin-1")
    status_line, *header_lines = head.splitlines() or [""]
    fields = status_line.split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit() or len(fields[1]) != 3:
        raise ValueError(f"not an HTTP answer: {status_line[:80]!r}")
    location = ""
    for line in header_lines:
        name, _, value = line.partition(":")
        if name.strip().lower() == "location":
            location = value.strip()
    return int(fields[1]), location
