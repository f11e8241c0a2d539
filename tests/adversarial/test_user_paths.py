"""Break 2: the root worker touches paths a job (a user) controls. Jobs run as real Unix users
(tests/helpers/users.py), so most of these need root; they skip cleanly otherwise."""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path

from jobs import keys
from jobs.states import JobState
from tests.adversarial.support import api, hold_script, raw_job, unblock_fifo
from tests.helpers.stack import Stack, release
from tests.helpers.users import as_user, needs_users

PATH_ENV = {"PATH": "/usr/bin:/bin"}


def _submit_as(stack: Stack, user: pwd.struct_passwd, spec: dict) -> tuple[int, object]:
    sock = stack.state_dir / "gpulab.sock"
    answer = as_user(user, lambda: api(sock, "POST", "/v1/jobs", spec))
    assert "ok" in answer, answer
    status, payload = answer["ok"]
    return status, payload


@needs_users
def test_cwd_inside_another_users_private_dir_is_not_entered_as_root(
    multi_stack: Stack, users: dict[str, pwd.struct_passwd], shared_dir: Path
) -> None:
    """Break 2a: the worker starts the job with subprocess.Popen(cwd=..., user=...), which
    chdir()s as root before dropping to the job's user (worker/runner.py JobRunner.start), and
    the API takes any absolute cwd (jobs/spec.py validate_spec). So alice can run inside
    bob-private/pub although bob-private is 0700, and read bob's files by relative path."""
    alice, bob = users["gpulab-alice"], users["gpulab-bob"]
    private = shared_dir / "bob-private"
    inner = private / "pub"
    inner.mkdir(parents=True)
    (inner / "notes.txt").write_text("bob-only-data\n")
    for path, mode in ((private, 0o700), (inner, 0o755), (inner / "notes.txt", 0o644)):
        os.chown(path, bob.pw_uid, bob.pw_gid)
        os.chmod(path, mode)
    assert as_user(alice, lambda: os.listdir(inner)).get("error", "").startswith("PermissionError")

    spec = {"command": ["/bin/cat", "notes.txt"], "cwd": str(inner), "mem_bytes": 2**30, "env": PATH_ENV}
    status, payload = _submit_as(multi_stack, alice, spec)
    if status >= 400:  # refused at submit: the cleanest answer
        assert status < 500, payload
        return
    job_id = int(payload["id"])  # type: ignore[index]
    done = multi_stack.wait_state(job_id, JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)
    log = Path(done.log_path).read_text() if done.log_path else ""
    assert "bob-only-data" not in log, "alice's job read a file inside bob's 0700 directory"
    assert (done.state, done.reason) == (JobState.FAILED, "LaunchFailed"), (done.state, done.reason, done.detail)


@needs_users
def test_status_file_symlink_does_not_leak_root_only_files(
    multi_stack: Stack, users: dict[str, pwd.struct_passwd], tmp_path: Path
) -> None:
    """Break 2b: the root worker reads the job-writable $GPULAB_STATUS_FILE following symlinks
    (worker/runner.py JobRunner.read_status), and stores what it read in the job's record,
    which the job's owner sees in `show --json` / the queue. A symlink to a root-only JSON file
    hands its content to the user."""
    alice = users["gpulab-alice"]
    secret = tmp_path / "root-only.json"  # inside pytest's 0700 root dir, and 0600 itself
    secret.write_text(json.dumps({"epoch": 42, "secret": "s3cr3t"}))
    secret.chmod(0o600)
    assert "error" in as_user(alice, lambda: secret.read_text())

    script = f'ln -sf {secret} "$GPULAB_STATUS_FILE"'
    spec = {"command": ["/bin/sh", "-c", script], "cwd": "/", "mem_bytes": 2**30, "env": PATH_ENV}
    status, payload = _submit_as(multi_stack, alice, spec)
    assert status == 200, payload
    job_id = int(payload["id"])  # type: ignore[index]
    done = multi_stack.wait_state(job_id, JobState.COMPLETED, JobState.FAILED)
    assert done.uid == alice.pw_uid

    sock = multi_stack.state_dir / "gpulab.sock"
    seen = as_user(alice, lambda: [api(sock, "GET", f"/v1/jobs/{job_id}"), api(sock, "GET", "/v1/jobs?all=1")])
    leaked = "s3cr3t" in json.dumps(seen)
    assert not leaked, "a root-only file reached its owner through the status file (show/queue)"
    assert "s3cr3t" not in json.dumps(raw_job(multi_stack, job_id)), "the root-only file was stored in the record"


