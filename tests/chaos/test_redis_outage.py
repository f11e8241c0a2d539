"""Break 5 (issue 13): Redis going away (kill -9, restart from its AOF) or refusing writes
must not lose or double a job's outcome, nor take the scheduler down. Each test has its own
redis-server (own port and data dir), so the session's is untouched."""

from __future__ import annotations

import signal
import time

import psutil
import pytest
import redis

from jobs import keys
from jobs.record import JobRecord
from jobs.states import JobState
from jobs.store import JobStore
from tests.chaos.conftest import OwnRedis
from tests.chaos.invariants import check_invariants
from tests.chaos.markers import Marker, pid_alive
from tests.helpers.stack import Daemon, Stack, eventually, test_config

FINAL = (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


def _restart(stack: Stack, server: OwnRedis) -> None:
    """Start the killed redis-server again (AOF replay) and point the test's client at it."""
    server.start()
    stack.redis = server.client()
    stack.store = JobStore(stack.redis)


def _run_to_end(stack: Stack, marker: Marker, job: int) -> JobRecord:
    """Release whichever attempt of the job runs, until the job is final."""
    tried: set[int] = set()
    while True:
        record = stack.wait_for(job, lambda r: r.is_final or (r.state == JobState.RUNNING and r.attempt not in tried))
        if record.is_final:
            return record
        attempt = record.attempt
        tried.add(attempt)

        def attempt_started_or_job_moved_on(attempt: int = attempt) -> str | None:
            if marker.start(job, attempt):
                return "started"
            now = stack.store.get(job)
            moved = now is None or (now.state, now.attempt) != (JobState.RUNNING, attempt)
            return "moved" if moved else None

        if eventually(attempt_started_or_job_moved_on) == "started":
            marker.release(job, attempt)


def _await_new_lines(daemon: Daemon, needle: str, after: int, count: int) -> None:
    eventually(lambda: sum(needle in line for line in daemon.lines[after:]) >= count)


def test_job_that_finishes_while_redis_is_down_is_completed_once(
    own_stack: Stack, own_redis: OwnRedis, marker: Marker
) -> None:
    stack = own_stack
    stack.start_scheduler()
    worker = stack.start_worker("n1", "1x24GiB")
    job = stack.submit("--mem", "1GiB", *marker.job_args())
    stack.wait_state(job, JobState.RUNNING)
    start = marker.wait_start(job, 1)

    own_redis.kill()
    assert marker.release(job, 1)  # it finishes during the outage
    eventually(lambda: not psutil.pid_exists(start.pid))  # and its worker has reaped it
    # Two failed heartbeats after that: the worker has met the outage since the job ended.
    _await_new_lines(worker, "heartbeat failed", len(worker.lines), 2)
    _restart(stack, own_redis)

    done = stack.wait_state(job, *FINAL)
    assert (done.state, done.exit_code, done.attempt) == (JobState.COMPLETED, 0, 1), (done.state, done.detail)
    assert [e["state"] for e in stack.store.history(job)].count("RUNNING") == 1
    marker.assert_exactly_once([job])
    assert len(marker.starts(job)) == 1
    check_invariants(stack.redis)


def test_requeue_job_survives_an_outage_longer_than_its_lease(
    own_stack: Stack, own_redis: OwnRedis, marker: Marker
) -> None:
    stack = own_stack
    scheduler = stack.start_scheduler()
    stack.start_worker("n1", "1x24GiB")
    job = stack.submit("--requeue", "--mem", "1GiB", *marker.job_args())
    stack.wait_state(job, JobState.RUNNING)
    start = marker.wait_start(job, 1)

    lease_ends = time.time() + stack.redis.pttl(keys.lease(job)) / 1000
    own_redis.kill()
    # The scheduler is slow to come back (held here, so the interleaving is decided by the
    # test): the worker meets the lapsed lease first.
    scheduler.proc.send_signal(signal.SIGSTOP)
    try:
        eventually(lambda: time.time() > lease_ends)  # the outage outlasts the lease
        _restart(stack, own_redis)
        eventually(lambda: stack.redis.exists(keys.node("n1")))  # the worker's first heartbeat since

        def worker_has_acted() -> bool:  # it stopped the job and recorded that, or kept it leased
            record = stack.store.get(job)
            kept = stack.redis.exists(keys.lease(job)) and pid_alive(start.pid)
            return record is not None and (record.state != JobState.RUNNING or bool(kept))

        eventually(worker_has_acted)
    finally:
        scheduler.proc.send_signal(signal.SIGCONT)

    done = _run_to_end(stack, marker, job)
    assert (done.state, done.exit_code) == (JobState.COMPLETED, 0), (done.state, done.reason, done.detail)
    marker.assert_exactly_once([job])
    check_invariants(stack.redis)


def test_scheduler_survives_redis_refusing_writes(own_stack: Stack, own_redis: OwnRedis, marker: Marker) -> None:
    stack = own_stack
    scheduler = stack.start_scheduler()
    admin = own_redis.client()

    def refused_writes() -> int:
        return int(admin.info("errorstats").get("errorstat_NOREPLICAS", {}).get("count", 0))

    # Writes fail with NOREPLICAS (as they fail with MISCONF when a save fails): reads work.
    admin.config_set("min-replicas-to-write", 1)
    try:
        eventually(lambda: refused_writes() >= 1)  # the scheduler met the refusal
    finally:
        admin.config_set("min-replicas-to-write", 0)

    stack.start_worker("n1", "1x24GiB")
    submitted = stack.cli("submit", "--mem", "1GiB", *marker.job_args())
    assert submitted.returncode == 0, f"the scheduler did not outlive the refused writes: {submitted.stderr.strip()}"
    job = int(submitted.stdout.strip())
    stack.wait_state(job, JobState.RUNNING)
    assert marker.release(job, 1)
    assert stack.wait_state(job, *FINAL).state == JobState.COMPLETED
    assert scheduler.proc.poll() is None
    marker.assert_exactly_once([job])
    check_invariants(stack.redis)


def test_redis_refusing_writes_is_what_the_test_above_injects(own_redis: OwnRedis) -> None:
    """Guard for the fault injection itself: min-replicas-to-write 1 refuses writes, 0 undoes it."""
    client = own_redis.client()
    client.config_set("min-replicas-to-write", 1)
    try:
        client.get("x")
        try:
            client.set("x", "1")
            raise AssertionError("the write was accepted")
        except redis.ResponseError as exc:
            assert "NOREPLICAS" in str(exc)
    finally:
        client.config_set("min-replicas-to-write", 0)
    assert client.set("x", "1")


@pytest.mark.slow
def test_redis_gone_for_20_s_inside_the_lease_costs_a_running_job_nothing(
    own_stack: Stack, own_redis: OwnRedis, marker: Marker
) -> None:
    """Final attack: Redis killed for 20 s (the fault's length is the test's parameter, not a
    wait for an event) with a 40 s lease. The running job is not touched, the daemons live
    through it, and the job completes once, on its first attempt."""
    stack = own_stack
    (stack.tmp_path / "config.toml").write_text(test_config(worker={"lease_ttl_s": 40}))
    scheduler = stack.start_scheduler()
    worker = stack.start_worker("n1", "1x24GiB")
    job = stack.submit("--mem", "1GiB", *marker.job_args())
    stack.wait_state(job, JobState.RUNNING)
    start = marker.wait_start(job, 1)

    own_redis.kill()
    time.sleep(20)
    _restart(stack, own_redis)

    assert scheduler.proc.poll() is None and worker.proc.poll() is None
    assert pid_alive(start.pid)  # the shim heard no renewal for 20 s, well under 0.75 x 40 s
    assert marker.release(job, 1)
    done = stack.wait_state(job, *FINAL)
    assert (done.state, done.attempt) == (JobState.COMPLETED, 1), (done.state, done.detail)
    marker.assert_exactly_once([job])
    check_invariants(stack.redis)


STOP_BOUND_S = 20  # the daemons' own bound is ~8 s; before the fix they took 34 s and 52 s


def test_daemons_stop_promptly_while_redis_does_not_answer(own_stack: Stack, own_redis: OwnRedis) -> None:
    """Break (found in test_netns's teardown): cut off from Redis, a SIGTERM'd scheduler took
    ~34 s to exit and a worker ~52 s, each Redis call of their shutdown waiting out its full
    timeout and retries. A frozen redis-server (SIGSTOP: connections stall as in a network
    partition) must not hold them: they leave what they cannot say to Redis to the leases."""
    stack = own_stack
    scheduler = stack.start_scheduler()
    scheduler.wait_line("leads now")
    worker = stack.start_worker("n1", "1x24GiB")
    assert own_redis.proc is not None
    own_redis.proc.send_signal(signal.SIGSTOP)
    try:
        for daemon in (scheduler, worker):
            daemon.proc.send_signal(signal.SIGTERM)
        assert scheduler.proc.wait(timeout=STOP_BOUND_S) == 0
        assert worker.proc.wait(timeout=STOP_BOUND_S) == 0
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
    assert not any("released the lease" in line for line in scheduler.lines)  # it could not
    scheduler.wait_line("could not release the lease")


def test_worker_with_a_running_job_stops_promptly_while_redis_does_not_answer(
    own_stack: Stack, own_redis: OwnRedis, marker: Marker
) -> None:
    """Break (found by the attack round of the prompt-stop fix): once RQ's loop had registered
    and taken a launch, a SIGTERM'd worker cut off from Redis hung in RQ's own teardown
    (`register_death` on RQ's client, whose socket timeout RQ raises to 415 s; a second
    SIGTERM within a second is ignored by RQ). The worker must stop its job and exit."""
    stack = own_stack
    stack.start_scheduler().wait_line("leads now")
    worker = stack.start_worker("n1", "1x24GiB")
    job = stack.submit("--mem", "1GiB", *marker.job_args())
    record = stack.wait_state(job, JobState.RUNNING)
    job_pid = marker.wait_start(job, record.attempt).pid
    assert stack.redis.smembers("rq:workers"), "RQ's loop registered itself"
    assert own_redis.proc is not None
    own_redis.proc.send_signal(signal.SIGSTOP)
    try:
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(timeout=STOP_BOUND_S) == 0
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
    eventually(lambda: not pid_alive(job_pid))  # the job was stopped, not left behind
