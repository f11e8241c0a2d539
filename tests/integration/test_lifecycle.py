"""Cancel, time limits, signals, lost workers: each through the real daemons."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

import psutil

from jobs.states import JobState
from tests.helpers.stack import Stack, release


def _child_pid(stack: Stack, job_id: int) -> int:
    return int(stack.wait_log(job_id, "child ").split()[1])


def test_cancel_running_job_kills_its_whole_process_tree(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker()
    fifo = stack.fifo("job")
    job_id = stack.submit("--mem", "2GiB", *stack.hold_job_args("2GiB", fifo, "--child"))
    record = stack.wait_state(job_id, JobState.RUNNING)
    child = _child_pid(stack, job_id)
    assert record.pid is not None or stack.wait_for(job_id, lambda r: r.pid is not None)
    result = stack.cli("cancel", str(job_id))
    assert result.returncode == 0 and "CANCELLING" in result.stdout
    done = stack.wait_state(job_id, JobState.CANCELLED)
    assert done.reason == "Cancelled"
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    assert stack.store.ledger() == {}


def test_cancel_pending_and_held_jobs(stack: Stack) -> None:
    stack.start_scheduler()  # no worker: jobs stay pending
    pending = stack.submit("--mem", "1GiB", "--", "true")
    held = stack.submit("--hold", "--", "true")
    assert stack.wait_for(pending, lambda r: r.reason == "Resources").detail == "no worker is online"
    assert stack.store.get(held).state == JobState.HELD  # type: ignore[union-attr]
    assert stack.cli("release", str(held)).returncode == 0
    assert stack.cli("hold", str(pending)).returncode == 0
    assert stack.cli("hold", str(pending)).returncode == 2  # already held: refused, one line
    assert stack.cli("cancel", str(pending), str(held)).returncode == 0
    assert stack.store.get(pending).state == JobState.CANCELLED  # type: ignore[union-attr]
    assert stack.store.get(held).state == JobState.CANCELLED  # type: ignore[union-attr]
    assert stack.cli("wait", str(held)).returncode == 1


def test_time_limit_terminates_the_job_with_reason_timeout(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker()
    fifo = stack.fifo("never-released")
    job_id = stack.submit("--time", "1s", "--mem", "1GiB", *stack.hold_job_args("0", fifo))
    done = stack.wait_state(job_id, JobState.FAILED)
    assert done.reason == "Timeout"
    assert stack.store.ledger() == {}


def test_job_killed_by_signal_fails_with_signal_reason(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker()
    fifo = stack.fifo("job")
    job_id = stack.submit("--mem", "1GiB", *stack.hold_job_args("1GiB", fifo))
    record = stack.wait_for(job_id, lambda r: r.state == JobState.RUNNING and r.pid is not None)
    stack.wait_log(job_id, "holding")
    os.kill(record.pid, signal.SIGKILL)  # type: ignore[arg-type]
    done = stack.wait_state(job_id, JobState.FAILED)
    assert (done.reason, done.detail) == ("Signal", "killed by SIGKILL")


def test_requeue_job_runs_again_after_sigkill(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker()
    fifo = stack.fifo("job")
    job_id = stack.submit("--requeue", "--mem", "1GiB", *stack.hold_job_args("1GiB", fifo))
    first = stack.wait_for(job_id, lambda r: r.state == JobState.RUNNING and r.pid is not None)
    stack.wait_log(job_id, "holding")
    os.kill(first.pid, signal.SIGKILL)  # type: ignore[arg-type]
    second = stack.wait_for(job_id, lambda r: r.attempt == 2 and r.state == JobState.RUNNING and r.pid is not None)
    assert second.pid != first.pid
    release(fifo)
    assert stack.wait_state(job_id, JobState.COMPLETED).attempt == 2


def test_command_that_cannot_start_fails_with_launch_failed(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker()
    job_id = stack.submit("--mem", "1GiB", "--", "/nonexistent/program")
    done = stack.wait_state(job_id, JobState.FAILED)
    assert done.reason == "LaunchFailed" and "/nonexistent/program" in done.detail
    assert stack.store.ledger() == {}


def test_environment_and_directory_are_captured_at_submit(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker()
    workdir = stack.tmp_path / "work"
    workdir.mkdir()
    stack.env["GPULAB_TEST_MARKER"] = "captured-42"
    script = "import os; print(os.getcwd(), os.environ['GPULAB_TEST_MARKER'], os.environ['CUDA_VISIBLE_DEVICES'])"
    result = stack.cli("submit", "--mem", "1GiB", "--", sys.executable, "-c", script, cwd=workdir)
    job_id = int(result.stdout)
    stack.wait_state(job_id, JobState.COMPLETED)
    out = stack.cli("logs", str(job_id)).stdout.split()
    assert out == [str(workdir), "captured-42", "GPU-sim-n1-0"]


def test_killed_worker_jobs_are_requeued_on_a_live_node(stack: Stack) -> None:
    stack.start_scheduler()
    doomed = stack.start_worker("doomed", "1x24GiB")
    fifo = stack.fifo("job")
    job_id = stack.submit("--requeue", "--mem", "10GiB", *stack.hold_job_args("10GiB", fifo))
    first = stack.wait_for(job_id, lambda r: r.state == JobState.RUNNING and r.pid is not None)
    assert first.node == "doomed"
    stack.wait_log(job_id, "holding")
    doomed.stop(signal.SIGKILL)
    # As if the machine lost power. The job's shim already kills it when its worker dies,
    # so the group may be gone by now.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(first.pid, signal.SIGKILL)  # type: ignore[arg-type]
    stack.start_worker("survivor", "1x24GiB")
    second = stack.wait_for(job_id, lambda r: r.state == JobState.RUNNING and r.node == "survivor")
    assert second.attempt == 2
    history = stack.store.history(job_id)
    assert any("lost" in e["detail"] for e in history)
    release(fifo)
    stack.wait_state(job_id, JobState.COMPLETED)


def test_two_workers_share_the_queue(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker("a", "1x24GiB")
    stack.start_worker("b", "1x24GiB")
    fifos = [stack.fifo(f"j{i}") for i in range(2)]
    ids = [stack.submit("--mem", "20GiB", *stack.hold_job_args("20GiB", f)) for f in fifos]
    nodes = {stack.wait_state(i, JobState.RUNNING).node for i in ids}
    assert nodes == {"a", "b"}
    for f in fifos:
        release(f)
    for i in ids:
        stack.wait_state(i, JobState.COMPLETED)


def test_lost_gpu_requeues_its_jobs_and_the_worker_keeps_serving_the_others(stack: Stack) -> None:
    from worker.sim_probe import mark_failed

    stack.start_scheduler()
    stack.start_worker("n1", "2x24GiB")
    fifos = [stack.fifo(f"j{i}") for i in range(2)]
    # Two 20GiB jobs: one per GPU.
    ids = [stack.submit("--requeue", "--mem", "20GiB", *stack.hold_job_args("20GiB", f)) for f in fifos]
    placed = {i: stack.wait_state(i, JobState.RUNNING).gpus[0].index for i in ids}
    victim = next(i for i, gpu in placed.items() if gpu == 0)
    survivor = next(i for i in ids if i != victim)
    mark_failed(stack.sim_dir, "GPU-sim-n1-0", "GPU has fallen off the bus")
    requeued = stack.wait_for(victim, lambda r: r.state == JobState.PENDING and r.reason == "Resources")
    assert requeued.attempt == 1
    history = stack.store.history(victim)
    assert any("gpu lost" in e["detail"] for e in history)
    assert stack.store.get(survivor).state == JobState.RUNNING  # type: ignore[union-attr]
    gpus = stack.api.gpus()["nodes"][0]["gpus"]
    assert gpus[0]["healthy"] is False and gpus[0]["available_bytes"] == 0
    # When the survivor's GPU frees up, the requeued job runs there.
    release(fifos[ids.index(survivor)])
    again = stack.wait_state(victim, JobState.RUNNING)
    assert (again.gpus[0].index, again.attempt) == (1, 2)
    release(fifos[ids.index(victim)])
    stack.wait_state(victim, JobState.COMPLETED)


def test_oom_retry_requeues_with_a_larger_request(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker("n1", "1x24GiB")
    # A job that dies of "CUDA out of memory" the first time and succeeds the second.
    script = (
        "import os, sys; a = int(os.environ['GPULAB_ATTEMPT']); "
        "print('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB') if a == 1 else None; "
        "sys.exit(1 if a == 1 else 0)"
    )
    job_id = stack.submit("--mem", "4GiB", "--oom-retry", "2", "--", sys.executable, "-c", script)
    done = stack.wait_state(job_id, JobState.COMPLETED)
    assert (done.attempt, done.oom_retries, done.spec.mem_bytes) == (2, 1, 5 * 2**30)  # 1.25 x 4 GiB
    assert any("retry 1/2 with --mem 5.0GiB" in e["detail"] for e in stack.store.history(job_id))


def test_oom_without_retry_fails_with_reason_oom(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker("n1", "1x24GiB")
    script = "print('RuntimeError: CUDA out of memory.'); raise SystemExit(1)"
    job_id = stack.submit("--mem", "4GiB", "--", sys.executable, "-c", script)
    done = stack.wait_state(job_id, JobState.FAILED)
    assert (done.reason, done.exit_code) == ("OOM", 1)
