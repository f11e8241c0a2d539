"""Breaks found while fixing issue 12 (API side): hostile HTTP that http.server or json
answered with a 5xx or a traceback, and connection floods and slowloris clients that held the
API's threads (one thread per connection, no cap, a per-read timeout only)."""

from __future__ import annotations

import json
import os
import pwd
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from cli.client import ApiClient
from jobs import keys
from jobs.api import API_PREFIX, ApiError
from jobs.states import JobState
from tests.adversarial.support import api
from tests.helpers.stack import Stack, eventually, test_config
from tests.helpers.users import as_user, needs_users

BASE = {"command": ["true"], "cwd": "/", "mem_bytes": 2**30, "env": {"PATH": "/usr/bin:/bin"}}


def _raw(sock: Path, data: bytes, timeout: float = 30) -> tuple[int, bytes]:
    """Send raw bytes; (status, body) of the answer, status 0 when closed without one."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(str(sock))
        conn.sendall(data)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    if not answer.startswith(b"HTTP/"):
        return 0, answer
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _one_line_error(body: bytes) -> str:
    error = json.loads(body)["error"]
    assert isinstance(error, str) and len(error.splitlines()) == 1, body
    return error


RAW_REQUESTS = {
    # http.server answers an unknown method with 501 and an HTML page: a 5xx for the client's mistake
    "unknown method": b"FROB /v1/jobs HTTP/1.1\r\nHost: x\r\n\r\n",
    "PUT": b"PUT /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    "DELETE a job": b"DELETE /v1/jobs/1 HTTP/1.1\r\nHost: x\r\n\r\n",
    # ... and an HTTP version it does not speak with 505
    "HTTP/2.0 request line": b"GET /v1/health HTTP/2.0\r\nHost: x\r\n\r\n",
    "garbage request line": b"\x00\x01\x02 \xff\r\n\r\n",
    "header line too long": b"GET /v1/health HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
    "too many headers": b"GET /v1/health HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",
}


@pytest.mark.parametrize("name", list(RAW_REQUESTS))
def test_malformed_http_gets_a_4xx_with_one_line_of_json(stack: Stack, name: str) -> None:
    stack.start_scheduler()
    status, body = _raw(stack.state_dir / "gpulab.sock", RAW_REQUESTS[name])
    assert 400 <= status < 500, f"{name}: HTTP {status} {body[:200]!r}"
    _one_line_error(body)
    assert stack.api.request("GET", f"{API_PREFIX}/health") == {"ok": True}


BAD_PATHS = ["/v1/jobs/-1", "/v1/jobs/abc", "/v1/jobs/1e309", f"/v1/jobs/{2**64}", "/v1/jobs/1/frob", "/etc/passwd",
             "/v1/jobs/1/log?offset=-5", "/v1/jobs/1/log?offset=1e309", "/v1/jobs/1/log?offset=1" + "0" * 5000,
             "/v1/jobs/1/wait?timeout=nan", "/v1/history?limit=1e309", "/v1/history?since=inf"]  # fmt: skip


@pytest.mark.parametrize("path", BAD_PATHS)
def test_bad_ids_and_parameters_get_a_4xx(stack: Stack, path: str) -> None:
    stack.start_scheduler()
    stack.submit("--hold", "--mem", "1GiB", "--", "true")  # job 1 exists
    status, answer = api(stack.state_dir / "gpulab.sock", "GET", path)
    assert 400 <= status < 500, f"{path}: HTTP {status} {answer}"
    assert len(str(answer["error"]).splitlines()) == 1


NON_JSON_NUMBERS = {
    # json.loads takes NaN, Infinity and 1e400 (-> inf) by default; they are not JSON
    "NaN time limit": b'{"command": ["true"], "cwd": "/", "mem_bytes": 1073741824, "time_limit_s": NaN}',
    "Infinity time limit": b'{"command": ["true"], "cwd": "/", "mem_bytes": 1073741824, "time_limit_s": Infinity}',
    "1e400 time limit": b'{"command": ["true"], "cwd": "/", "mem_bytes": 1073741824, "time_limit_s": 1e400}',
    "-Infinity priority": b'{"command": ["true"], "cwd": "/", "mem_bytes": 1073741824, "priority": -Infinity}',
}


@pytest.mark.parametrize("name", list(NON_JSON_NUMBERS))
def test_non_json_numbers_are_refused(stack: Stack, name: str) -> None:
    stack.start_scheduler()
    status, answer = api(stack.state_dir / "gpulab.sock", "POST", "/v1/jobs", raw=NON_JSON_NUMBERS[name])
    assert status == 400, f"{name}: HTTP {status} {answer}"
    assert stack.redis.get(keys.NEXT_JOB_ID) is None


def test_a_huge_array_text_is_refused_before_it_is_parsed_and_cached(stack: Stack) -> None:
    """Break (found): `array` had no length cap; jobs/arrays.py parse_array is lru_cached
    (1024 entries), so distinct ~1 MB array strings (duplicate indexes are valid) pin up to
    a GiB of the scheduler's memory."""
    stack.start_scheduler()
    spec = {**BASE, "array": ",".join(["0"] * 400_000), "hold": True}
    status, answer = api(stack.state_dir / "gpulab.sock", "POST", "/v1/jobs", spec)
    assert 400 <= status < 500 and "--array" in answer["error"], (status, answer)
    assert stack.redis.zcard(keys.PENDING) == 0


# ---- connections ---------------------------------------------------------------------------------

