"""Memory accounting through the real stack: no double-booking, outside processes respected."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

from jobs import keys
from jobs.states import JobState
from tests.helpers.stack import Stack, eventually, release


def test_two_jobs_asking_60_percent_never_run_together_even_before_allocating(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker("n1", "1x24GiB")
    fifos = [stack.fifo(f"j{i}") for i in range(2)]
    ids: list[int] = []
    barrier = threading.Barrier(2)

    def submit(fifo: object) -> None:
        barrier.wait()  # both submissions leave at the same moment
        # "0": the jobs allocate nothing, so NVML alone would show the GPU as free.
        ids.append(stack.submit("--mem", "14746MiB", *stack.hold_job_args("0", fifo)))  # type: ignore[arg-type]

    threads = [threading.Thread(target=submit, args=(f,)) for f in fifos]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids.sort()
    first = stack.wait_state(ids[0], JobState.RUNNING)
    second = stack.wait_for(ids[1], lambda r: r.reason == "Resources")
    assert second.state == JobState.PENDING and first.state == JobState.RUNNING
    release(fifos[0 if first.spec.command[-1] == str(fifos[0]) else 1])
    stack.wait_state(ids[0], JobState.COMPLETED)
    stack.wait_state(ids[1], JobState.RUNNING)
    release(fifos[1 if first.spec.command[-1] == str(fifos[0]) else 0])
    stack.wait_state(ids[1], JobState.COMPLETED)
    order = [(int(f[b"job"]), f[b"state"].decode()) for _, f in stack.redis.xrange(keys.EVENTS)]
    assert order.index((ids[1], "RUNNING")) > order.index((ids[0], "COMPLETED"))


def test_outside_process_holding_20gib_keeps_a_10gib_job_off_that_gpu(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker("n1", "2x24GiB")
    hog = subprocess.Popen(
        [sys.executable, "-m", "worker.sim_alloc", "20GiB", "--gpu", "GPU-sim-n1-0",
         "--sim-dir", str(stack.sim_dir), "--until-signal"],
        stdout=subprocess.PIPE, text=True, env=stack.env,
    )  # fmt: skip
    try:
        assert hog.stdout is not None and "allocated" in hog.stdout.readline()
        # The heartbeat is a snapshot in Redis with no event of its own: poll `gpus` for it.
        eventually(lambda: _others_used(stack, 0) >= 20 * 2**30)
        fifo = stack.fifo("job")
        job_id = stack.submit("--mem", "10GiB", *stack.hold_job_args("10GiB", fifo))
        record = stack.wait_state(job_id, JobState.RUNNING)
        assert [g.index for g in record.gpus] == [1]
        # Now GPU1 has 10GiB promised; a second 10GiB job fits there, a third fits nowhere.
        fifo2, fifo3 = stack.fifo("job2"), stack.fifo("job3")
        second = stack.submit("--mem", "10GiB", *stack.hold_job_args("10GiB", fifo2))
        third = stack.submit("--mem", "10GiB", *stack.hold_job_args("10GiB", fifo3))
        assert [g.index for g in stack.wait_state(second, JobState.RUNNING).gpus] == [1]
        waiting = stack.wait_for(third, lambda r: r.reason == "Resources")
        assert waiting.state == JobState.PENDING
        gpus = json.loads(stack.cli("gpus", "--json").stdout)["nodes"][0]["gpus"]
        assert gpus[0]["others_used_bytes"] == 20 * 2**30 and gpus[0]["jobs"] == 0
        assert gpus[1]["gpulab_reserved_bytes"] == 20 * 2**30 and gpus[1]["jobs"] == 2
        for f in (fifo, fifo2):
            release(f)
        stack.wait_state(third, JobState.RUNNING)
        release(fifo3)
        stack.wait_state(third, JobState.COMPLETED)
    finally:
        hog.terminate()
        hog.wait()


def _others_used(stack: Stack, index: int) -> int:
    result = stack.cli("gpus", "--json")
    nodes = json.loads(result.stdout)["nodes"] if result.returncode == 0 else []
    return int(nodes[0]["gpus"][index]["others_used_bytes"]) if nodes else 0


def test_job_without_mem_gets_a_whole_idle_gpu(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker("n1", "2x24GiB")
    small_fifo, whole_fifo, whole2_fifo = stack.fifo("s"), stack.fifo("w"), stack.fifo("w2")
    small = stack.submit("--mem", "1GiB", *stack.hold_job_args("1GiB", small_fifo))
    small_gpu = stack.wait_state(small, JobState.RUNNING).gpus[0].index
    whole = stack.submit(*stack.hold_job_args("0", whole_fifo))
    assert stack.wait_state(whole, JobState.RUNNING).gpus[0].index == 1 - small_gpu
    # Both GPUs are now in use: another whole-GPU job waits, and so does a small job on the
    # whole GPU's card (it is taken), but a small one still fits beside the first job.
    whole2 = stack.submit(*stack.hold_job_args("0", whole2_fifo))
    assert stack.wait_for(whole2, lambda r: r.reason == "Resources").state == JobState.PENDING
    release(small_fifo)
    assert stack.wait_state(whole2, JobState.RUNNING).gpus[0].index == small_gpu
    release(whole_fifo)
    release(whole2_fifo)
    stack.wait_state(whole2, JobState.COMPLETED)
