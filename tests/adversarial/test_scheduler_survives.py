"""Break 1: one user's job can stop all scheduling. A record that fails validation on read makes
every scheduler pass raise; the loop survives only redis.ConnectionError, so it exits.
Desired: the bad job ends FAILED or HELD with a reason, the scheduler keeps running, and a
later innocent job still completes."""

from __future__ import annotations

import json

from jobs import keys
from jobs.spec import MAX_ENV_BYTES
from jobs.states import JobState
from tests.adversarial.support import FINAL, api, raw_job, wait_final_or_dead, wait_raw
from tests.helpers.stack import Stack

ABSURD_OOM = '{"oom": true, "peak_bytes": 1000000000000000000000000000000}'  # 10**30 bytes


def _innocent_job_still_runs(stack: Stack) -> None:
    """The other users' side: the queue lists, a new job is accepted and completes."""
    assert stack.scheduler is not None
    submitted = stack.cli("submit", "--mem", "1GiB", "--", "true")
    assert submitted.returncode == 0, f"an innocent submit was refused: {submitted.stderr.strip()}"
    innocent = int(submitted.stdout)
    record = wait_final_or_dead(stack, innocent, stack.scheduler)
    assert stack.scheduler.proc.poll() is None, "the scheduler died:\n" + "\n".join(stack.scheduler.lines[-15:])
    assert record is not None and record.state == JobState.COMPLETED, record
    queue = stack.cli("queue")
    assert queue.returncode == 0, queue.stderr


def test_oom_retry_with_a_forged_peak_does_not_stop_scheduling(stack: Stack) -> None:
    """Break 1a: --oom-retry trusts the job-written status file. A job that writes
    {"oom": true, "peak_bytes": 10**30} to $GPULAB_STATUS_FILE and exits 75 is requeued with
    --mem 1.25e30 (worker/runner.py JobRunner._oom_retry), a spec that fails validation, and
    the scheduler's next read of the pending jobs raises and kills it."""
    stack.start_scheduler()
    stack.start_worker()
    forge = f"printf '%s' '{ABSURD_OOM}' > \"$GPULAB_STATUS_FILE\"; exit 75"
    submitted = stack.cli("submit", "--mem", "1GiB", "--oom-retry", "2", "--", "/bin/sh", "-c", forge)
    assert submitted.returncode == 0, submitted.stderr
    evil = int(submitted.stdout)
    # It ran once and its attempt ended: final, held, or (today) back to PENDING with the forged --mem.
    after = wait_raw(stack, evil, lambda h: h["state"] in (*FINAL, "HELD") or int(h.get("oom_retries") or 0) > 0)

    _innocent_job_still_runs(stack)
    after = raw_job(stack, evil)
    assert after["state"] in ("FAILED", "HELD") and after.get("reason"), (
        f"the forged-OOM job should end FAILED or HELD with a reason; it is {after['state']} "
        f"with spec {json.loads(after['spec']).get('mem_bytes')!r} bytes"
    )


def test_array_task_pushed_past_the_env_limit_does_not_stop_scheduling(stack: Stack) -> None:
    """Break 1b: an array is validated on task 0 only (scheduler/submission.py
    Submitter._submit_array). Each task's env gets GPULAB_ARRAY_INDEX etc., so an environment
    exactly at MAX_ENV_BYTES for index 0 is one byte over for index 10: that task is stored
    invalid and the scheduler dies reading it."""
    stack.start_scheduler()
    stack.start_worker()
    first = int(stack.redis.get(keys.NEXT_JOB_ID) or 0) + 1
    task0_vars = {"GPULAB_ARRAY_JOB_ID": str(first), "GPULAB_ARRAY_INDEX": "0", "GPULAB_ARRAY_TASK_COUNT": "2"}
    env = {"PATH": "/usr/bin:/bin"}
    used = sum(len(k) + len(v) + 2 for k, v in {**env, **task0_vars}.items())
    chunk = 60 * 1024  # several variables: one value over 128 KiB could not be exec'd at all
    n = 0
    while used < MAX_ENV_BYTES:
        name = f"PAD{n}"
        size = min(chunk, MAX_ENV_BYTES - used - len(name) - 2)
        env[name] = "x" * size
        used += len(name) + size + 2
        n += 1
    assert used == MAX_ENV_BYTES
    spec = {"command": ["true"], "cwd": "/", "mem_bytes": 2**30, "array": "0,10", "env": env}
    status, answer = api(stack.state_dir / "gpulab.sock", "POST", "/v1/jobs", spec)

    if status < 400:  # accepted: then the over-limit task must end, not poison the queue
        assert answer["ids"][0] == first, answer
        bad = answer["ids"][1]
        _innocent_job_still_runs(stack)
        after = raw_job(stack, bad)
        assert after["state"] in ("FAILED", "HELD") and after.get("reason"), (
            f"array task {bad} (index 10) is {after['state']} with an invalid spec"
        )
    else:  # refused as a whole: fine, as long as nothing was stored and others still run
        assert status < 500, answer
        assert stack.redis.zcard(keys.PENDING) == 0
        _innocent_job_still_runs(stack)
