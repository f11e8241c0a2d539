"""Attacks on the picture of waiting and active jobs the scheduler keeps between passes
(scheduler/changes.py, pending.py, active.py, dependencies.py): whatever happened in Redis,
the next pass (or at worst the next resync) must decide as a scheduler that reads everything
afresh would."""

from __future__ import annotations

import signal
import time
from dataclasses import replace
from typing import Any

import pytest
import redis

from jobs import keys, lifecycle
from jobs.config import Config
from jobs.spec import JobSpec
from jobs.states import JobState, Reason
from jobs.store import JobStore
from scheduler import changes
from scheduler.daemon import RESYNC_S, Scheduler
from tests.helpers.stack import Stack, eventually

ENV = {"PATH": "/usr/bin:/bin"}


def spec(
    *, mem_bytes: int = 2**30, hold: bool = False, after_ok: tuple[int, ...] = (), after_any: tuple[int, ...] = ()
) -> JobSpec:
    return JobSpec(
        command=("true",), cwd="/", mem_bytes=mem_bytes, env=ENV, hold=hold, after_ok=after_ok, after_any=after_any
    )


def submit(store: JobStore, *specs: JobSpec, user: str = "alice") -> list[int]:
    return store.submit_reserved(store.reserve_ids(len(specs)), list(specs), user=user, uid=1000)


def resync(scheduler: Scheduler) -> None:
    """The pass after RESYNC_S: everything is read again (what the scheduler does every minute)."""
    scheduler._last_full = -RESYNC_S
    scheduler.run_pass()


def test_a_job_id_used_again_after_a_flush_is_read_as_the_new_job(redis_client: redis.Redis) -> None:
    """Redis flushed (or restarted from an AOF that lost the last second, or replaced): job ids
    start again, and job 2 is now another job. The scheduler remembered the old job 2's record
    (waiting, attempt 0) and kept it for the new one, whose attempt is 0 too: the new job, which
    depends on nothing, waited forever 'for job 1 to end' (the old job's --after), resync or not."""
    store = JobStore(redis_client)
    scheduler = Scheduler(Config(), redis_client)
    first, second = submit(store, spec(hold=True), spec(after_ok=(1,)))
    assert (first, second) == (1, 2)
    scheduler.run_pass()
    assert store.get(2).reason == Reason.DEPENDENCY.value  # type: ignore[union-attr]

    redis_client.flushall()
    assert submit(store, spec(hold=True), spec(mem_bytes=3 * 2**30)) == [1, 2]
    scheduler.run_pass()  # the entry it stopped at is gone: a gap, everything is read again
    resync(scheduler)

    record = store.get(2)
    assert record is not None and record.state == JobState.PENDING
    assert record.reason != Reason.DEPENDENCY.value, record
    assert 2 in scheduler._queue  # considered for placement
    assert scheduler._queue.by_id[2].mem_bytes == 3 * 2**30
    known = scheduler.pending.known(2)
    assert known is not None and known.spec == record.spec


def test_an_active_job_id_used_again_after_a_flush_is_read_as_the_new_job(redis_client: redis.Redis) -> None:
    """The same for the active jobs: a scheduler that comes back to leading (another led while
    Redis was flushed and dispatched the new job 1) took the new job 1 for the old one it
    remembered running: another user's job, charged and limited as the old one's."""
    store = JobStore(redis_client)
    scheduler = Scheduler(Config(), redis_client)
    gpus = [{"index": 0, "uuid": "GPU-0"}]

    def dispatched(user: str, mem_bytes: int) -> None:  # as a leader's dispatch writes it
        (job_id,) = submit(store, spec(mem_bytes=mem_bytes), user=user)
        reservation = {"node": "n1", "gpus": {"GPU-0": mem_bytes}}
        store.transition(lifecycle.assign(job_id, 1, "n1", gpus, reservation, 600, time.time()))

    dispatched("alice", 2**30)
    scheduler.run_pass()
    assert scheduler.active.records[1].user == "alice"

    redis_client.flushall()
    dispatched("bob", 3 * 2**30)
    scheduler.changes.forget()  # a new term: everything is read again
    scheduler.run_pass()
    resync(scheduler)

    record = scheduler.active.records[1]
    assert (record.user, record.spec.mem_bytes) == ("bob", 3 * 2**30)


