"""Breaks found while fixing issue 12 (state side): who may replace the API socket, run a
second embedded Redis on the same AOF, write into the state directory, or fill Redis with
one user's waiting jobs."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from cli.client import ApiClient
from jobs import keys
from jobs.api import API_PREFIX
from jobs.states import JobState
from scheduler.redis_server import RedisServer, RedisServerError
from tests.adversarial.support import cli_argv
from tests.helpers.stack import Daemon, Stack, free_port


def test_a_scheduler_on_another_state_dir_does_not_take_over_a_live_socket(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    """Break (found): the state-dir lock alone does not cover `[scheduler] socket` set to the
    same path for two state dirs: the second scheduler would unlink the live socket. It now
    refuses a socket path another scheduler holds (its lock, `<socket>.lock`) or something
    answers on."""
    shared_socket = tmp_path / "run" / "gpulab.sock"
    first = make_stack(scheduler={"socket": str(shared_socket)})
    first.start_scheduler()
    second = make_stack(scheduler={"socket": str(shared_socket)})
    daemon = Daemon([*cli_argv(first), "scheduler"], second.env)
    assert daemon.proc.wait(timeout=60) == 1, daemon.lines
    assert first.scheduler is not None and first.scheduler.proc.poll() is None
    holder = f"gpulab scheduler is already running (pid {first.scheduler.proc.pid})"
    assert any(holder in line for line in daemon.lines), daemon.lines
    assert ApiClient(shared_socket).request("GET", f"{API_PREFIX}/health") == {"ok": True}


def test_a_killed_scheduler_leaves_no_lock_and_its_stale_socket_is_replaced(stack: Stack) -> None:
    """Guard for the lock: flock dies with the process, so SIGKILL leaves nothing that stops
    the next scheduler, and the socket file it left behind (answering no one) is replaced."""
    first = stack.start_scheduler()
    first.stop(signal.SIGKILL)
    assert (stack.state_dir / "gpulab.sock").exists()
    stack.start_scheduler()
    assert stack.cli("queue").returncode == 0


def test_a_second_embedded_redis_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    """Break (found): RedisServer.start ran a second redis-server on the same data dir (same
    AOF), and with a Unix socket redis-server unlinks the live one's socket at start."""
    data = tmp_path / "redis"
    first = RedisServer(data, port=free_port())
    first.start()
    try:
        second = RedisServer(data, port=free_port())
        with pytest.raises(RedisServerError, match="already running"):
            second.start()
        assert second.proc is None
        assert first.proc is not None and first.proc.poll() is None
        assert (data / "redis.lock").read_text().strip() == str(first.proc.pid)
    finally:
        first.stop()
    again = RedisServer(data, port=free_port())  # stopped: free again
    again.start()
    again.stop()


def test_the_state_dir_is_not_left_writable_by_others(make_stack: Callable[..., Stack]) -> None:
    """Break (found): the scheduler used the state dir as it found it; a 0777 one (a typo in
    a provisioning script, or `mkdir -m 777`) lets any user replace the API socket between
    runs, or plant the lock file. It is tightened to 0755 at start; the lock file is 0600."""
    stack = make_stack()
    stack.state_dir.chmod(0o777)
    stack.start_scheduler()
    assert stat.S_IMODE(stack.state_dir.stat().st_mode) == 0o755
    assert stat.S_IMODE((stack.state_dir / "scheduler.lock").stat().st_mode) == 0o600
    assert (stack.state_dir / "scheduler.lock").read_text().strip() == str(stack.scheduler.proc.pid)  # type: ignore[union-attr]


def test_a_shared_socket_directory_is_refused(make_stack: Callable[..., Stack], tmp_path: Path) -> None:
    """A socket in a directory every user may write to (sticky like /tmp, or not) can be
    replaced or squatted by anyone: refused with one line, exit 1."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    stack = make_stack(scheduler={"socket": str(shared / "gpulab.sock")})
    result = stack.cli("scheduler")
    assert result.returncode == 1, result
    assert "writable by every user" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_one_users_waiting_jobs_are_capped_in_bytes(make_stack: Callable[..., Stack], tmp_path: Path) -> None:
    """Break 7 again, by single submits: the per-submit cap alone lets a user store
    max_pending_per_user (10000) jobs x 384 KiB of argv and environment = 3.8 GB. The bytes
    of a user's waiting specs are capped too, and follow every transition."""
    stack = make_stack(scheduler={"max_stored_per_user": "1MiB", "max_submit_size": "512KiB"})
    stack.start_scheduler()
    stack.start_worker()
    env_file = tmp_path / "big.env"
    env_file.write_text("PAD1=" + "x" * 100_000 + "\nPAD2=" + "x" * 100_000 + "\n")
    args = ["--hold", "--export", "NONE", "--env-file", str(env_file), "--mem", "1GiB", "--", "true"]
    held = [stack.submit(*args) for _ in range(5)]
    refused = stack.cli("submit", *args)
    assert refused.returncode == 2, refused
    assert "max_stored_per_user" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    user = stack.store.get(held[0]).user  # type: ignore[union-attr]
    assert 5 * 200_000 < stack.store.waiting_bytes(user) <= 2**20
    too_big = stack.cli("submit", "--array", "0-3", *args)
    assert too_big.returncode == 2 and "max_submit_size" in too_big.stderr, too_big
    next_id = int(stack.redis.get(keys.NEXT_JOB_ID) or 0)
    assert next_id == held[-1], "a refused submit took a job id"

    assert stack.cli("cancel", str(held[0])).returncode == 0  # leaving the queue frees its bytes
    assert stack.cli("release", str(held[1])).returncode == 0  # ... and so does running
    stack.wait_state(held[1], JobState.COMPLETED)
    assert stack.submit(*args)
    for job in held[2:]:
        assert stack.cli("cancel", str(job)).returncode == 0
    assert 0 < stack.store.waiting_bytes(user) < 250_000  # the one just submitted


def test_state_and_redis_files_of_up_are_private(stack: Stack, tmp_path: Path) -> None:
    """The lock files and what the embedded Redis writes are 0600, its directories 0700."""
    state = tmp_path / "up-state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPULAB_")}
    env.update(GPULAB_STATE_DIR=str(state), PYTHONPATH=stack.env["PYTHONPATH"])
    up = Daemon([*cli_argv(stack), "up", "--sim-gpus", "1x24GiB", "--name", "solo"], env)
    try:
        up.wait_line("gpulab: up.")
        for name in ("up.lock", "scheduler.lock", "redis/redis.lock", "redis/redis.log", "redis.password"):
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
        assert not stat.S_IMODE(state.stat().st_mode) & 0o022
        second = Daemon([*cli_argv(stack), "up", "--sim-gpus", "1x24GiB", "--name", "other"], env)
        assert second.proc.wait(timeout=60) == 1
        assert any("gpulab up is already running" in line for line in second.lines), second.lines
        # `gpulab doctor` on the stack that `gpulab up` started: nothing FAILs.
        doctor = subprocess.run(
            [*cli_argv(stack), "doctor", "--json"], env=env, capture_output=True, text=True, timeout=60
        )
        assert doctor.returncode == 0 and json.loads(doctor.stdout)["ok"], doctor.stdout + doctor.stderr
    finally:
        assert up.stop(signal.SIGTERM) == 0