def test_fifo_status_file_does_not_hang_the_worker(stack: Stack) -> None:
    """Break 2c: a job that makes $GPULAB_STATUS_FILE a FIFO blocks the worker's heartbeat
    forever in read_status (open() of a FIFO waits for a writer), under the heartbeat lock
    (worker/daemon.py WorkerDaemon.publish_heartbeat): the node goes offline, every other
    job's lease lapses, and a co-scheduled innocent job is lost (NodeLost) instead of
    completing. No users needed: any job can do it."""
    stack.start_scheduler()
    worker = stack.start_worker(sim_gpus="2x24GiB")
    innocent_fifo = stack.fifo("innocent")
    innocent = stack.submit("--mem", "1GiB", *stack.hold_job_args("1GiB", innocent_fifo))
    stack.wait_log(innocent, "holding")

    evil_fifo = stack.fifo("evil")
    make_fifo = 'rm -f "$GPULAB_STATUS_FILE"; mkfifo "$GPULAB_STATUS_FILE"; echo "status at $GPULAB_STATUS_FILE"'
    evil = stack.submit("--mem", "1GiB", "--", *hold_script(make_fifo), str(evil_fifo))
    status_path = stack.wait_log(evil, "status at ").split("status at ", 1)[1]
    stack.wait_log(evil, "holding")
    try:
        release(innocent_fifo, 0)
        done = stack.wait_state(innocent, JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)
        assert (done.state, done.reason) == (JobState.COMPLETED, ""), (done.state, done.reason, done.detail)
        assert worker.proc.poll() is None
        assert stack.redis.exists(keys.node("n1")), "the worker stopped heartbeating"
        assert raw_job(stack, evil)["state"] == "RUNNING"  # the hostile job itself is not our concern
    finally:
        unblock_fifo(status_path, "{}")  # let a stuck worker go, so teardown is quick
        unblock_fifo(evil_fifo, "0")


@needs_users
def test_run_dir_filled_with_symlinks_between_attempts_is_not_followed_by_root(
    multi_stack: Stack, users: dict[str, pwd.struct_passwd], tmp_path: Path
) -> None:
    """Between attempts a job owns its run and checkpoint directories and may put anything
    there: here its status file and a checkpoint entry become symlinks to a root-only file
    and directory, then it dies (--requeue). Preparing the next attempt, the root worker
    removes the old status file and hands the directories over again: it must follow none of
    it (no chown, chmod or read of the targets), and the next attempt must still start."""
    alice = users["gpulab-alice"]
    secret_dir = tmp_path / "root-only"  # inside pytest's 0700 root dir
    secret_dir.mkdir(mode=0o700)
    secret = secret_dir / "secret.json"
    secret.write_text(json.dumps({"secret": "s3cr3t"}))
    secret.chmod(0o600)
    before = {p: (p.stat().st_uid, p.stat().st_mode) for p in (secret_dir, secret)}
    script = (
        'if [ "$GPULAB_ATTEMPT" = 1 ]; then '
        f'ln -sf {secret} "$GPULAB_STATUS_FILE"; ln -s {secret_dir} "$GPULAB_CHECKPOINT_DIR/evil"; '
        "kill -9 $$; fi; echo attempt $GPULAB_ATTEMPT ran"
    )
    spec = {"command": ["/bin/sh", "-c", script], "cwd": "/", "mem_bytes": 2**30, "requeue": True, "env": PATH_ENV}
    status, payload = _submit_as(multi_stack, alice, spec)
    assert status == 200, payload
    job_id = int(payload["id"])  # type: ignore[index]
    done = multi_stack.wait_state(job_id, JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)
    assert (done.state, done.attempt) == (JobState.COMPLETED, 2), (done.state, done.reason, done.detail)
    assert "attempt 2 ran" in Path(done.log_path).read_text()
    assert {p: (p.stat().st_uid, p.stat().st_mode) for p in (secret_dir, secret)} == before
    assert "s3cr3t" not in json.dumps(raw_job(multi_stack, job_id))
    run_dir = multi_stack.state_dir / "run" / str(job_id)
    assert (run_dir.stat().st_uid, run_dir.stat().st_mode & 0o777) == (alice.pw_uid, 0o700)
