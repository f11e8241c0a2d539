"""Break 4 (issue 13): a worker frozen (SIGSTOP) for longer than its lease, replaced by a new
worker under the same node name, then resumed (SIGCONT), must be fenced: it starts nothing
(not even the launch it took off the node's queue while frozen) and stops the job it ran
before the freeze (that job was requeued; its new copy belongs to the replacement)."""

from __future__ import annotations

import signal

import pytest
import redis

from jobs import keys
from jobs.states import JobState
from tests.chaos.invariants import check_invariants
from tests.chaos.markers import Marker, pid_alive
from tests.helpers.stack import Stack, eventually

FINAL = (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


def _blocked_on_queue(client: redis.Redis) -> bool:
    """Some worker's RQ loop sits in its blocking pop of a node queue (BLMOVE: RQ with one queue)."""
    return any(c["cmd"] == "blmove" and "b" in c["flags"] for c in client.client_list())


@pytest.mark.slow
def test_resumed_stale_worker_is_fenced(stack: Stack, marker: Marker) -> None:
    stack.start_scheduler()
    old = stack.start_worker("n1", "1x24GiB")
    job = stack.submit("--requeue", "--mem", "1GiB", *marker.job_args())
    stack.wait_state(job, JobState.RUNNING)
    stale = marker.wait_start(job, 1)
    assert stale.started_by(old.proc.pid)
    eventually(lambda: _blocked_on_queue(stack.redis))  # the old worker awaits its next launch

    old.proc.send_signal(signal.SIGSTOP)
    try:
        # Frozen past its lease: the job is requeued and the node's name falls free.
        stack.wait_for(job, lambda r: r.state != JobState.RUNNING or r.attempt > 1)  # requeued
        eventually(lambda: not stack.redis.exists(keys.node("n1"), keys.node_owner("n1")))
        new = stack.start_worker("n1", "1x24GiB")
        # The requeued copy's launch: Redis hands it to the oldest blocked pop, the frozen worker's.
        stack.wait_for(job, lambda r: r.state != JobState.PENDING and r.attempt >= 2)
    finally:
        old.proc.send_signal(signal.SIGCONT)

    running = stack.wait_for(job, lambda r: r.state == JobState.RUNNING and r.attempt >= 2)
    started = marker.wait_start(job, running.attempt)
    by_stale = [s for s in marker.starts() if s.started_by(old.proc.pid) and s != stale]
    assert by_stale == [], f"the resumed stale worker (pid {old.proc.pid}) started {by_stale}"
    assert started.started_by(new.proc.pid)

    # The copy it ran before the freeze was requeued and runs on the new worker: it must go.
    def stale_copy_of_the_job_is_gone() -> bool:
        return not pid_alive(stale.pid)

    eventually(stale_copy_of_the_job_is_gone)
    assert not marker.release(job, 1), "the stale copy was still there to release"
    assert marker.release(job, running.attempt)
    assert stack.wait_state(job, *FINAL).state == JobState.COMPLETED
    marker.assert_exactly_once([job])
    check_invariants(stack.redis)


@pytest.mark.slow
def test_resumed_stale_worker_stops_the_job_that_was_requeued_away(stack: Stack, marker: Marker) -> None:
    """Same freeze, but the frozen worker's pending pop is spent on a decoy launch that has
    been requeued by the time it resumes: what is left is the lease its stale job holds.
    The lease names the node, and the replacement has the same name: renewing it is no proof
    of ownership."""
    stack.start_scheduler()
    old = stack.start_worker("n1", "1x24GiB")
    job = stack.submit("--requeue", "--mem", "1GiB", *marker.job_args())
    stack.wait_state(job, JobState.RUNNING)
    stale = marker.wait_start(job, 1)
    eventually(lambda: _blocked_on_queue(stack.redis))

    old.proc.send_signal(signal.SIGSTOP)
    try:
        decoy = stack.submit("--mem", "1GiB", *marker.job_args())  # its launch goes to the frozen pop
        stack.wait_state(decoy, JobState.ASSIGNED)
        stack.wait_for(job, lambda r: r.state != JobState.RUNNING or r.attempt > 1)  # requeued
        eventually(lambda: not stack.redis.exists(keys.node("n1"), keys.node_owner("n1")))
        new = stack.start_worker("n1", "1x24GiB")
        again = stack.wait_for(job, lambda r: r.state == JobState.RUNNING and r.attempt >= 2)
        assert marker.wait_start(job, again.attempt).started_by(new.proc.pid)
        decoy_run = stack.wait_for(decoy, lambda r: r.state == JobState.RUNNING and r.attempt >= 2)
        assert marker.wait_start(decoy, decoy_run.attempt).started_by(new.proc.pid)
    finally:
        old.proc.send_signal(signal.SIGCONT)

    def stale_copy_of_the_job_is_gone() -> bool:  # the stale worker exits, or stops it
        return not pid_alive(stale.pid)

    eventually(stale_copy_of_the_job_is_gone)
    assert not marker.release(job, 1)
    for j, attempt in ((job, again.attempt), (decoy, decoy_run.attempt)):
        assert marker.release(j, attempt)
        assert stack.wait_state(j, *FINAL).state == JobState.COMPLETED
    assert [s for s in marker.starts() if s.started_by(old.proc.pid)] == [stale]
    marker.assert_exactly_once([decoy])
    assert len(marker.ends(job)) == 1
    check_invariants(stack.redis)
