"""Attack round 2 on the worker side: its orphan sweep, shim fork server and GPU claims.
Each test failed before its fix."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable

import psutil
import pytest

from jobs.states import JobState
from tests.chaos.markers import pid_alive
from tests.helpers.stack import Stack, eventually
from worker import shim_server
from worker.runner import SHIM_ENV, SHIM_PATH
from worker.shim_server import ServedShim, ShimServer, ShimServerError

FINAL_STATES = (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


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
        assert not pid_alive(escapee), (
            f"job {job_id} is {done.state.value}, but its process {escapee}, which names the shim "
            "in its command line, still runs"
        )
    finally:
        stopfile.touch()
        if escapee and pid_alive(escapee):
            with contextlib.suppress(OSError):
                os.kill(escapee, signal.SIGKILL)


def _request(job: int) -> dict[str, object]:
    return {"node": "served-test", "job": job, "attempt": 1, "uid": None, "gid": None, "groups": None,
            "umask": None, "lease_ttl": 30.0, "kill_grace": 5.0}  # fmt: skip


def _spawn(server: ShimServer, job: int) -> tuple[ServedShim | ShimServerError, int, list[int]]:
    """A spawn of job `job`'s shim: (the shim or the error, the inode of its stdin pipe, the
    caller's ends to close: a shim whose spawn failed is kept waiting for its launch)."""
    stdin_r, stdin_w = os.pipe()
    report_r, report_w = os.pipe()
    log = os.open(os.devnull, os.O_WRONLY)
    inode = os.fstat(stdin_r).st_ino
    try:
        shim: ServedShim | ShimServerError = server.spawn(_request(job), stdin_r, report_w, log, stdin_w)
    except ShimServerError as exc:
        shim = exc
    finally:
        for fd in (stdin_r, report_w, log):
            os.close(fd)
    return shim, inode, [report_r] if isinstance(shim, ServedShim) else [report_r, stdin_w]


def _pipe_stat(path: str) -> os.stat_result | None:
    found = os.stat(path)
    return found if stat.S_ISFIFO(found.st_mode) else None


def test_a_spawn_answered_late_is_not_taken_for_the_next_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """A spawn whose answer came after it gave up (the server or the whole worker was stopped
    past SPAWN_ANSWER_S) left that answer queued, and the next spawn took it: each launch after
    got the previous one's shim (its pid and pidfd), and failed ("not a child of its own")."""
    server = ShimServer(SHIM_PATH, SHIM_ENV, ["--node", "served-test", "--state-dir", "/nonexistent"])
    to_close: list[int] = []
    try:
        first, _, fds = _spawn(server, 1)  # starts the server
        to_close += fds
        assert isinstance(first, ServedShim), first
        assert server.pid is not None
        server_pid = server.pid
        os.kill(server_pid, signal.SIGSTOP)
        monkeypatch.setattr(shim_server, "SPAWN_ANSWER_S", 0.2)
        late, _, fds = _spawn(server, 2)
        to_close += fds
        assert isinstance(late, ShimServerError), late
        os.kill(server_pid, signal.SIGCONT)  # it serves the late request, then the next one
        monkeypatch.setattr(shim_server, "SPAWN_ANSWER_S", 30.0)
        third, inode, fds = _spawn(server, 3)
        to_close += fds
        assert isinstance(third, ServedShim), third
        # (Its fd 0 is the server's socket until the forked child has moved its own fds in.)
        stdin = eventually(lambda: _pipe_stat(f"/proc/{third.pid}/fd/0"))
        assert stdin.st_ino == inode, f"the spawn of job 3 was answered with pid {third.pid}, the late shim of job 2"
        first.kill()
        third.kill()
        first.wait(timeout=30)
        third.wait(timeout=30)
    finally:
        server.close()
        for fd in to_close:
            os.close(fd)


