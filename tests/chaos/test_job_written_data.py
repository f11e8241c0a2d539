"""What a job writes is data the worker checks, never trusts: the OOM retry's figure from the
status file, and status files that are huge, FIFOs or the wrong shape."""

from __future__ import annotations

import json

from jobs import keys
from jobs.sizes import format_size, parse_size
from jobs.states import JobState, Reason
from tests.adversarial.support import hold_script, unblock_fifo
from tests.helpers.stack import Stack, eventually


def _oom_job(stack: Stack, peak: object, mem: str) -> int:
    forge = f"printf '%s' '{json.dumps({'oom': True, 'peak_bytes': peak})}' > \"$GPULAB_STATUS_FILE\"; exit 75"
    return stack.submit("--mem", mem, "--oom-retry", "3", "--", "/bin/sh", "-c", forge)


def test_oom_peak_over_the_gpu_size_fails_the_job_at_once(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker("n1", "1x24GiB")
    job = _oom_job(stack, 30 * 2**30, "1GiB")
    # PENDING counts only after a run (a retry would show as PENDING again): right after the
    # submit the job is PENDING with attempt 0, which is not an answer.
    ended_or_retried = (JobState.FAILED, JobState.COMPLETED, JobState.CANCELLED, JobState.PENDING)
    done = stack.wait_for(job, lambda r: r.attempt >= 1 and r.state in ended_or_retried)
    assert (done.state, done.reason, done.attempt) == (JobState.FAILED, Reason.OOM.value, 1), done
    assert "not retried" in done.detail and done.spec.mem_bytes == 2**30


def test_oom_retry_asks_for_at_most_what_the_gpu_offers(stack: Stack) -> None:
    """An honest claim (20 GiB on a 24 GiB GPU, asked 16 GiB): 1.25x would be 25 GiB, more
    than the GPU; the retry asks for what the GPU offers (its size less the scheduler's
    headroom, 256 MiB by default: more could never be placed), and one more OOM ends it."""
    stack.start_scheduler()
    stack.start_worker("n1", "1x24GiB")
    job = _oom_job(stack, 20 * 2**30, "16GiB")
    done = stack.wait_state(job, JobState.FAILED, JobState.COMPLETED, JobState.CANCELLED)
    assert (done.state, done.reason, done.attempt) == (JobState.FAILED, Reason.OOM.value, 2), done
    offered = parse_size("24GiB") - parse_size("256MiB")
    assert done.spec.mem_bytes == offered
    retried = [e["detail"] for e in stack.store.history(job) if e["state"] == "PENDING" and e.get("from")]
    assert retried == [f"CUDA out of memory; retry 1/3 with --mem {format_size(offered)}"], retried
    assert "not retried" in done.detail


def test_huge_fifo_and_odd_status_files_neither_stall_nor_bloat(stack: Stack) -> None:
    """One job swaps its status file between a 1 GiB sparse file, a FIFO and JSON of the
    wrong shape; the worker keeps heartbeating (an innocent job completes) and stores only
    the cleaned, small document."""
    stack.start_scheduler()
    worker = stack.start_worker("n1", "2x24GiB")
    hold = stack.fifo("hold")
    odd = json.dumps({"kind": "training", "epoch": [1], "loss": "NaN", "metrics": {"a": {"b": 1}, "c": 2}})
    script = (
        'truncate -s 1G "$GPULAB_STATUS_FILE"; sleep 1; rm -f "$GPULAB_STATUS_FILE"; '
        'mkfifo "$GPULAB_STATUS_FILE"; sleep 1; rm -f "$GPULAB_STATUS_FILE"; '
        f"printf '%s' '{odd}' > \"$GPULAB_STATUS_FILE\""
    )
    hostile = stack.submit("--mem", "1GiB", "--", *hold_script(script), str(hold))
    stack.wait_log(hostile, "holding")
    try:
        stored = eventually(lambda: stack.redis.hget(keys.job(hostile), "status"))
        assert json.loads(stored) == {"kind": "training", "loss": "NaN", "metrics": {"c": 2}}
        innocent = stack.submit("--mem", "1GiB", "--", "true")
        assert stack.wait_state(innocent, JobState.COMPLETED, JobState.FAILED).state == JobState.COMPLETED
        assert worker.proc.poll() is None and stack.redis.exists(keys.node("n1"))
    finally:
        unblock_fifo(hold, "0")
    assert stack.wait_state(hostile, JobState.COMPLETED, JobState.FAILED).state == JobState.COMPLETED
