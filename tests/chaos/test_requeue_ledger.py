"""Break 1 (issue 13): a requeue (RUNNING -> PENDING/HELD) must release the job's ledger
reservation, or a requeued job waits forever (Resources) on the node it left."""

from __future__ import annotations

import signal
from collections.abc import Callable

from jobs.states import JobState, Reason
from tests.chaos.invariants import check_invariants
from tests.chaos.markers import Marker
from tests.helpers.stack import Stack


def test_requeued_job_runs_again_when_its_worker_returns_after_sigterm(stack: Stack, marker: Marker) -> None:
    stack.start_scheduler()
    worker = stack.start_worker("n1", "1x24GiB")
    job = stack.submit("--requeue", *marker.job_args())  # no --mem: the whole GPU
    stack.wait_state(job, JobState.RUNNING)
    marker.wait_start(job, 1)

    assert worker.stop(signal.SIGTERM) == 0  # clean shutdown: the --requeue job goes back to the queue
    stack.daemons.remove(worker)
    stack.wait_state(job, JobState.PENDING)
    assert Reason.REQUEUED.value in [e["reason"] for e in stack.store.history(job)]

    stack.start_worker("n1", "1x24GiB")  # the same node comes back
    again = stack.wait_for(job, lambda r: r.state == JobState.RUNNING and r.attempt > 1)
    assert again.node == "n1"
    assert marker.release(job, again.attempt)
    assert stack.wait_state(job, JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED).state == JobState.COMPLETED
    marker.assert_exactly_once([job])
    check_invariants(stack.redis)


def test_requeue_after_worker_kill_releases_the_reservation(stack: Stack, marker: Marker) -> None:
    stack.start_scheduler()
    worker = stack.start_worker("n1", "1x24GiB")
    job = stack.submit("--requeue", *marker.job_args())
    stack.wait_state(job, JobState.RUNNING)
    marker.wait_start(job, 1)

    worker.stop(signal.SIGKILL)
    stack.daemons.remove(worker)
    stack.wait_state(job, JobState.PENDING)  # the reaper, once the lease lapsed
    check_invariants(stack.redis)  # a PENDING job holds no reservation

    stack.start_worker("n1", "1x24GiB")
    again = stack.wait_for(job, lambda r: r.state == JobState.RUNNING and r.attempt > 1)
    assert marker.release(job, again.attempt)
    assert stack.wait_state(job, JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED).state == JobState.COMPLETED
    check_invariants(stack.redis)


def test_held_after_requeue_limit_then_released_runs_again(make_stack: Callable[..., Stack], marker: Marker) -> None:
    stack = make_stack(scheduler={"max_requeues": 0})
    stack.start_scheduler()
    worker = stack.start_worker("n1", "1x24GiB")
    job = stack.submit("--requeue", *marker.job_args())
    stack.wait_state(job, JobState.RUNNING)
    marker.wait_start(job, 1)

    worker.stop(signal.SIGTERM)
    stack.daemons.remove(worker)
    stack.wait_state(job, JobState.HELD)
    check_invariants(stack.redis)  # a HELD job holds no reservation

    stack.start_worker("n1", "1x24GiB")
    assert stack.cli("release", str(job)).returncode == 0
    again = stack.wait_for(job, lambda r: r.state == JobState.RUNNING and r.attempt > 1)
    assert marker.release(job, again.attempt)
    assert stack.wait_state(job, JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED).state == JobState.COMPLETED
    marker.assert_exactly_once([job])
    check_invariants(stack.redis)
