"""Round 2 red-team tests: breaks of the stated guarantees found by attacking the finished
trust work, each fixed after the test showed it."""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
from pathlib import Path

from jobs.api import job_path
from jobs.states import JobState
from tests.adversarial.support import api
from tests.chaos.markers import pid_alive
from tests.helpers.stack import Stack, eventually
from tests.helpers.users import as_user, needs_users

PATH_ENV = {"PATH": "/usr/bin:/bin"}
FINAL_STATES = (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


def _submit_as(stack: Stack, user: pwd.struct_passwd, spec: dict) -> tuple[int, object]:
    sock = stack.state_dir / "gpulab.sock"
    answer = as_user(user, lambda: api(sock, "POST", "/v1/jobs", spec))
    assert "ok" in answer, answer
    status, payload = answer["ok"]
    return status, payload


def _alice_workdir(users: dict[str, pwd.struct_passwd], shared_dir: Path, name: str) -> Path:
    alice = users["gpulab-alice"]
    work = shared_dir / name
    work.mkdir()
    os.chown(work, alice.pw_uid, alice.pw_gid)
    return work


def _run_script_as_alice(stack: Stack, users: dict[str, pwd.struct_passwd], work: Path, script: str, *args: str) -> int:
    """Submit `python3 -c script args...` as gpulab-alice, in `work`; its job id."""
    spec = {
        "command": ["/usr/bin/python3", "-c", script, *args],
        "cwd": str(work),
        "mem_bytes": 2**30,
        "env": PATH_ENV,
    }
    status, payload = _submit_as(stack, users["gpulab-alice"], spec)
    assert status == 200, payload
    return int(payload["id"])  # type: ignore[index]


# A job that forks a child and, microseconds later, SIGKILLs its own shim (its parent's parent:
# the shim runs as the job's user). The child was never seen by a heartbeat's `track`, and
# with the shim gone it reparents to init, out of every tree the worker looks at.
_KILL_SHIM = r"""
import os, signal, sys, time
pidfile, stopfile = sys.argv[1], sys.argv[2]
shim = os.getppid()
child = os.fork()
if child == 0:
    os.setsid()
    while not os.path.exists(stopfile):
        time.sleep(0.05)
    os._exit(0)
with open(pidfile, "w") as f:
    f.write(str(child))
os.kill(shim, signal.SIGKILL)
time.sleep(60)
"""


@needs_users
def test_job_that_kills_its_own_shim_leaves_no_process_behind(
    multi_stack: Stack, users: dict[str, pwd.struct_passwd], shared_dir: Path
) -> None:
    work = _alice_workdir(users, shared_dir, "alice-work")
    pidfile, stopfile = work / "escapee.pid", work / "stop"
    job_id = _run_script_as_alice(multi_stack, users, work, _KILL_SHIM, str(pidfile), str(stopfile))
    escapee = 0
    try:
        done = multi_stack.wait_state(job_id, *FINAL_STATES)
        escapee = int(pidfile.read_text())
        assert not pid_alive(escapee), (
            f"job {job_id} is {done.state.value} and its GPUs are free again, "
            f"but its process {escapee} (forked before it killed its shim) still runs"
        )
    finally:
        stopfile.touch()
        if escapee and pid_alive(escapee):
            with contextlib.suppress(OSError):
                os.kill(escapee, signal.SIGKILL)


# A job that tries to forge its shim's "ended" report (which makes the worker keep the job's own
# result over a stop): it writes the line into every descriptor of its shim it can open through
# /proc, then waits to be cancelled. The shim is not dumpable, so /proc/<shim>/fd is closed to
# the job's user, and the command never inherits the report pipe.
_FORGE_ENDED = r"""
import os, sys, time
opened = 0
shim = os.getppid()
for fd in range(256):
    try:
        f = os.open(f"/proc/{shim}/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        continue
    opened += 1
    try:
        os.write(f, b"ended\n")
    except OSError:
        pass
for fd in range(3, 256):
    try:
        os.write(fd, b"ended\n")
    except OSError:
        pass
with open(sys.argv[1], "w") as out:
    out.write(str(opened))
time.sleep(600)
"""


@needs_users
def test_a_job_cannot_forge_its_shims_ended_report(
    multi_stack: Stack, users: dict[str, pwd.struct_passwd], shared_dir: Path
) -> None:
    work = _alice_workdir(users, shared_dir, "alice-forge")
    report = work / "opened"
    job_id = _run_script_as_alice(multi_stack, users, work, _FORGE_ENDED, str(report))
    multi_stack.wait_state(job_id, JobState.RUNNING)
    eventually(lambda: report.exists() and report.read_text())
    assert report.read_text() == "0", "the job opened its shim's descriptors"
    cancel = as_user(
        users["gpulab-alice"],
        lambda: api(multi_stack.state_dir / "gpulab.sock", "POST", job_path(job_id, "cancel"), {}),
    )
    assert "ok" in cancel and cancel["ok"][0] == 200, cancel
    done = multi_stack.wait_state(job_id, *FINAL_STATES)
    assert done.state == JobState.CANCELLED, done  # a forged "ended" would have kept a signal exit