def test_a_dependency_id_used_again_after_a_flush_is_not_taken_as_ended(redis_client: redis.Redis) -> None:
    """The dependency reader remembers the states of dependencies that ended (they never change
    again). After a flush job 1 is another job, still waiting: a job --after-any 1 started at
    once on the old job 1's end, and one --after 1 would have been cancelled on an old failure."""
    store = JobStore(redis_client)
    scheduler = Scheduler(Config(), redis_client)
    assert submit(store, spec(), spec(after_any=(1,))) == [1, 2]
    store.transition(lifecycle.cancel(1, JobState.PENDING, "by alice", time.time()))
    scheduler.run_pass()  # job 1 ended: remembered as CANCELLED; job 2 free to run
    assert 2 in scheduler._queue

    redis_client.flushall()
    assert submit(store, spec(hold=True), spec(after_any=(1,))) == [1, 2]
    scheduler.run_pass()
    resync(scheduler)

    record = store.get(2)
    assert record is not None and record.reason == Reason.DEPENDENCY.value, record
    assert 2 not in scheduler._queue


def pass_after(stack: Stack, moment: float) -> float:
    """Await a scheduling pass that ended after `moment`; return when it ended."""

    def ended() -> float | None:
        at = stack.redis.hget(keys.SCHEDULER_STATUS, "last_pass_at")
        return float(at) if at is not None and float(at) > moment else None

    value: float = eventually(ended)
    return value


def test_a_running_job_cancelled_as_its_node_dies_is_not_requeued(stack: Stack) -> None:
    """`gpulab cancel` of a running job only marks it (`cancel_requested`) and tells its worker;
    if the worker is gone, the reaper ends it CANCELLED when its lease lapses. The mark made no
    event, so the scheduler's picture of the active job kept 'not cancelled' until its next
    full read, and the reaper requeued the --requeue job: cancelled, it ran again."""
    stack.start_scheduler()
    worker = stack.start_worker()
    job = stack.submit("--mem", "1GiB", "--requeue", "--", "sleep", "1000")
    started = stack.wait_state(job, JobState.RUNNING).started_at
    assert started is not None
    seen = pass_after(stack, started)  # a pass ended after the start ...
    pass_after(stack, seen)  # ... and the next one began after it: it has read the job RUNNING
    worker.proc.send_signal(signal.SIGSTOP)  # frozen: it never hears the cancel
    result = stack.cli("cancel", str(job))
    assert result.returncode == 0, result.stderr
    worker.proc.send_signal(signal.SIGKILL)  # the host is gone: the lease lapses
    worker.proc.wait()
    done = stack.wait_state(job, JobState.CANCELLED, JobState.PENDING, JobState.HELD, JobState.FAILED)
    assert done.state == JobState.CANCELLED, (done.state, done.reason, done.detail)


def test_a_cancel_request_for_an_attempt_that_no_longer_runs_changes_nothing(redis_client: redis.Redis) -> None:
    """`gpulab cancel` reads the job RUNNING and asks its worker to stop it; if the attempt was
    requeued in between (node lost, preempted), the request was written anyway: the job waited
    again marked cancel_requested, the user was told CANCELLING, and the job ran again in full
    (only a worker's stop or a reaped lease reads the mark). The request is refused instead, so
    the API cancels the waiting job (`SchedulerService.cancel` tries again)."""
    store = JobStore(redis_client)
    (job,) = submit(store, spec())
    reservation = {"node": "n1", "gpus": {"GPU-0": 2**30}}
    store.transition(lifecycle.assign(job, 1, "n1", [{"index": 0, "uuid": "GPU-0"}], reservation, 600, time.time()))
    store.transition(lifecycle.start(lifecycle.Attempt(job, 1, "n1"), 4242, "/dev/null", 600, time.time()))
    running = store.get(job)
    assert running is not None and running.state == JobState.RUNNING
    # The reaper's verdict on its lapsed lease, between the API's read and its request:
    requeue = replace(spec(), requeue=True)
    store.transition(lifecycle.lost(job, JobState.RUNNING, 1, "n1", requeue, False, 3, time.time()))

    assert store.request_cancel(job, running.node, running.attempt, "alice") is False
    assert store.request_cancel_many([(job, running.node, running.attempt)], "alice") == [False]
    record = store.get(job)
    assert record is not None and record.state == JobState.PENDING
    assert redis_client.hget(keys.job(job), "cancel_requested") is None
    assert redis_client.llen(keys.node_control("n1")) == 0  # the worker is not told either


