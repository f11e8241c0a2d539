"""Preemption by checkpoint on the real stack (simulated GPUs): a built-in-loop job is
stopped for a higher-priority job, checkpoints, waits with reason Preempted and resumes from
its checkpoint (the newest one corrupted on purpose: it falls back to the one before) to
completion; a job that did not opt in is never touched; a job that ignores SIGTERM is
killed after the grace period and requeued all the same."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from jobs import keys
from jobs.states import JobState
from tests.helpers.stack import Stack, eventually, release

ROOT = Path(__file__).resolve().parents[2]
SLOW = str(ROOT / "tests" / "helpers" / "slow_digits.py")
PREEMPTION = {"preempt_after_s": 1.0, "preempt_min_run_s": 0.0}


def history(stack: Stack, job_id: int) -> str:
    return " | ".join(" ".join(e.values()) for e in stack.store.history(job_id))


def passes_after(stack: Stack, moment: float, count: int = 3) -> None:
    """Await `count` scheduler passes that began after `moment` (each pass stamps its end)."""
    seen: set[str] = set()

    def probe() -> bool:
        at = stack.redis.hget(keys.SCHEDULER_STATUS, "last_pass_at")
        if at is not None and float(at) > moment:
            seen.add(at.decode())
        return len(seen) >= count

    eventually(probe)


@pytest.mark.slow  # one training run, stopped and resumed: about a minute
def test_preemptible_training_resumes_from_its_checkpoint_and_others_are_never_touched(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(policy=PREEMPTION)
    stack.start_scheduler()
    stack.start_worker("n1", "1x24GiB")

    # 1. A job that did not opt in keeps its GPU, whatever waits behind it.
    plain_fifo = stack.fifo("plain")
    plain = stack.submit("--mem", "20GiB", *stack.hold_job_args("0", plain_fifo))
    stack.wait_state(plain, JobState.RUNNING)
    urgent = stack.submit("--mem", "20GiB", "--priority", "1000", *stack.hold_job_args("0", stack.fifo("u")))
    waiting = stack.wait_for(urgent, lambda r: r.reason == "Resources")
    passes_after(stack, waiting.submitted_at + PREEMPTION["preempt_after_s"])
    assert stack.store.get(plain).state == JobState.RUNNING  # type: ignore[union-attr]
    assert "reempt" not in history(stack, plain)
    assert stack.cli("cancel", str(urgent)).returncode == 0
    release(plain_fifo)
    stack.wait_state(plain, JobState.COMPLETED)

    # 2. A built-in-loop job (preemptible by default) gives way and resumes.
    stack.env["SLOW_STEP_S"] = "0.1"
    args = ("--mem", "20GiB", "--epochs", "2", "--seed", "3", "--checkpoint-steps", "10")
    train = int(stack.cli("train", SLOW, *args, "--", "--batch", "32", check=True).stdout)
    stack.wait_state(train, JobState.RUNNING)
    eventually(lambda: len(list((stack.state_dir / "checkpoints" / str(train)).glob("ckpt-*.pt"))) >= 2)
    high_fifo = stack.fifo("high")
    high = stack.submit("--mem", "20GiB", "--priority", "1000", *stack.hold_job_args("0", high_fifo))
    # Waiting again after its preemption; its reason moves on to Resources at the next pass
    # (a suite run missed the short-lived "Preempted" reason), so the history says why.
    stack.wait_for(train, lambda r: r.state == JobState.PENDING and r.attempt == 1 and r.exit_code is not None)
    assert f"preempted for job {high}" in history(stack, train)
    assert stack.wait_state(high, JobState.RUNNING).node == "n1"
    assert "stopped by SIGTERM" in stack.wait_log(train, "stopped by SIGTERM")
    # The newest checkpoint is damaged while the job waits: it resumes from the one before.
    ckpts = sorted((stack.state_dir / "checkpoints" / str(train)).glob("ckpt-*.pt"))
    newest, before = ckpts[-1], int(ckpts[-2].stem.split("-")[1])
    newest.write_bytes(b"not a checkpoint")
    release(high_fifo)
    done = stack.wait_state(train, JobState.COMPLETED, timeout=180)
    assert done.attempt == 2 and done.status is not None
    assert done.status["resumed_from_step"] == before
    assert Path(str(newest) + ".corrupt").exists()
    assert "Preempted" in history(stack, train)

    # 3. An opted-in job that ignores SIGTERM is killed after the grace period, requeued.
    deaf_fifo = stack.fifo("deaf")
    deaf_cmd = ["sh", "-c", 'trap "" TERM; exec "$@"', "sh", sys.executable, "-m", "tests.helpers.hold_job"]
    deaf = stack.submit("--mem", "20GiB", "--preemptible", "--", *deaf_cmd, "0", str(deaf_fifo))
    stack.wait_state(deaf, JobState.RUNNING)
    top = stack.submit("--mem", "20GiB", "--priority", "1000", *stack.hold_job_args("0", stack.fifo("top")))
    killed = stack.wait_for(deaf, lambda r: r.reason == "Preempted", timeout=60)
    assert "SIGKILL" in killed.detail
    stack.wait_state(top, JobState.RUNNING)
    assert stack.cli("cancel", str(top), str(deaf)).returncode == 0
