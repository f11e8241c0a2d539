"""Issue 13, the worker side: a job's whole tree dies with its worker (kill -9), before its
lease lapses when its worker freezes, a restarted worker kills whatever its predecessor left
and records the ends its predecessor could not (its journal)."""

from __future__ import annotations

import signal
from collections.abc import Callable

import psutil

from jobs import keys
from jobs.states import JobState, Reason
from jobs.store import JobStore
from tests.chaos.conftest import OwnRedis
from tests.chaos.invariants import check_invariants
from tests.chaos.markers import Marker, pid_alive
from tests.helpers.stack import Stack, eventually

FINAL = (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


def test_frozen_workers_job_dies_while_its_lease_still_holds(make_stack: Callable[..., Stack], marker: Marker) -> None:
    """SIGSTOP the worker: its job's shim hears no renewal and stops the tree at 0.75 of the
    lease, so it is dead before the scheduler can see the lease lapse (and run it elsewhere),
    however long its kill grace. Resumed in time, the worker requeues it."""
    stack = make_stack(worker={"lease_ttl_s": 6, "kill_grace_s": 60})
    stack.start_scheduler()
    worker = stack.start_worker("n1", "1x24GiB")
    job = stack.submit("--requeue", "--mem", "1GiB", *marker.job_args("--escape"))
    stack.wait_state(job, JobState.RUNNING)
    first = marker.wait_start(job, 1)
    (escaped,) = marker.escaped(job)

    worker.proc.send_signal(signal.SIGSTOP)
    try:
        eventually(lambda: not pid_alive(first.pid) and not pid_alive(escaped))
        left_ms = stack.redis.pttl(keys.lease(job))
        assert left_ms > 0, "the job outlived its lease: the scheduler could have started it elsewhere"
        assert stack.store.get(job).state == JobState.RUNNING  # type: ignore[union-attr]
    finally:
        worker.proc.send_signal(signal.SIGCONT)

    worker.wait_line("stopped by its shim: no lease renewal")
    again = stack.wait_for(job, lambda r: r.state == JobState.RUNNING and r.attempt == 2)
    assert marker.wait_start(job, again.attempt).live == ()
    assert marker.release(job, 2)
    assert stack.wait_state(job, *FINAL).state == JobState.COMPLETED
    marker.assert_exactly_once([job])
    check_invariants(stack.redis)


def test_killed_worker_takes_its_jobs_setsid_escapee_with_it(stack: Stack, marker: Marker) -> None:
    stack.start_scheduler()
    worker = stack.start_worker("n1", "1x24GiB")
    job = stack.submit("--mem", "1GiB", *marker.job_args("--escape"))
    stack.wait_state(job, JobState.RUNNING)
    start = marker.wait_start(job, 1)
    (escaped,) = marker.escaped(job)

    worker.stop(signal.SIGKILL)
    stack.daemons.remove(worker)
    eventually(lambda: not pid_alive(start.pid) and not pid_alive(escaped), timeout=10)
    assert stack.redis.exists(keys.lease(job)), "the tree should be gone well before the lease"
    lost = stack.wait_state(job, *FINAL)
    assert (lost.state, lost.reason) == (JobState.FAILED, Reason.NODE_LOST.value)
    assert marker.ends(job) == []
    check_invariants(stack.redis)


def test_restarted_worker_kills_what_its_predecessor_left(stack: Stack, marker: Marker) -> None:
    """A shim that could not act on its worker's death (here: stopped) keeps its job alive;
    the next worker of the node on this host kills the whole tree before it takes the name."""
    stack.start_scheduler()
    worker = stack.start_worker("n1", "1x24GiB")
    job = stack.submit("--requeue", "--mem", "1GiB", *marker.job_args("--escape"))
    stack.wait_state(job, JobState.RUNNING)
    start = marker.wait_start(job, 1)
    (escaped,) = marker.escaped(job)
    shim = psutil.Process(start.pid).parent()
    assert shim is not None and "worker/shim.py" in " ".join(shim.cmdline())

    shim.send_signal(signal.SIGSTOP)
    worker.stop(signal.SIGKILL)
    stack.daemons.remove(worker)
    assert pid_alive(start.pid) and pid_alive(escaped)  # its shim cannot stop it now

    stack.start_worker("n1", "1x24GiB")  # "ready" comes after the leftovers were killed
    assert not pid_alive(start.pid) and not pid_alive(escaped) and not pid_alive(shim.pid)
    again = stack.wait_for(job, lambda r: r.state == JobState.RUNNING and r.attempt == 2)
    assert marker.wait_start(job, again.attempt).live == ()
    assert marker.release(job, 2)
    assert stack.wait_state(job, *FINAL).state == JobState.COMPLETED
    marker.assert_exactly_once([job])


def test_restarted_worker_records_the_end_its_predecessor_journaled(
    own_stack: Stack, own_redis: OwnRedis, marker: Marker
) -> None:
    """The job ends while Redis is down; its worker journals the end, then dies too. The next
    worker of the node replays the journal (with its own fencing token) before taking work."""
    stack = own_stack
    scheduler = stack.start_scheduler()
    worker = stack.start_worker("n1", "1x24GiB")
    job = stack.submit("--mem", "1GiB", *marker.job_args())
    stack.wait_state(job, JobState.RUNNING)
    marker.wait_start(job, 1)
    journal = stack.state_dir / "worker" / "n1" / "journal"

    scheduler.proc.send_signal(signal.SIGSTOP)  # no reaper: only the journal can tell the end
    try:
        own_redis.kill()
        assert marker.release(job, 1, code=0)
        eventually(lambda: list(journal.glob("*.json")))
        worker.stop(signal.SIGKILL)
        stack.daemons.remove(worker)
        own_redis.start()
        stack.redis = own_redis.client()
        stack.store = JobStore(stack.redis)
        stack.start_worker("n1", "1x24GiB")
        done = stack.wait_state(job, *FINAL)
    finally:
        scheduler.proc.send_signal(signal.SIGCONT)
    assert (done.state, done.exit_code, done.attempt) == (JobState.COMPLETED, 0, 1), (done.state, done.detail)
    assert list(journal.glob("*.json")) == []
    assert [e["state"] for e in stack.store.history(job)].count("RUNNING") == 1
    marker.assert_exactly_once([job])
    check_invariants(stack.redis)


def test_end_refused_by_redis_is_journaled_and_recorded_once_writes_return(
    own_stack: Stack, own_redis: OwnRedis, marker: Marker
) -> None:
    """Redis refuses writes (NOREPLICAS here; MISCONF after a failed save reads the same) just
    as the job ends: the worker keeps the end in its journal and records it once it can."""
    stack = own_stack
    scheduler = stack.start_scheduler()
    worker = stack.start_worker("n1", "1x24GiB")
    job = stack.submit("--mem", "1GiB", *marker.job_args())
    stack.wait_state(job, JobState.RUNNING)
    marker.wait_start(job, 1)
    journal = stack.state_dir / "worker" / "n1" / "journal"
    admin = own_redis.client()

    scheduler.proc.send_signal(signal.SIGSTOP)  # no reaper meanwhile: the worker's record decides
    try:
        admin.config_set("min-replicas-to-write", 1)
        try:
            assert marker.release(job, 1, code=0)
            worker.wait_line(f"cannot record the end of job {job} yet")
            assert list(journal.glob("*.json")), "the end is not in the journal"
            assert stack.store.get(job).state == JobState.RUNNING  # type: ignore[union-attr]
        finally:
            admin.config_set("min-replicas-to-write", 0)
        done = stack.wait_state(job, *FINAL)
    finally:
        scheduler.proc.send_signal(signal.SIGCONT)
    assert (done.state, done.exit_code) == (JobState.COMPLETED, 0), (done.state, done.detail)
    eventually(lambda: not list(journal.glob("*.json")))
    marker.assert_exactly_once([job])
    check_invariants(stack.redis)
