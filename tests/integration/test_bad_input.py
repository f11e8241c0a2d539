"""Bad input: one clear line on stderr naming the field, exit code 2, nothing in Redis."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
from collections.abc import Iterator

import pytest
import redis

from jobs import keys
from scheduler.redis_server import RedisServer
from tests.helpers.stack import Stack

BAD_SUBMISSIONS = [
    (["--mem", "10XB", "--", "true"], "--mem"),
    (["--mem", "0.5", "--", "true"], "--mem"),
    (["--mem", "-3GiB", "--", "true"], "--mem"),
    (["--mem", "", "--", "true"], "--mem"),
    (["--gpus", "0", "--", "true"], "--gpus"),
    (["--gpus", "99", "--", "true"], "--gpus"),
    (["--gpus", "two", "--", "true"], "--gpus"),
    (["--time", "soon", "--", "true"], "--time"),
    (["--time", "0", "--", "true"], "--time"),
    (["--name", "../etc/passwd", "--", "true"], "--name"),
    (["--name", "bad\nname", "--", "true"], "--name"),
    (["--priority", "99999999", "--", "true"], "--priority"),
    ([], "command"),
    (["--"], "command"),
]


@pytest.fixture(scope="module")
def scheduler_only(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Stack]:
    """One scheduler (no worker) for every bad submission: none may store anything."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    stack = Stack(tmp_path_factory.mktemp("bad-input"), redis_server.url, client)
    stack.start_scheduler()
    yield stack
    stack.stop()
    client.close()


@pytest.mark.parametrize(("args", "field"), BAD_SUBMISSIONS)
def test_bad_submission_exits_2_with_one_line_and_stores_nothing(
    scheduler_only: Stack, args: list[str], field: str
) -> None:
    stack = scheduler_only
    result = stack.cli("submit", *args)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and field.lstrip("-") in lines[0].lower().replace("'", ""), result.stderr
    assert stack.redis.get(keys.NEXT_JOB_ID) is None
    assert stack.redis.zcard(keys.PENDING) == 0


def _raw(
    sock_path: str, method: str, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("localhost", timeout=10)
    conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.sock.connect(sock_path)
    # The server may answer (413) and close before taking the whole body: read the answer.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


BAD_BODIES = [
    b"not json",
    b"[]",
    json.dumps({"command": "echo hi", "cwd": "/"}).encode(),
    json.dumps({"command": ["echo"], "cwd": "relative"}).encode(),
    json.dumps({"command": ["echo"], "cwd": "/", "gpus": True}).encode(),
    json.dumps({"command": ["echo"], "cwd": "/", "mem_bytes": -1}).encode(),
    json.dumps({"command": ["echo"], "cwd": "/", "env": {"A": 1}}).encode(),
    json.dumps({"command": ["echo"], "cwd": "/", "surprise": 1}).encode(),
    json.dumps({"command": ["echo"], "cwd": "/", "time_limit_s": "NaN"}).encode(),
]


def test_api_refuses_malformed_requests_and_stores_nothing(stack: Stack) -> None:
    stack.start_scheduler()
    sock = str(stack.state_dir / "gpulab.sock")
    for body in BAD_BODIES:
        status, answer = _raw(sock, "POST", "/v1/jobs", body, {"Content-Length": str(len(body))})
        assert status == 400 and "\n" not in answer["error"], (body, answer)
    status, answer = _raw(sock, "POST", "/v1/jobs", b"x" * 10, {"Content-Length": str(2 * 1024 * 1024)})
    assert status == 413
    status, _ = _raw(sock, "GET", "/v1/nope", b"")
    assert status == 404
    assert stack.redis.get(keys.NEXT_JOB_ID) is None
    # The API is still serving.
    assert stack.cli("queue", "--json").returncode == 0


def test_unreachable_scheduler_prints_one_line_naming_the_socket(stack: Stack) -> None:
    result = stack.cli("queue")
    assert result.returncode == 1
    assert str(stack.state_dir / "gpulab.sock") in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "gpulab up" in result.stderr


def test_unknown_job_ids_exit_2(stack: Stack) -> None:
    stack.start_scheduler()
    for args in (["show", "42"], ["cancel", "42"], ["wait", "42"], ["logs", "42"], ["show", "abc"]):
        result = stack.cli(*args)
        assert result.returncode == 2, (args, result)
