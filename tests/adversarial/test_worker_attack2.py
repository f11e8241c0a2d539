"""Attack round 2 on the worker side: its orphan sweep, shim fork server and GPU claims.
Each test failed before its fix."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from jobs.states import JobState
from tests.helpers.stack import Stack
from worker.runner import SHIM_PATH

FINAL_STATES = (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")


# A job that forks an escapee, has it leave its session and re-exec itself with the shim's
# path in its command line (as a shim not yet registered looks to the worker's orphan sweep),
# and once it does, SIGKILLs its own shim: the escapee is adopted by the worker.
_FAKE_SHIM = r"""
import os, signal, sys, time
pidfile, stopfile, shim_path = sys.argv[1], sys.argv[2], sys.argv[3]
shim = os.getppid()
child = os.fork()
if child == 0:
    os.setsid()
    loop = "import os, sys, time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.05)"
    os.execv(sys.executable, [sys.executable, "-c", loop, stopfile, shim_path])
while shim_path.encode() not in open(f"/proc/{child}/cmdline", "rb").read():
    time.sleep(0.01)
with open(pidfile, "w") as f:
    f.write(str(child))
os.kill(shim, signal.SIGKILL)
time.sleep(60)
"""


def test_an_orphan_that_names_the_shim_in_its_command_line_is_still_killed(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker()
    pidfile, stopfile = stack.tmp_path / "escapee.pid", stack.tmp_path / "stop"
    job_id = stack.submit("--", sys.executable, "-c", _FAKE_SHIM, str(pidfile), str(stopfile), SHIM_PATH)
    escapee = 0
    try:
        done = stack.wait_state(job_id, *FINAL_STATES)
        escapee = int(pidfile.read_text())
        assert not _pid_alive(escapee), (
            f"job {job_id} is {done.state.value}, but its process {escapee}, which names the shim "
            "in its command line, still runs"
        )
    finally:
        stopfile.touch()
        if escapee and _pid_alive(escapee):
            with contextlib.suppress(OSError):
                os.kill(escapee, signal.SIGKILL)
