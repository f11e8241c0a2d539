"""Two real Unix users for multi-user tests (created when running as root; the tests that
need them skip otherwise, with the reason), a directory they can all reach, and a way to
act as one of them from inside the test process."""

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

USERS = ("gpulab-alice", "gpulab-bob")
needs_users = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("useradd") is None,
    reason="multi-user tests need root and useradd (jobs run as two real Unix users)",
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