def test_a_stream_trimmed_while_a_pass_reads_it_page_by_page_is_a_gap(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst larger than a page is read page after page; a burst past the stream's cap
    (one 20k-task array is one script) landing between two pages trimmed the entries after the
    page just read, and the next page, read from after that entry, began further on without
    noticing: the jobs in between were missing until the next resync (the count check runs
    only when nothing changed)."""
    monkeypatch.setattr(changes, "BATCH", 10)  # pages of 10 entries instead of 5000
    store = JobStore(redis_client)
    scheduler = Scheduler(Config(), redis_client)
    first = submit(store, spec())
    scheduler.run_pass()  # a full read: it knows where the stream ends now
    first += submit(store, *[spec()] * 15)  # two pages
    real_xrange = redis_client.xrange
    burst: list[int] = []

    def xrange_after_a_burst(*args: Any, **kwargs: Any) -> Any:
        """The next page's read, with a burst just before it (injected at that point)."""
        if not burst:
            burst.extend(submit(store, *[spec()] * 5))
            redis_client.xtrim(keys.EVENTS, maxlen=5)  # as if the burst reached the cap
        return real_xrange(*args, **kwargs)

    monkeypatch.setattr(scheduler.changes.redis, "xrange", xrange_after_a_burst)
    scheduler.run_pass()
    assert burst
    assert set(scheduler.pending.ids()) == set(first) | set(burst)


def test_a_count_check_that_reads_the_waiting_jobs_again_does_not_skip_the_active_ones(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When nothing changed but the waiting count differs from Redis's, the pass notes the
    stream's end and reads the waiting jobs again; a job that ended after the poll had its
    entry skipped by that note while the active jobs were not read again: it stayed in the
    picture, its reservation holding its GPU memory, until a quiet pass or the next resync."""
    store = JobStore(redis_client)
    scheduler = Scheduler(Config(), redis_client)
    (job,) = submit(store, spec())
    reservation = {"node": "n1", "gpus": {"GPU-0": 2**30}}
    store.transition(lifecycle.assign(job, 1, "n1", [{"index": 0, "uuid": "GPU-0"}], reservation, 600, time.time()))
    attempt = lifecycle.Attempt(job, 1, "n1")
    store.transition(lifecycle.start(attempt, 4242, "/dev/null", 600, time.time()))
    (gone,) = submit(store, spec())
    scheduler.run_pass()
    scheduler.run_pass()
    assert job in scheduler.active.records and job in scheduler._ledger
    redis_client.zrem(keys.PENDING, gone)  # behind every script's back: no event, the counts differ
    redis_client.delete(keys.job(gone))
    real_mark = scheduler.changes.mark

    def mark_after_an_end() -> None:
        """The job ends between the poll and the note of the stream's end (injected there)."""
        store.transition(lifecycle.finish(attempt, JobState.COMPLETED, Reason.NONE, "", {}, time.time()))
        monkeypatch.setattr(scheduler.changes, "mark", real_mark)
        real_mark()

    monkeypatch.setattr(scheduler.changes, "mark", mark_after_an_end)
    scheduler.run_pass()
    submit(store, spec())  # the next pass has a change: no count check
    scheduler.run_pass()
    assert job not in scheduler.active.records and job not in scheduler._ledger
