"""Bounded connection handling for the scheduler's thread-per-connection servers (the API
socket and the metrics/status port).

`socketserver.ThreadingMixIn` starts a thread for every connection it accepts, and a socket
timeout only bounds each read, so one user could exhaust the process with many connections,
or hold threads forever by sending a byte every few seconds (slowloris). Here:

- at most `total` connections are served at once, and at most `per_user` per client key
  (the peer's uid on the Unix socket); past that the client gets a one-line JSON answer
  (503 or 429) at once, from the accepting thread, and is closed;
- a client must have sent its whole request within `request_timeout_s` of connecting, and a
  connection lives at most `lifetime_s` (long enough for the longest `wait`), else a
  watchdog shuts it down, which ends its thread's blocking read or write.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

log = logging.getLogger("gpulab.connections")
WATCHDOG_INTERVAL_S = 0.5


@dataclass(frozen=True)
class ConnectionLimits:
    total: int = 256
    per_user: int = 32  # 0: no per-user cap
    request_timeout_s: float = 10.0
    lifetime_s: float = 600.0


def refusal(status: int, message: str) -> bytes:
    """A whole HTTP response with a one-line JSON error, for a client we will not serve."""
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class BoundedConnections:
    """Mix into a `socketserver.ThreadingMixIn` server, before it; call `init_bounds` once it
    is bound, before `serve_forever`."""

    limits: ConnectionLimits

    def init_bounds(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._bounds_lock = threading.Lock()
        self._keys: dict[Any, Any] = {}  # request socket -> its client key
        self._deadlines: dict[Any, float] = {}  # request socket -> monotonic deadline
        self._per_key: Counter[Any] = Counter()
        self._dropped: set[Any] = set()  # shut down by the watchdog, not yet closed
        self._closed = threading.Event()
        threading.Thread(target=self._watchdog, name="connection-watchdog", daemon=True).start()

    def client_key(self, request: Any) -> Any:
        """What the per-user cap counts by; None: only the total cap applies."""
        return None

    @property
    def open_connections(self) -> int:
        with self._bounds_lock:
            return len(self._keys)

    # ---- socketserver hooks -------------------------------------------------------------------
    def verify_request(self, request: Any, client_address: Any) -> bool:
        try:
            key = self.client_key(request)
        except OSError:
            return False  # the client is already gone
        with self._bounds_lock:
            if len(self._keys) >= self.limits.total:
                busy = (503, "the scheduler is serving too many connections; try again shortly")
            elif key is not None and self.limits.per_user and self._per_key[key] >= self.limits.per_user:
                busy = (429, f"too many connections from your user at once (at most {self.limits.per_user})")
            else:
                self._keys[request] = key
                self._per_key[key] += 1
                self._deadlines[request] = time.monotonic() + self.limits.request_timeout_s
                return True
        log.warning("refused a connection (HTTP %d); %d open", busy[0], len(self._keys))
        _answer_and_drop(request, refusal(*busy))
        return False

    def request_read(self, request: Any) -> bool:
        """The handler has read the whole request: from now on only the lifetime bounds it.
        False if the watchdog dropped it meanwhile (what was read may be cut short): the
        handler must not act on it."""
        with self._bounds_lock:
            if request in self._dropped:
                return False
            if request in self._deadlines:
                self._deadlines[request] = time.monotonic() + self.limits.lifetime_s
            return True

    def shutdown_request(self, request: Any) -> None:
        # Forget it (under the lock the watchdog holds) before the socket is closed, so the
        # watchdog never shuts down a file descriptor number that was reused meanwhile.
        with self._bounds_lock:
            self._deadlines.pop(request, None)
            self._dropped.discard(request)
            if request in self._keys:
                key = self._keys.pop(request)
                self._per_key[key] -= 1
                if self._per_key[key] <= 0:
                    del self._per_key[key]
        super().shutdown_request(request)  # type: ignore[misc]

    def server_close(self) -> None:
        closed = getattr(self, "_closed", None)  # None: the bind failed, before init_bounds
        if closed is not None:
            closed.set()
        super().server_close()  # type: ignore[misc]

    # ---- the watchdog -------------------------------------------------------------------------
    def _watchdog(self) -> None:
        while not self._closed.wait(WATCHDOG_INTERVAL_S):
            now = time.monotonic()
            with self._bounds_lock:
                for request, deadline in list(self._deadlines.items()):
                    if deadline <= now:
                        del self._deadlines[request]  # once: its thread ends and closes it
                        self._dropped.add(request)
                        with contextlib.suppress(OSError):
                            request.shutdown(socket.SHUT_RDWR)
                        log.info("dropped a connection that was too slow or too long")


def _answer_and_drop(request: Any, data: bytes) -> None:
    """Answer without ever blocking the accepting thread: a fresh socket's send buffer takes
    a short answer whole; if it does not, the client gets nothing and is closed anyway."""
    try:
        request.setblocking(False)
        with contextlib.suppress(OSError):
            request.recv(65536)  # what it sent already: closing with unread data resets TCP
        request.sendall(data)
    except OSError:
        pass
