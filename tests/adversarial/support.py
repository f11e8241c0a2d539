"""Helpers for the adversarial tests. Product-independent on purpose: raw HTTP on the API
socket, raw Redis reads of job hashes (a poisoned record cannot be parsed), and the CLI's
argv as the `stack` fixture runs it (so these tests follow the CLI wherever it moves)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobs import keys
from jobs.record import JobRecord
from tests.helpers.stack import WAIT_S, Daemon, Stack

FINAL = ("COMPLETED", "FAILED", "CANCELLED")
# C0 control characters (and DEL) other than newline and tab: what must never reach a terminal raw.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
HOSTILE_TEXT = "\x1b]0;pwned\x07\x1b[2J"


def control_chars(text: str) -> list[str]:
    return sorted(set(_CONTROL_RE.findall(text)))


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def api(sock: Path, method: str, path: str, body: Any = None, *, raw: bytes | None = None) -> tuple[int, Any]:
    """One request on the scheduler's Unix socket: (HTTP status, decoded JSON or the raw text)."""
    conn = _UnixHTTP(str(sock), 30)
    try:
        payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        # refused over the connection caps: the answer was sent before the close
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(data)
    except ValueError:
        return response.status, data.decode(errors="replace")


def raw_job(stack: Stack, job_id: int) -> dict[str, str]:
    return {k.decode(): v.decode(errors="replace") for k, v in stack.redis.hgetall(keys.job(job_id)).items()}


def wait_raw(
    stack: Stack, job_id: int, predicate: Callable[[dict[str, str]], bool], timeout: float = WAIT_S
) -> dict[str, str]:
    """Like stack.wait_for, on the raw hash, awaiting the job's event stream (every transition
    writes one): works for records that no longer parse."""
    stream = keys.job_events(job_id)
    tail = stack.redis.xrevrange(stream, count=1)
    last = tail[0][0].decode() if tail else "0-0"
    deadline = time.monotonic() + timeout
    while True:
        current = raw_job(stack, job_id)
        if current and predicate(current):
            return current
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"job {job_id} never matched; now {current}")
        for _name, entries in stack.redis.xread({stream: last}, block=max(1, int(min(remaining, 1.0) * 1000))) or []:
            last = entries[-1][0].decode()


def wait_final_or_dead(stack: Stack, job_id: int, daemon: Daemon, timeout: float = WAIT_S) -> JobRecord | None:
    """Await the job's end (its event stream), giving up early when `daemon` has died:
    a dead scheduler will never finish anything, so there is no point waiting it out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and daemon.proc.poll() is None:
        record = stack.store.wait_for(job_id, lambda r: r.is_final, 0.5)
        if record is not None and record.is_final:
            return record
    return stack.store.get(job_id)


def cli_argv(stack: Stack) -> list[str]:
    """The argv prefix the stack runs the CLI with (`python -m <module>`)."""
    if stack.scheduler is not None:
        return list(stack.scheduler.proc.args[:-1])  # [python, -m, module] + ["scheduler"]
    return [sys.executable, "-m", "cli"]


def unblock_fifo(path: Path | str, data: str = "0") -> None:
    """Feed a FIFO whose reader is (maybe) blocked on it; never block the test if none is."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return  # nobody reads it (any more), or it is gone
    try:
        os.write(fd, data.encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def hold_script(before: str = "") -> list[str]:
    """argv of a /bin/sh job (runnable by any user) that runs `before`, prints 'holding', then
    blocks on the FIFO given as $1 until the test writes an exit code into it."""
    script = f'{before}\necho holding\nread code < "$1"\nexit "${{code:-0}}"'
    return ["/bin/sh", "-c", script, "sh"]
