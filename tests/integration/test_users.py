"""Several Unix users on one server: each job runs as its submitter; identity comes from the
socket (SO_PEERCRED). Needs root to create the users; skipped otherwise, with the reason."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from jobs.client import ApiClient
from jobs.states import JobState
from scheduler.redis_server import RedisServer
from tests.conftest import TEST_CONFIG, Stack

USERS = ("gpulab-alice", "gpulab-bob")
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("useradd") is None,
    reason="multi-user tests need root and useradd (to create two real Unix users)",
)


@pytest.fixture(scope="module")
def users() -> dict[str, pwd.struct_passwd]:
    for name in USERS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
    return {name: pwd.getpwnam(name) for name in USERS}


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user can reach (pytest's own tmp dir is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="gpulab-users-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def multi_stack(
    tmp_path: Path, shared_dir: Path, redis_server: RedisServer, redis_client: redis.Redis
) -> Iterator[Stack]:
    config = TEST_CONFIG.replace("[scheduler]\n", f'[scheduler]\nsocket = "{shared_dir / "gpulab.sock"}"\n')
    stack = Stack(tmp_path, redis_server.url, redis_client, config)
    stack.start_scheduler()
    stack.start_worker()
    yield stack
    stack.stop()


def as_user(user: pwd.struct_passwd, action: Callable[[], Any]) -> Any:
    """Run `action` in a forked child that has become `user`; return its JSON result.
    (Forking keeps the already-loaded interpreter: the venv's python is not readable by others.)"""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        try:
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            result: Any = {"ok": action()}
        except Exception as exc:  # report, never return into pytest from the child
            result = {"error": f"{type(exc).__name__}: {exc}"}
        os.write(write_fd, json.dumps(result).encode())
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def test_job_runs_as_its_submitter_and_its_files_are_theirs(
    multi_stack: Stack, users: dict[str, pwd.struct_passwd], shared_dir: Path
) -> None:
    alice = users["gpulab-alice"]
    workdir = shared_dir / "alice-work"
    workdir.mkdir()
    os.chown(workdir, alice.pw_uid, alice.pw_gid)
    client = ApiClient(shared_dir / "gpulab.sock")
    spec = {"command": ["id", "-u"], "cwd": str(workdir), "mem_bytes": 2**30, "env": {"PATH": "/usr/bin:/bin"}}
    answer = as_user(alice, lambda: client.submit(spec))
    job_id = int(answer["ok"])
    done = multi_stack.wait_state(job_id, JobState.COMPLETED)
    assert (done.user, done.uid) == ("gpulab-alice", alice.pw_uid)
    log = Path(done.log_path)
    assert log.read_text().strip() == str(alice.pw_uid)
    assert (log.stat().st_uid, log.stat().st_mode & 0o777) == (alice.pw_uid, 0o600)


def test_root_job_still_runs_as_root(multi_stack: Stack) -> None:
    job_id = multi_stack.submit("--mem", "1GiB", "--", "id", "-u")
    done = multi_stack.wait_state(job_id, JobState.COMPLETED)
    assert Path(done.log_path).read_text().strip() == "0"
