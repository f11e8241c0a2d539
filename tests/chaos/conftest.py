"""Fixtures for the chaos tests: a Redis of the test's own (killable, restartable with its
AOF) and a stack on it, and the marker file the jobs record their life in."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.chaos.markers import Marker
from tests.helpers.stack import Stack, free_port
from tests.helpers.users import shared_dir, users  # noqa: F401 (fixtures of tests/chaos/test_shim_server.py)


class OwnRedis:
    """A redis-server for one test: own port, own data dir, AOF on. kill() is kill -9;
    start() again replays the AOF from the same dir."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("no redis-server on PATH")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            binary,
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        probe = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + 30
        try:
            while True:
                try:
                    probe.ping()
                    return
                except redis.BusyLoadingError:
                    pass
                except redis.ConnectionError:
                    assert self.proc.poll() is None, f"redis-server exited; see {self.data_dir / 'redis.log'}"
                assert time.monotonic() < deadline, "redis-server did not answer"
                time.sleep(0.02)  # bounded start-up probe of a child we just spawned
        finally:
            probe.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path / "own-redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Marker]:
    folder = tmp_path / "chaos"
    folder.mkdir()
    m = Marker(folder)
    yield m
    m.kill_leftovers()


@pytest.fixture
def own_stack(tmp_path: Path, own_redis: OwnRedis) -> Iterator[Stack]:
    """A stack with the test defaults on the test's own Redis. At the end every daemon is
    resumed (a SIGSTOPped one would ignore the SIGTERM) and stopped."""
    s = Stack(tmp_path, own_redis.url, own_redis.client())
    yield s
    for daemon in s.daemons:
        if daemon.proc.poll() is None:
            daemon.proc.send_signal(signal.SIGCONT)
    s.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On a failure, attach the own stack's daemon output and the marker file to the report
    (tests/conftest.py attaches the `stack` fixture's daemons)."""
    outcome: Any = yield
    report = outcome.get_result()
    if not report.failed:
        return
    funcargs = getattr(item, "funcargs", {})
    s = funcargs.get("own_stack")
    if isinstance(s, Stack):
        for daemon in s.daemons:
            report.sections.append((f"daemon {daemon.proc.args!r}", "\n".join(daemon.lines[-200:])))
    m = funcargs.get("marker")
    if isinstance(m, Marker) and m.path.exists():
        report.sections.append(("marker file", m.path.read_text()))
