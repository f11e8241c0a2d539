"""gpulab under the minimal Redis ACL that README "Security" recommends (a scheduler user and
a worker user, `+@all -@dangerous +info`, gpulab's and RQ's keys only): the daemons run a
job and `gpulab doctor` checks everything, with no command the ACL refuses."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from jobs import keys
from jobs.states import JobState
from scheduler.redis_server import RedisServer
from tests.helpers.stack import Stack

USERS = {"gpulab-scheduler": "sched-secret", "gpulab-worker": "worker-secret"}


@pytest.fixture
def acl_users(redis_server: RedisServer, redis_client: redis.Redis) -> Iterator[None]:
    for user, password in USERS.items():  # README "Security", as written there
        redis_client.execute_command(
            "ACL", "SETUSER", user, "on", f">{password}", "~gpulab:*", "~rq:*", "&*", "+@all", "-@dangerous", "+info"
        )
    yield
    for user in USERS:
        redis_client.execute_command("ACL", "DELUSER", user)


def as_user(stack: Stack, redis_server: RedisServer, user: str, tmp_path: Path) -> dict[str, str]:
    secret = tmp_path / f"{user}.password"
    secret.write_text(USERS[user] + "\n")
    secret.chmod(0o600)
    url = redis_server.url.replace("redis://", f"redis://{user}@")
    return {"GPULAB_REDIS_URL": url, "GPULAB_REDIS_PASSWORD_FILE": str(secret)}


def test_the_recommended_acl_runs_jobs_and_doctor(
    make_stack: Callable[..., Stack], redis_server: RedisServer, acl_users: None, tmp_path: Path
) -> None:
    stack: Stack = make_stack()
    scheduler_env = as_user(stack, redis_server, "gpulab-scheduler", tmp_path)
    stack.start_scheduler(env=scheduler_env)
    stack.start_worker("n1", env=as_user(stack, redis_server, "gpulab-worker", tmp_path))
    job = stack.submit("--mem", "1GiB", "--", sys.executable, "-c", "print('hello')")
    assert stack.wait_state(job, JobState.COMPLETED, JobState.FAILED).state == JobState.COMPLETED
    stack.env.update(scheduler_env)
    doctor = stack.cli("doctor")
    assert "Traceback" not in doctor.stderr, doctor.stderr
    lines = doctor.stdout.splitlines()
    # CONFIG is @dangerous: doctor says it cannot check persistence (a warning), and nothing fails.
    assert doctor.returncode == 0 and not [line for line in lines if line.startswith("FAIL")], doctor.stdout
    assert any(line.startswith("ok") and "invariants" in line for line in lines), doctor.stdout


def test_doctor_reports_a_command_its_user_may_not_run_as_one_line(
    redis_client: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A stricter ACL than the recommended one (no scripting): the check that needs the
    command fails with one line, the others still run; no traceback."""
    redis_client.execute_command(
        "ACL", "SETUSER", "gpulab-strict", "on", ">strict", "~gpulab:*", "~rq:*", "&*", "+@all", "-@dangerous",
        "-@scripting",
    )  # fmt: skip
    try:
        secret = tmp_path / "strict.password"
        secret.write_text("strict\n")
        secret.chmod(0o600)
        env = {
            **os.environ,
            "GPULAB_STATE_DIR": str(tmp_path / "state"),
            "GPULAB_REDIS_URL": redis_server.url.replace("redis://", "redis://gpulab-strict@"),
            "GPULAB_REDIS_PASSWORD_FILE": str(secret),
        }
        (tmp_path / "state").mkdir(mode=0o700)
        doctor = subprocess.run(
            [sys.executable, "-m", "cli", "doctor"], env=env, capture_output=True, text=True, timeout=120, check=False
        )
    finally:
        redis_client.execute_command("ACL", "DELUSER", "gpulab-strict")
    assert "Traceback" not in doctor.stderr, doctor.stderr
    assert doctor.returncode == 1
    [line] = [x for x in doctor.stdout.splitlines() if "invariants" in x]
    assert line.startswith("FAIL") and "no permissions" in line, doctor.stdout
    assert any("clock vs redis" in x for x in doctor.stdout.splitlines())  # the other checks ran


def test_doctor_survives_a_heartbeat_it_cannot_read(
    redis_client: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A node's heartbeat that is not the JSON object doctor expects (a worker of another
    version, a hand edit): that check fails with one line, the others still run."""
    redis_client.sadd(keys.NODES, "odd")
    redis_client.set(keys.node("odd"), "[1, 2]")
    env = {**os.environ, "GPULAB_STATE_DIR": str(tmp_path / "state"), "GPULAB_REDIS_URL": redis_server.url}
    (tmp_path / "state").mkdir(mode=0o700)
    doctor = subprocess.run(
        [sys.executable, "-m", "cli", "doctor"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert "Traceback" not in doctor.stderr, doctor.stderr
    assert any(x.startswith("FAIL") and "clocks" in x for x in doctor.stdout.splitlines()), doctor.stdout
    assert any("invariants" in x for x in doctor.stdout.splitlines()), doctor.stdout  # the later checks ran
