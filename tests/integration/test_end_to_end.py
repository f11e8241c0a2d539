"""The core path on real Redis, a real scheduler and a real worker with simulated GPUs."""

from __future__ import annotations

import json
import signal

from jobs import keys
from jobs.states import JobState
from tests.helpers.stack import Stack, release


def test_three_10gib_jobs_on_one_24gib_gpu_run_two_at_a_time(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker("n1", "1x24GiB")
    fifos = [stack.fifo(f"job{i}") for i in range(3)]
    ids = [stack.submit("--mem", "10GiB", *stack.hold_job_args("10GiB", fifo)) for fifo in fifos]

    first, second = (stack.wait_state(i, JobState.RUNNING) for i in ids[:2])
    third = stack.wait_for(ids[2], lambda r: r.reason == "Resources")
    assert third.state == JobState.PENDING
    assert {first.node, second.node} == {"n1"}

    release(fifos[0], 0)
    assert stack.wait_state(ids[0], JobState.COMPLETED).exit_code == 0
    stack.wait_state(ids[2], JobState.RUNNING)
    release(fifos[1], 3)
    release(fifos[2], 0)
    failed = stack.wait_state(ids[1], JobState.FAILED)
    assert (failed.reason, failed.exit_code) == ("ExitCode", 3)
    assert stack.wait_state(ids[2], JobState.COMPLETED).exit_code == 0

    # At no point were all three running: replay the global event stream in order.
    running: set[int] = set()
    most = 0
    for _id, fields in stack.redis.xrange(keys.EVENTS):
        job, state = int(fields[b"job"]), fields[b"state"].decode()
        if state == "RUNNING":
            running.add(job)
        elif state in ("COMPLETED", "FAILED", "CANCELLED"):
            running.discard(job)
        most = max(most, len(running))
    assert most == 2
    log = stack.cli("logs", str(ids[1]))
    assert "released with 3" in log.stdout
    assert stack.cli("wait", str(ids[1])).returncode == 3
    assert stack.cli("wait", str(ids[0]), str(ids[2])).returncode == 0
    shown = json.loads(stack.cli("show", "--json", str(ids[0])).stdout)
    assert shown["peak_bytes"] and max(shown["peak_bytes"].values()) == 10 * 2**30
    assert [e["state"] for e in shown["history"] if e["state"] != "PENDING"] == ["ASSIGNED", "RUNNING", "COMPLETED"]


def test_daemons_print_every_threads_stack_on_sigusr1_and_keep_serving(stack: Stack) -> None:
    """`kill -USR1` shows where a daemon is (how the suite reports one that will not stop)."""
    daemons = [stack.start_scheduler(), stack.start_worker()]
    for daemon in daemons:
        daemon.proc.send_signal(signal.SIGUSR1)
        daemon.wait_line("most recent call first")
        assert daemon.proc.poll() is None
    job = stack.submit("--", "true")
    stack.wait_state(job, JobState.COMPLETED)
