"""`redis+sentinel://` URLs (jobs/redis_conn.py): parsed, or refused with one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from jobs.redis_conn import BadRedisUrl, RedisUnavailable, connect_redis, make_client, parse_sentinel_url, redact


def test_sentinel_url_with_password_hosts_service_and_db() -> None:
    target = parse_sentinel_url("redis+sentinel://:s%40cret@10.0.0.1:26379,head:26380,[::1]:26381/gpulab/2")
    assert target.sentinels == [("10.0.0.1", 26379), ("head", 26380), ("::1", 26381)]
    assert (target.service, target.db, target.username, target.password) == ("gpulab", 2, None, "s@cret")


def test_sentinel_url_defaults_to_db_0_without_password() -> None:
    target = parse_sentinel_url("redis+sentinel://h:1/mymaster")
    assert (target.sentinels, target.service, target.db, target.password) == ([("h", 1)], "mymaster", 0, None)


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://h/gpulab",  # no port
        "redis+sentinel://h:99999/gpulab",
        "redis+sentinel://h:1,/gpulab",
        "redis+sentinel://h:1",  # no service
        "redis+sentinel://h:1/gpulab/zero",
        "redis+sentinel://h:1/a/1/extra",
    ],
)
def test_bad_sentinel_urls_are_refused_with_one_line(url: str) -> None:
    with pytest.raises(BadRedisUrl):
        parse_sentinel_url(url)
    with pytest.raises(RedisUnavailable) as info:
        connect_redis(url.replace("h:", "user:pw@h:"), "scheduler")
    assert "bad [redis] url" in str(info.value) and "pw" not in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://user:pw@localhost:6379",  # not a Redis scheme
        "redis://user:pw@localhost:notaport/0",
        "redis://user:pw@localhost:6379/abc",  # redis-py would silently use db 0
        "redis://user:pw@localhost:6379/0?db=x",
        "redis://user:pw@[::1:6379/0",  # unbalanced IPv6 bracket
        "redis://user:pw@localhost:99999/0",
    ],
)
def test_bad_plain_urls_are_refused_with_one_line(url: str) -> None:
    """A mistyped URL is a bad [redis] url (one line, password masked), never a traceback of
    urllib's or redis-py's ValueError, and never a silent fall back to db 0."""
    with pytest.raises(RedisUnavailable) as info:
        connect_redis(url, "scheduler")
    assert "bad [redis] url" in str(info.value) and "pw" not in str(info.value) and "\n" not in str(info.value)


def test_daemons_refuse_a_bad_url_with_one_line(tmp_path: Path) -> None:
    """`gpulab scheduler` / `gpulab worker` / `gpulab doctor` with a URL that does not parse:
    one line each, no traceback, and no daemon left running."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    env = {**os.environ, "GPULAB_STATE_DIR": str(state), "GPULAB_REDIS_URL": "redis://localhost:notaport/0"}
    for command in (["scheduler"], ["worker", "--sim-gpus", "1x1GiB"], ["doctor"]):
        done = subprocess.run(
            [sys.executable, "-m", "cli", *command], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 1, (command, done.stderr)
        assert "Traceback" not in done.stderr, done.stderr
        assert "bad [redis] url" in done.stdout + done.stderr, (command, done.stdout, done.stderr)


def test_unknown_sentinel_service_is_one_short_line() -> None:
    """No sentinel answers (or none knows the service): a short line naming the sentinels and
    the service, not redis-py's MasterNotFoundError with the repr of a whole client in it."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(RedisUnavailable) as info:
        connect_redis(f"redis+sentinel://:pw@127.0.0.1:{port}/nosuch", "scheduler")
    line = str(info.value)
    assert f"127.0.0.1:{port}" in line and "'nosuch'" in line and "ConnectionPool" not in line, line
    assert "pw" not in line and "\n" not in line and len(line) < 400, line


@pytest.mark.parametrize(
    "url",
    [
        # A generated password (base64 has '/' and '+') pasted into the URL without escaping:
        "redis+sentinel://:Zq9/Xw@127.0.0.1:1/gpulab",
        "redis://:Zq9/Xw@127.0.0.1:1/0",
        "redis://:Zq9#Xw@127.0.0.1:1/0",
        "redis://:Zq9?Xw@127.0.0.1:1/0",
        "redis://user:Zq9:Xw@127.0.0.1:1/0",
        # redis-py also takes the password from the query string:
        "unix:///nonexistent/redis.sock?password=Zq9Xw",
        "redis://127.0.0.1:1/0?db=0&password=Zq9Xw",
    ],
)
def test_no_part_of_a_password_is_shown(url: str) -> None:
    """However the URL is mistyped, the line a daemon prints (into the journal) and doctor's
    show no piece of the password."""
    assert "Zq9" not in redact(url) and "Xw" not in redact(url), redact(url)
    with pytest.raises(RedisUnavailable) as info:
        connect_redis(url, "scheduler")
    assert "Zq9" not in str(info.value) and "Xw" not in str(info.value), str(info.value)


def test_a_daemon_cut_off_from_every_sentinel_logs_short_lines() -> None:
    """A daemon's retries log what Redis answered (the leader every 0.5 s): redis-py's
    MasterNotFoundError carried the repr of every sentinel's client, ~2 KB a line, which
    flooded the journal for as long as the sentinels were away."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    client = make_client(f"redis+sentinel://127.0.0.1:{port}/gpulab", timeout_s=1)
    with pytest.raises(redis.ConnectionError) as info:
        client.ping()
    assert "'gpulab'" in str(info.value) and len(str(info.value)) < 300, str(info.value)
