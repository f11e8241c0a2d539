"""Fixtures for the adversarial (red) tests: the shared ones re-exported, plus two wrappers
around the test Stack: one whose state directory every local user can reach (so a job running
as a real user can write its status file, and the API socket answers them), one with the
status page and metrics port switched on."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.helpers.stack import Stack, free_port
from tests.helpers.users import shared_dir, users

__all__ = ["multi_stack", "shared_dir", "users", "web_stack"]


@pytest.fixture
def multi_stack(shared_dir: Path, redis_server: Any, redis_client: redis.Redis) -> Iterator[Stack]:
    """Scheduler + worker (as root) with the state dir and socket inside a 0755 directory."""
    root = shared_dir / "lab"
    root.mkdir()
    stack = Stack(root, redis_server.url, redis_client)
    stack.start_scheduler()
    stack.start_worker()
    yield stack
    stack.stop()


@pytest.fixture
def web_stack(make_stack: Callable[..., Stack]) -> Stack:
    """A stack whose scheduler also serves the status page; `stack.web_port` is its port."""
    port = free_port()
    stack = make_stack(scheduler={"metrics_port": port, "metrics_bind": "127.0.0.1"})
    stack.web_port = port  # type: ignore[attr-defined]
    return stack
