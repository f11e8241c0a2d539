"""Shared fixtures: a real redis-server for the whole session (on a free port, AOF on, as in
production), a clean client per test, and `stack` / `make_stack`, which start real scheduler
and worker daemons as subprocesses (tests/helpers/stack.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis

from scheduler.redis_server import RedisServer
from tests.helpers.stack import Stack, free_port, test_config


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def make_stack(tmp_path: Path, redis_server: RedisServer, redis_client: redis.Redis) -> Iterator[Callable[..., Stack]]:
    """make_stack(scheduler={...}, worker={...}): a stack whose config overrides the test
    defaults. Every stack made is stopped at the end of the test."""
    made: list[Stack] = []

    def make(**sections: Mapping[str, Any]) -> Stack:
        root = tmp_path / f"stack{len(made)}" if made else tmp_path
        root.mkdir(exist_ok=True)
        made.append(Stack(root, redis_server.url, redis_client, config_text=test_config(**sections)))
        return made[-1]

    yield make
    for s in reversed(made):
        s.stop()


@pytest.fixture
def stack(make_stack: Callable[..., Stack]) -> Stack:
    """A stack with the test defaults."""
    return make_stack()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On a failure, attach the daemons' output to the report: the first thing one needs."""
    outcome = yield
    report = outcome.get_result()
    stack_fixture = getattr(item, "funcargs", {}).get("stack")
    if report.failed and isinstance(stack_fixture, Stack):
        for daemon in stack_fixture.daemons:
            report.sections.append((f"daemon {daemon.proc.args[3:]}", "\n".join(daemon.lines[-200:])))
