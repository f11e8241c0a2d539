"""`gpulab run` under a real pseudo-terminal (pexpect) on the real stack: a shell on the
assigned GPU, the exit code passed through, Ctrl-C while waiting cancels, Ctrl-C while
attached reaches the program, and a killed client ends the job. One stack for the module."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pexpect
import psutil
import pytest
import redis

from jobs import keys
from jobs.states import JobState
from scheduler.redis_server import RedisServer
from tests.helpers.stack import WAIT_S, Stack, eventually


@pytest.fixture(scope="module")
def run_stack(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Stack]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    stack = Stack(tmp_path_factory.mktemp("run"), redis_server.url, client)
    stack.start_scheduler()
    stack.start_worker("n1", "1x24GiB")
    yield stack
    stack.stop()
    client.close()
    shutil.rmtree(runtime_dir(stack), ignore_errors=True)


def runtime_dir(stack: Stack) -> Path:
    """Where the client makes its private session directory: a place every user can reach
    (pytest's tmp dirs are private to root), so only the session directory's own mode counts."""
    if not hasattr(stack, "runtime"):
        stack.runtime = Path(tempfile.mkdtemp(prefix="gpulab-xdg-"))  # type: ignore[attr-defined]
        stack.runtime.chmod(0o711)  # type: ignore[attr-defined]
    return stack.runtime  # type: ignore[attr-defined,no-any-return]


def spawn(stack: Stack, *args: str) -> pexpect.spawn:
    env = dict(stack.env, PS1="gpulab-prompt$ ", TERM="dumb", XDG_RUNTIME_DIR=str(runtime_dir(stack)))
    return pexpect.spawn(sys.executable, ["-m", "cli", "run", *args], env=env, cwd=str(stack.tmp_path),
                         timeout=WAIT_S, encoding="utf-8", dimensions=(30, 100))  # fmt: skip


def _running(*argv: str) -> bool:
    return any(p.info["cmdline"] == list(argv) for p in psutil.process_iter(["cmdline"]))


def job_id_of(child: pexpect.spawn, state: str) -> int:
    """The job id from the client's `gpulab run: job N ...` line about `state`."""
    child.expect(rf"gpulab run: job (\d+) {state}")
    return int(child.match.group(1))


def test_a_shell_on_the_gpu_with_its_exit_code(run_stack: Stack) -> None:
    child = spawn(run_stack, "--mem", "2GiB", "--", "sh", "-i")
    job_id = job_id_of(child, "running on n1 GPU 0")
    child.expect("gpulab-prompt")
    child.sendline("test -t 0 && echo TTY=yes; echo GPU=$CUDA_VISIBLE_DEVICES; stty size")
    child.expect("TTY=yes")
    child.expect("GPU=GPU-sim-n1-0")
    child.expect("30 100")  # the client's window size reached the job's terminal
    child.setwinsize(40, 120)
    child.sendline("stty size")
    child.expect("40 120")
    child.expect("gpulab-prompt")  # the prompt after `stty size`, so the next one is the shell's answer to ^C
    child.sendline("sleep 3017")
    # ^C before the shell has started sleep would reach the shell instead (and sleep would then
    # swallow `exit 7`): send it once the program runs.
    assert eventually(lambda: _running("sleep", "3017"), timeout=WAIT_S)
    child.sendintr()  # Ctrl-C goes to the program, as under srun --pty: the shell lives on
    child.expect("gpulab-prompt")
    assert not _running("sleep", "3017")
    child.sendline("exit 7")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 7
    job = run_stack.wait_state(job_id, JobState.FAILED)
    assert (job.reason, job.exit_code) == ("ExitCode", 7)  # the allocation ended with the session


def test_ctrl_c_while_waiting_cancels_the_job(run_stack: Stack) -> None:
    blocker = run_stack.submit("--", "sleep", "600")  # the whole GPU
    run_stack.wait_state(blocker, JobState.RUNNING)
    try:
        child = spawn(run_stack, "--mem", "2GiB", "--", "sh")
        job_id = job_id_of(child, "PENDING: Resources")
        # Another user cannot reach the session's socket (its directory is 0700).
        (session,) = runtime_dir(run_stack).glob("gpulab-run-*")
        assert stat.S_IMODE(session.stat().st_mode) == 0o700
        if os.geteuid() == 0:
            probe = "import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"
            other = subprocess.run(["/usr/bin/python3", "-c", probe, str(session / "s")], capture_output=True,
                                   text=True, user=65534, group=65534, cwd="/", timeout=60)  # fmt: skip
            assert other.returncode != 0 and "PermissionError" in other.stderr
        child.sendintr()
        child.expect("interrupted while waiting: cancelled job")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 130
        assert run_stack.wait_state(job_id, JobState.CANCELLED).started_at is None
    finally:
        run_stack.cli("cancel", str(blocker))
        run_stack.wait_state(blocker, JobState.CANCELLED)


def test_a_killed_client_ends_the_job(run_stack: Stack) -> None:
    child = spawn(run_stack, "--mem", "2GiB", "--", "sh", "-i")
    job_id = job_id_of(child, "running")
    child.expect("gpulab-prompt")
    child.sendline("echo $$ > shell.pid")
    child.expect("gpulab-prompt")
    shell_pid = int(eventually(lambda: (run_stack.tmp_path / "shell.pid").read_text().strip()))
    os.kill(child.pid, signal.SIGKILL)
    ended = run_stack.wait_state(job_id, JobState.FAILED, JobState.COMPLETED)
    assert ended.exit_code == 129  # the relay hung up the shell's terminal, then ended
    with pytest.raises(ProcessLookupError):
        os.kill(shell_pid, 0)


def test_a_client_killed_while_waiting_never_runs_the_program(run_stack: Stack) -> None:
    blocker = run_stack.submit("--", "sleep", "600")
    run_stack.wait_state(blocker, JobState.RUNNING)
    marker = run_stack.tmp_path / "ran"
    child = spawn(run_stack, "--mem", "2GiB", "--", "touch", str(marker))
    job_id = job_id_of(child, "PENDING")
    os.kill(child.pid, signal.SIGKILL)
    run_stack.cli("cancel", str(blocker))
    ended = run_stack.wait_state(job_id, JobState.FAILED)
    assert ended.exit_code == 129 and not marker.exists()
    assert "the session that asked for this job is gone" in run_stack.cli("logs", str(job_id)).stdout


def test_bad_input_is_one_line_and_exit_2_with_nothing_queued(run_stack: Stack) -> None:
    before = run_stack.redis.get(keys.NEXT_JOB_ID)
    for args in (["--array", "0-3", "--", "sh"], ["--mem", "3XB", "--", "sh"], ["--gpus", "0", "--", "sh"]):
        result = run_stack.cli("run", *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, (args, result.stderr)
        assert result.stderr.startswith("gpulab: ")
    assert run_stack.redis.get(keys.NEXT_JOB_ID) == before  # not even an id taken
