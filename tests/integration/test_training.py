"""The training loop run by gpulab: accuracy, progress in the queue, resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from jobs.states import JobState
from tests.helpers.stack import Stack, eventually

ROOT = Path(__file__).resolve().parents[2]
SLOW = str(ROOT / "tests" / "helpers" / "slow_digits.py")


def _queue_status(stack: Stack, job_id: int) -> dict | None:
    jobs = json.loads(stack.cli("queue", "--json").stdout)["jobs"]
    return next((j.get("status") for j in jobs if j["id"] == job_id), None)


def test_example_trains_through_gpulab_and_reaches_its_accuracy(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker()
    result = stack.cli("train", str(ROOT / "examples" / "digits.py"), "--mem", "2GiB", "--epochs", "12")
    assert result.returncode == 0, result.stderr
    job_id = int(result.stdout)
    done = stack.wait_state(job_id, JobState.COMPLETED, timeout=180)
    assert done.status is not None and done.status["final"] is True
    assert done.status["metrics"]["test_accuracy"] >= 0.95
    assert done.spec.requeue is True and done.spec.kind == "training"
    shown = stack.cli("show", str(job_id)).stdout
    assert "test_accuracy=" in shown


def test_progress_shows_in_queue_and_a_killed_run_resumes_to_the_same_loss(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker()
    stack.env["SLOW_STEP_S"] = "0.01"
    args = ("--mem", "2GiB", "--epochs", "4", "--seed", "3", "--checkpoint-steps", "20")
    killed = int(stack.cli("train", SLOW, *args, "--", "--batch", "32").stdout)
    first = stack.wait_for(killed, lambda r: r.state == JobState.RUNNING and r.pid is not None)
    # Progress reaches `gpulab queue --json` through the worker's heartbeat (no event: poll).
    status = eventually(lambda: (s := _queue_status(stack, killed)) and s.get("step", 0) >= 60 and s)
    assert status["kind"] == "training" and status["epochs"] == 4 and status["loss"] is not None
    os.kill(first.pid, signal.SIGKILL)  # type: ignore[arg-type]
    resumed = stack.wait_state(killed, JobState.COMPLETED, timeout=180)
    assert resumed.attempt == 2
    assert resumed.status is not None and (resumed.status["resumed_from_step"] or 0) > 0
    stack.env["SLOW_STEP_S"] = "0"
    reference = int(stack.cli("train", SLOW, *args, "--", "--batch", "32").stdout)
    clean = stack.wait_state(reference, JobState.COMPLETED, timeout=180)
    assert clean.attempt == 1 and clean.status is not None
    final, expected = resumed.status["metrics"]["final_loss"], clean.status["metrics"]["final_loss"]
    assert abs(final - expected) <= 1e-5 * max(1.0, abs(expected)), (final, expected)
