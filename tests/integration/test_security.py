"""A shared server people can trust: per-user limits, hostile API input, hostile queue
payloads, secrets. (Per-user permissions need real Unix users: tests/integration/test_users.py.)"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rq import Queue

from jobs import keys
from jobs.api import API_PREFIX
from jobs.states import JobState
from scheduler.redis_server import RedisServer
from tests.helpers.stack import ROOT, Daemon, Stack, free_port


@pytest.fixture
def limited(make_stack: Callable[..., Stack]) -> Stack:
    stack = make_stack(scheduler={"max_pending_per_user": 2})
    stack.start_scheduler()  # no worker: submitted jobs stay PENDING
    return stack


def test_max_pending_per_user_refuses_past_the_limit_and_stores_nothing(limited: Stack) -> None:
    first = limited.submit("--mem", "1GiB", "--", "true")
    second = limited.submit("--hold", "--mem", "1GiB", "--", "true")  # HELD counts as waiting
    refused = limited.cli("submit", "--mem", "1GiB", "--", "true")
    assert refused.returncode == 2 and refused.stdout == ""
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "max_pending_per_user" in refused.stderr and "limit of 2" in refused.stderr
    assert limited.redis.zcard(keys.PENDING) == 2
    assert int(limited.redis.get(keys.NEXT_JOB_ID) or 0) == second  # no id taken, nothing stored

    assert limited.cli("cancel", str(first)).returncode == 0  # leaving PENDING frees a place
    third = limited.submit("--mem", "1GiB", "--", "true")
    array = limited.cli("submit", "--array", "0-1", "--mem", "1GiB", "--", "true")
    assert array.returncode == 2 and "adding 2" in array.stderr  # all or nothing
    assert limited.redis.zcard(keys.PENDING) == 2
    assert limited.store.waiting_count(limited.store.get(third).user) == 2  # type: ignore[union-attr]


def test_the_waiting_count_follows_every_transition(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker()
    job_id = stack.submit("--hold", "--mem", "1GiB", "--", "true")
    user = stack.store.get(job_id).user  # type: ignore[union-attr]
    assert stack.store.waiting_count(user) == 1
    assert stack.cli("release", str(job_id)).returncode == 0
    stack.wait_state(job_id, JobState.COMPLETED)
    assert stack.store.waiting_count(user) == 0


# ---- hostile input to the API -------------------------------------------------------------------


def _raw_request(sock_path: Path, data: bytes) -> tuple[int, bytes]:
    """Send raw bytes as one HTTP request; return (status, body). Status 0: closed without an answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(sock_path))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # a short body ends here: the server must not wait for more
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    if not answer.startswith(b"HTTP/"):
        return 0, answer
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _post(body: bytes, length: int | None = None) -> bytes:
    declared = len(body) if length is None else length
    head = f"POST {API_PREFIX}/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    return (head + f"Content-Length: {declared}\r\nConnection: close\r\n\r\n").encode() + body


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
_fields = st.fixed_dictionaries(
    {},
    optional={
        "command": _json | st.lists(st.text(max_size=10), max_size=3),
        "gpus": _json,
        "mem_bytes": _json,
        "env": _json,
        "cwd": _json,
        "priority": _json,
        "array": _json,
        "after_ok": _json,
        "user": _json,
        "time_limit_s": _json,
    },
)
_bodies = st.one_of(
    _json.map(lambda v: json.dumps(v).encode()),
    _fields.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    _fields.map(lambda v: json.dumps(v).encode()).flatmap(lambda b: st.integers(0, len(b)).map(lambda n: b[:n])),
)


@pytest.fixture
def api_stack(stack: Stack) -> Stack:
    stack.start_scheduler()
    return stack


def test_fuzzed_submit_bodies_never_break_the_api(api_stack: Stack) -> None:
    sock_path = api_stack.state_dir / "gpulab.sock"

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=_bodies, skew=st.sampled_from([0, 0, 0, -1, 1, 7, -5]))
    def check(body: bytes, skew: int) -> None:
        before = api_stack.redis.zcard(keys.PENDING)
        status, answer = _raw_request(sock_path, _post(body, max(0, len(body) + skew)))
        assert status != 500, answer
        if status == 0:
            return  # the server may hang up on a malformed request; it must keep serving (below)
        if status >= 400:
            assert api_stack.redis.zcard(keys.PENDING) == before, (body, answer)
            assert len(json.loads(answer)["error"].splitlines()) == 1
        else:
            assert status == 200 and "id" in json.loads(answer)

    check()
    for raw in (b"\xff\xfe{", b"{" * 5000 + b"}" * 5000, b'{"command": ["true"], "gpus": 1e400}'):
        status, _answer = _raw_request(sock_path, _post(raw))
        assert 400 <= status < 500
    status, _ = _raw_request(sock_path, _post(b"{}", length=10**9))
    assert status == 413
    assert api_stack.api.request("GET", f"{API_PREFIX}/health") == {"ok": True}  # still serving


