"""The shim fork server (worker/shim.py --serve, worker/shim_server.py) with real Unix users:
a forked shim is exactly what an exec'd one was - the job's user with only its own groups and
no way back to root, entering the job's directory as that user, holding no fd of the server,
not dumpable - and it dies with the server. (The gate, self-fencing, parent death and exit
statuses of served shims: tests/chaos/test_shim.py, which runs every test both ways.)"""

from __future__ import annotations

import json
import os
import pwd
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.chaos.markers import pid_alive
from tests.helpers.stack import eventually
from tests.helpers.users import needs_users
from worker.runner import SHIM_ENV, SHIM_PATH
from worker.shim import LAUNCH_FAILED_EXIT
from worker.shim_server import ServedShim, ShimServer

pytestmark = needs_users

PROBE = """
import json, os, sys
def ids(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid", "Groups", "PPid"):
                out[key] = value.split()
    return out
shim = os.getppid()
facts = {"me": ids("self"), "shim": ids(shim), "fds": sorted(os.listdir("/proc/self/fd")), "cwd": os.getcwd()}
try:
    open(f"/proc/{shim}/environ", "rb").read()
    facts["shim_environ"] = "readable"
except OSError as exc:
    facts["shim_environ"] = exc.strerror
server = int(facts["shim"]["PPid"][0])
try:
    os.kill(server, 0)
    facts["signal_server"] = "allowed"
except OSError as exc:
    facts["signal_server"] = exc.strerror
try:
    os.setuid(0)
    facts["setuid0"] = "allowed"
except OSError as exc:
    facts["setuid0"] = exc.strerror
json.dump(facts, open(sys.argv[1], "w"))
"""


@pytest.fixture
def server() -> Iterator[ShimServer]:
    srv = ShimServer(SHIM_PATH, SHIM_ENV, ["--node", "served-test", "--state-dir", "/nonexistent"])
    yield srv
    srv.close()


class Served:
    def __init__(self, server: ShimServer, user: pwd.struct_passwd, argv: list[str], cwd: str) -> None:
        stdin_r, stdin_w = os.pipe()
        report_r, report_w = os.pipe()
        log = os.open(os.devnull, os.O_WRONLY)
        groups = os.getgrouplist(user.pw_name, user.pw_gid)
        request = {
            "node": "served-test", "job": 9, "attempt": 1, "uid": user.pw_uid, "gid": user.pw_gid,
            "groups": groups, "umask": 0o022, "lease_ttl": 30.0, "kill_grace": 5.0,
        }  # fmt: skip
        self.proc: ServedShim = server.spawn(request, stdin_r, report_w, log, stdin_w)
        for fd in (stdin_r, report_w, log):
            os.close(fd)
        self.report = os.fdopen(report_r, "rb", buffering=0)
        env = {"PATH": "/usr/bin:/bin"}
        self.send("launch " + json.dumps({"argv": argv, "cwd": cwd, "env": env}))

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        os.write(self.proc.stdin.fileno(), (line + "\n").encode())

    def line(self) -> str:
        data = b""
        while not data.endswith(b"\n"):
            chunk = self.report.read(1)
            assert chunk, f"the shim closed its report pipe after {data!r}"
            data += chunk
        return data.decode().strip()


def test_served_job_is_its_user_only_and_cannot_reach_root(
    server: ShimServer, users: dict[str, pwd.struct_passwd], shared_dir: Path
) -> None:
    alice = users["gpulab-alice"]
    os.chown(shared_dir, alice.pw_uid, alice.pw_gid)
    out = shared_dir / "facts.json"
    probe = shared_dir / "probe.py"
    probe.write_text(PROBE)
    shim = Served(server, alice, ["/usr/bin/python3", "-I", str(probe), str(out)], str(shared_dir))
    ready = shim.line()
    assert ready.startswith("ready "), ready
    shim.send(f"go {time.monotonic()!r}")
    assert shim.line() == "started"
    assert shim.proc.wait(timeout=60) == 0
    facts = json.loads(out.read_text())
    uid, gid = str(alice.pw_uid), str(alice.pw_gid)
    groups = sorted(str(g) for g in os.getgrouplist(alice.pw_name, alice.pw_gid))
    for who in ("me", "shim"):  # real, effective, saved and filesystem ids: all alice's
        assert facts[who]["Uid"] == [uid] * 4 and facts[who]["Gid"] == [gid] * 4, facts[who]
        assert sorted(facts[who]["Groups"]) == groups, facts[who]  # none of root's groups
    assert facts["fds"] == ["0", "1", "2", "3"]  # 3: the probe's own open of /proc/self/fd
    assert facts["cwd"] == str(shared_dir)
    assert facts["shim_environ"] != "readable"  # not dumpable: the job cannot forge its shim's word
    assert facts["signal_server"] == "Operation not permitted"
    assert facts["setuid0"] == "Operation not permitted"


def test_served_shim_enters_the_directory_as_the_user_not_as_root(
    server: ShimServer, users: dict[str, pwd.struct_passwd], shared_dir: Path
) -> None:
    alice, bob = users["gpulab-alice"], users["gpulab-bob"]
    private = shared_dir / "bob-only"
    private.mkdir(mode=0o700)
    os.chown(private, bob.pw_uid, bob.pw_gid)
    ran = private / "ran"
    shim = Served(server, alice, ["/bin/touch", str(ran)], str(private))
    line = shim.line()
    assert line.startswith("fail cannot enter directory") and "Permission denied" in line, line
    assert shim.proc.wait(timeout=60) == LAUNCH_FAILED_EXIT
    assert not ran.exists()


def test_served_shims_die_with_their_server(
    server: ShimServer, users: dict[str, pwd.struct_passwd], shared_dir: Path
) -> None:
    """The server is killed (it dies with its worker): each shim's parent-death signal stops
    its job's whole tree, and the worker learns the shim is gone."""
    alice = users["gpulab-alice"]
    shim = Served(server, alice, ["/bin/sleep", "600"], str(shared_dir))
    child = int(shim.line().split()[1])
    shim.send(f"go {time.monotonic()!r}")
    assert shim.line() == "started"
    assert psutil.Process(child).uids().real == alice.pw_uid
    assert server.pid is not None
    os.kill(server.pid, signal.SIGKILL)
    lost = shim.line()
    assert lost.startswith("lost its worker died"), lost
    assert shim.proc.wait(timeout=60) is not None
    eventually(lambda: not pid_alive(child) and not pid_alive(shim.proc.pid), timeout=30)
    # and the next spawn starts a new server
    again = Served(server, alice, ["/bin/true"], str(shared_dir))
    assert again.line().startswith("ready ")
    again.send(f"go {time.monotonic()!r}")
    assert again.line() == "started"
    assert again.proc.wait(timeout=60) == 0
