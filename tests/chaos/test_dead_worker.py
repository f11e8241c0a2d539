"""Break 2 (issue 13): a worker killed with kill -9 must not leave its jobs running. A
requeued copy must never start while the old one lives, and a job declared NodeLost must
not quietly run to its end."""

from __future__ import annotations

import signal

from jobs.states import JobState, Reason
from tests.chaos.invariants import check_invariants
from tests.chaos.markers import Marker, pid_alive
from tests.helpers.stack import Stack, eventually


def test_killed_workers_job_is_dead_before_its_requeued_copy_starts(stack: Stack, marker: Marker) -> None:
    stack.start_scheduler()
    n1 = stack.start_worker("n1", "1x24GiB")
    job = stack.submit("--requeue", "--mem", "1GiB", *marker.job_args())
    assert stack.wait_state(job, JobState.RUNNING).node == "n1"
    first = marker.wait_start(job, 1)
    stack.start_worker("n2", "1x24GiB")

    n1.stop(signal.SIGKILL)
    stack.daemons.remove(n1)
    stack.wait_for(job, lambda r: r.state == JobState.RUNNING and r.attempt >= 2)
    second = marker.wait_start(job, stack.store.get(job).attempt)  # type: ignore[union-attr]
    assert second.node == "n2"
    assert second.live == (), f"attempt {second.attempt} started while attempt 1 (pid {first.pid}) still ran"
    assert not pid_alive(first.pid)

    assert not marker.release(job, 1), "attempt 1 was still there to release"
    assert marker.release(job, second.attempt)
    done = stack.wait_state(job, JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)
    assert done.state == JobState.COMPLETED
    marker.assert_exactly_once([job])
    check_invariants(stack.redis)


def test_job_declared_node_lost_never_runs_to_its_end(stack: Stack, marker: Marker) -> None:
    stack.start_scheduler()
    n1 = stack.start_worker("n1", "1x24GiB")
    job = stack.submit("--mem", "1GiB", *marker.job_args())  # no --requeue: a node loss fails it
    stack.wait_state(job, JobState.RUNNING)
    start = marker.wait_start(job, 1)

    n1.stop(signal.SIGKILL)
    stack.daemons.remove(n1)
    lost = stack.wait_state(job, JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)
    assert (lost.state, lost.reason) == (JobState.FAILED, Reason.NODE_LOST.value)

    # Were its process still there, it could now run to its end, behind the NodeLost outcome.
    if marker.release(job, 1):
        eventually(lambda: not pid_alive(start.pid))
    assert marker.ends(job) == [], f"job {job} was declared NodeLost, then ran to its end: {marker.ends(job)}"
    check_invariants(stack.redis)