# ---- hostile payloads on the node's RQ queue ------------------------------------------------------


class _Touch:
    """Unpickling this creates the marker file: what a pickle payload could do to a worker."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def test_a_pickled_payload_on_the_node_queue_is_never_executed(stack: Stack, tmp_path: Path) -> None:
    stack.start_scheduler()
    worker = stack.start_worker()
    marker = tmp_path / "pwned"
    hostile = Queue(keys.node_queue_name("n1"), connection=stack.redis, serializer=pickle)
    hostile.enqueue("subprocess.run", [sys.executable, "-c", f"open({str(marker)!r}, 'w')"], _Touch(marker))
    # Same FIFO queue: once a normal job after it has completed, the pickle was dequeued.
    job_id = stack.submit("--mem", "1GiB", "--", "true")
    stack.wait_state(job_id, JobState.COMPLETED)
    assert not marker.exists()
    assert worker.proc.poll() is None
    again = stack.submit("--mem", "1GiB", "--", "true")  # and it keeps serving
    stack.wait_state(again, JobState.COMPLETED)
    assert not marker.exists()


# ---- secrets ---------------------------------------------------------------------------------------


def test_export_and_env_file_choose_the_environment_and_values_stay_private(stack: Stack, tmp_path: Path) -> None:
    stack.start_scheduler()
    stack.start_worker()
    env_file = tmp_path / "secrets.env"
    env_file.write_text("# tokens\nexport API_TOKEN='tok-123-secret'\n\nOTHER=x=y\n")
    env_file.chmod(0o600)
    script = 'echo "$KEEP|$API_TOKEN|$OTHER|${DROP-unset}"'
    argv = [sys.executable, "-m", "cli", "submit", "--export", "KEEP", "--env-file", str(env_file)]
    argv += ["--mem", "1GiB", "--", "sh", "-c", script]
    env = dict(stack.env, KEEP="kept", DROP="dropped")
    result = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    job_id = int(result.stdout)
    stack.wait_state(job_id, JobState.COMPLETED)
    assert stack.wait_log(job_id, "kept|") == "kept|tok-123-secret|x=y|unset"
    shown = stack.cli("show", "--json", str(job_id))
    names = json.loads(shown.stdout)["spec"]["env"]
    assert {"KEEP", "API_TOKEN", "OTHER", "PATH"} <= set(names) and "DROP" not in names
    assert "tok-123-secret" not in shown.stdout + stack.cli("queue", "--all", "--json").stdout
    assert not any("tok-123-secret" in line for d in stack.daemons for line in d.lines)

    env_file.write_text("GOOD=1\nthis line has hunter2 in it\n")
    bad = stack.cli("submit", "--env-file", str(env_file), "--", "true")
    assert bad.returncode == 2 and "line 2" in bad.stderr and "hunter2" not in bad.stderr
    bad = stack.cli("submit", "--export", "NOT-A-NAME", "--", "true")
    assert bad.returncode == 2 and "--export" in bad.stderr


# ---- Redis with a password -------------------------------------------------------------------------


def test_a_redis_with_a_password_refuses_daemons_without_it(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", port=free_port(), password="pw-only-in-a-file")
    server.start()
    try:
        assert "pw-only-in-a-file" not in " ".join(server.command())
        assert (tmp_path / "redis" / "redis.conf").stat().st_mode & 0o777 == 0o600
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPULAB_")}
        env.update(GPULAB_STATE_DIR=str(tmp_path / "state"), GPULAB_REDIS_URL=server.url, PYTHONPATH=str(ROOT))
        argv = [sys.executable, "-m", "cli", "scheduler"]
        refused = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 1
        assert len(refused.stderr.strip().splitlines()) == 1
        assert server.url in refused.stderr and "refused the credentials" in refused.stderr

        wrong = server.url.replace("redis://", "redis://:wrong-secret@")
        refused = subprocess.run(argv, env=dict(env, GPULAB_REDIS_URL=wrong), capture_output=True, text=True)
        assert refused.returncode == 1 and "wrong-secret" not in refused.stderr and ":***@" in refused.stderr

        secret = tmp_path / "redis.password"
        secret.write_text("pw-only-in-a-file\n")
        secret.chmod(0o600)
        scheduler = Daemon(argv, dict(env, GPULAB_REDIS_PASSWORD_FILE=str(secret)))
        try:
            scheduler.wait_line("scheduler ready")
        finally:
            assert scheduler.stop() == 0
    finally:
        server.stop()