LIMITED = test_config(
    scheduler={"max_api_connections": 6, "max_api_connections_per_user": 3, "api_request_timeout_s": 2.0}
)


@pytest.fixture
def limited(shared_dir: Path, redis_server: Any, redis_client: redis.Redis) -> Iterator[Stack]:
    """A scheduler with small connection caps, its socket reachable by every local user."""
    (shared_dir / "lab").mkdir()
    stack = Stack(shared_dir / "lab", redis_server.url, redis_client, LIMITED)
    stack.start_scheduler()
    yield stack
    stack.stop()


def _idle(sock: Path, first_bytes: bytes = b"GET /v1/health HTTP/1.1\r\n") -> socket.socket:
    """A connection that starts a request and never finishes it."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(30)
    conn.connect(str(sock))
    conn.sendall(first_bytes)
    return conn


def _closed_by_server(conn: socket.socket) -> bool:
    try:
        return conn.recv(65536) == b""
    except (ConnectionResetError, TimeoutError):
        return False


def _served_again(stack: Stack) -> None:
    """Closed connections give their places back as their threads end, just after the close."""
    sock = stack.state_dir / "gpulab.sock"
    assert eventually(lambda: api(sock, "GET", f"{API_PREFIX}/health")[0] == 200, timeout=10)


def test_a_slowloris_client_is_dropped(limited: Stack) -> None:
    """Break (found): the handler's `timeout = 15` bounds each read, not the request: a client
    that sends a byte every few seconds holds its thread forever."""
    conn = _idle(limited.state_dir / "gpulab.sock", b"G")
    started = time.monotonic()
    try:
        conn.settimeout(1.0)
        dropped = False
        while time.monotonic() - started < 15:
            try:
                conn.sendall(b"E")  # a byte a second: each read completes well within any timeout
                if conn.recv(65536) == b"":
                    dropped = True
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                dropped = True
                break
        assert dropped, "the slow client still holds its connection after 15 s"
        assert time.monotonic() - started < 2.0 + 5, "dropped, but long after api_request_timeout_s"
    finally:
        conn.close()
    _served_again(limited)


@needs_users
def test_one_users_connections_cannot_lock_out_another(limited: Stack, users: dict[str, pwd.struct_passwd]) -> None:
    """Break (found): ThreadingMixIn serves every connection it accepts on a new thread, with
    no cap: one user's thousands of idle connections exhaust the scheduler's threads (and
    file descriptors) for everyone. Per-uid and total caps answer the excess at once."""
    sock = limited.state_dir / "gpulab.sock"
    mine = [_idle(sock) for _ in range(3)]  # root's (this process's) whole share
    try:
        status, answer = api(sock, "GET", f"{API_PREFIX}/health")
        assert status == 429 and "too many connections" in answer["error"], (status, answer)
        # another user is still served at once
        alice = as_user(users["gpulab-alice"], lambda: api(sock, "GET", f"{API_PREFIX}/jobs"))
        assert alice["ok"][0] == 200, alice
    finally:
        for conn in mine:
            conn.close()
    _served_again(limited)


def test_a_refused_client_reads_the_refusal_even_mid_send(limited: Stack) -> None:
    """Break (found, as a flaky BrokenPipe in the test above): the scheduler answers a refused
    connection at once and closes it without reading the request, so a client still sending
    got EPIPE and reported the scheduler unreachable instead of the refusal it had been sent.
    A 1 MB request cannot fit in the socket's buffer, so the send always fails here."""
    sock = limited.state_dir / "gpulab.sock"
    mine = [_idle(sock) for _ in range(3)]
    try:
        with pytest.raises(ApiError) as refused:
            ApiClient(sock).request("POST", f"{API_PREFIX}/jobs", {"padding": "x" * 1_000_000})
        assert refused.value.status == 429 and "too many connections" in str(refused.value)
        assert api(sock, "POST", f"{API_PREFIX}/jobs", raw=b"x" * 1_000_000)[0] == 429  # the tests' client too
    finally:
        for conn in mine:
            conn.close()
    _served_again(limited)


def test_idle_connections_are_dropped_and_their_places_freed(limited: Stack) -> None:
    sock = limited.state_dir / "gpulab.sock"
    held = [_idle(sock) for _ in range(3)]
    try:
        assert api(sock, "GET", f"{API_PREFIX}/health")[0] == 429
        assert all(_closed_by_server(conn) for conn in held), "idle connections were not dropped"
        _served_again(limited)
    finally:
        for conn in held:
            conn.close()


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_the_log_endpoint_reads_only_a_regular_file(stack: Stack, tmp_path: Path, kind: str) -> None:
    """Defence in depth: the scheduler (root) opened the job's log path with open(), following
    symlinks and blocking on a FIFO. Were a log path ever replaceable by its job's user, that
    would hand them any root-readable file, or hang an API thread for good."""
    stack.start_scheduler()
    stack.start_worker()
    job = stack.submit("--mem", "1GiB", "--", "true")
    record = stack.wait_state(job, JobState.COMPLETED)
    secret = tmp_path / "root-only"
    secret.write_text("root-only-data\n")
    secret.chmod(0o600)
    log = Path(record.log_path)
    log.unlink()
    # As for a job whose output left Redis (retention) or was never shipped (an older
    # worker): the scheduler falls back to the file on its own host.
    stack.redis.delete(keys.job_log(job), keys.job_log_meta(job))
    if kind == "symlink":
        log.symlink_to(secret)
    else:
        os.mkfifo(log)
    result = stack.cli("logs", str(job))
    assert result.returncode == 2 and "root-only-data" not in result.stdout, result
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