def _queued_for(pid: int) -> int:
    """Bytes waiting in process `pid`'s fd 0 (a Unix socket: the fork server's), per `ss`."""
    out = subprocess.run(["ss", "-x", "-a", "-p"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if f"pid={pid},fd=0)" in line:
            return int(line.split()[2])
    return 0


def _fork_server(worker_pid: int) -> int:
    return next(c.pid for c in psutil.Process(worker_pid).children() if "--serve" in c.cmdline())


def test_a_launch_whose_fork_server_died_waits_again_instead_of_failing(stack: Stack) -> None:
    """The fork server died while a launch waited for its shim: nothing of the job ran and
    nothing was wrong with it, yet it failed for good (LaunchFailed)."""
    stack.start_scheduler()
    worker = stack.start_worker()
    first = stack.submit("--", "true")
    stack.wait_state(first, JobState.COMPLETED)  # the fork server runs now
    server = _fork_server(worker.proc.pid)
    os.kill(server, signal.SIGSTOP)
    job = stack.submit("--", "true")
    eventually(lambda: _queued_for(server) > 0)  # its spawn request waits in the server's socket
    os.kill(server, signal.SIGKILL)
    done = stack.wait_state(job, *FINAL_STATES, JobState.HELD)
    assert done.state == JobState.COMPLETED, (done.state, done.reason, done.detail)


# A job whose escapee leaves its session and keeps a zombie child it never reaps, then kills
# its shim. The worker's sweep killed the escapee's tree waiting for each member to be gone,
# and a zombie never is while its parent lives: 50 rounds of 0.2 s (10 s) per such escapee,
# while the job's lease was no longer renewed (its runner already forgotten) and every other
# sweep (a launch's server start, each unclean end, the heartbeat's own) waited behind it.
_ZOMBIE_KEEPER = r"""
import os, signal, sys, time
pidfile = sys.argv[1]
shim = os.getppid()
r, w = os.pipe()
keeper = os.fork()
if keeper == 0:
    os.setsid()
    zombie = os.fork()
    if zombie == 0:
        os._exit(0)
    while open(f"/proc/{zombie}/stat").read().rpartition(")")[2].split()[0] != "Z":
        time.sleep(0.01)
    os.write(w, b"x")
    time.sleep(1000)  # never reaps it
    os._exit(0)
os.read(r, 1)
with open(pidfile, "w") as f:
    f.write(str(keeper))
os.kill(shim, signal.SIGKILL)
time.sleep(60)
"""


def test_an_escapee_that_keeps_a_zombie_child_does_not_stall_the_sweep(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker()
    pidfile = stack.tmp_path / "keeper.pid"
    job_id = stack.submit("--mem", "1GiB", "--", sys.executable, "-c", _ZOMBIE_KEEPER, str(pidfile))
    done = stack.wait_state(job_id, *FINAL_STATES)
    keeper = int(pidfile.read_text())
    try:
        assert "lease expired" not in done.detail, (
            f"job {job_id}'s end was not recorded by its worker: {done.reason} ({done.detail})"
        )
        assert not pid_alive(keeper)
    finally:
        if pid_alive(keeper):
            os.kill(keeper, signal.SIGKILL)


@pytest.mark.parametrize("lease_s", [3.0, 0.8])
def test_an_array_of_jobs_that_kill_their_shims_leaving_escapees_is_recorded_by_its_worker(
    make_stack: Callable[..., Stack], lease_s: float
) -> None:
    """200 jobs, each leaving two setsid'd escapees (one with children) and killing its shim:
    the orphan sweep killed each orphan's tree with a read of the whole process table per
    orphan, and held the heartbeat (or the ends) for seconds: every job's lease lapsed and
    the scheduler declared them all lost with their node ('lease expired'). And a job's lease
    was no longer renewed once its shim had exited, while the worker killed what it left: a
    short lease (or a loaded machine: once in a CI run) lapsed before the end was recorded."""
    stack = make_stack(worker={"lease_ttl_s": lease_s, "heartbeat_interval_s": lease_s / 4})
    stack.start_scheduler()
    worker = stack.start_worker()
    escape = "setsid sleep 1007 & setsid sh -c 'sleep 1007 & sleep 1007' & kill -9 $PPID; sleep 1007"
    first = stack.submit("--mem", "100MiB", "--array", "0-199", "--", "sh", "-c", escape)
    ends = [stack.wait_state(job_id, *FINAL_STATES) for job_id in range(first, first + 200)]
    lapsed = [(r.id, r.detail) for r in ends if "lease expired" in r.detail]
    assert not lapsed, f"{len(lapsed)} of 200 ends not recorded by the worker: their leases lapsed, e.g. {lapsed[:3]}"
    eventually(lambda: len(psutil.Process(worker.proc.pid).children()) <= 1)  # its fork server


def test_a_job_that_stops_its_shim_does_not_hold_up_the_others_when_the_server_dies(stack: Stack) -> None:
    """The fork server died (killed by root, or by the OOM killer) and the worker reported its
    shims' ends one after the other, each once it was gone: a shim its job had SIGSTOPped
    (same user) never goes by itself, and every other job's end waited behind it."""
    stack.start_scheduler()
    worker = stack.start_worker()
    stopper = stack.submit("--mem", "1GiB", "--", "sh", "-c", "kill -STOP $PPID; sleep 1000")
    stack.wait_state(stopper, JobState.RUNNING)
    other = stack.submit("--mem", "1GiB", "--", "sleep", "1000")
    stack.wait_state(other, JobState.RUNNING)
    os.kill(_fork_server(worker.proc.pid), signal.SIGKILL)
    done = stack.wait_state(other, *FINAL_STATES, JobState.PENDING)
    assert done.state == JobState.FAILED, (done.state, done.reason, done.detail)
    assert stack.cli("cancel", str(stopper)).returncode == 0  # its shim is killed then
    stack.wait_state(stopper, *FINAL_STATES)
