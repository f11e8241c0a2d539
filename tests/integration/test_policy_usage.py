"""Fair-share usage in Redis: each second of each job is charged once, across passes."""

from __future__ import annotations

import json

import redis

from jobs import keys
from jobs.spec import JobSpec
from jobs.states import JobState
from jobs.store import JobStore, Transition
from scheduler.policy.accounting import Reservation
from scheduler.usage import UsageTracker

GIB = 2**30
T0 = 1_700_000_000.0


def _job(store: JobStore, user: str, assigned_at: float) -> int:
    job_id = store.submit(JobSpec(command=("true",), cwd="/", mem_bytes=10 * GIB), user=user, uid=0)
    store.transition(
        Transition(job_id, JobState.ASSIGNED, {"assigned_at": assigned_at, "node": "n1"},
                   reservation={"node": "n1", "gpus": {"GPU-0": 10 * GIB}})
    )  # fmt: skip
    store.transition(Transition(job_id, JobState.RUNNING, {"started_at": assigned_at + 1}))
    return job_id


def test_usage_is_charged_once_per_second_across_passes(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    tracker = UsageTracker(redis_client, half_life_s=0)  # no decay: exact arithmetic
    assert tracker.update(T0 - 10, [], {}, 0) == {}  # the first pass only starts the clock
    done = _job(store, "ann", T0)
    store.transition(Transition(done, JobState.COMPLETED, {"ended_at": T0 + 100}))
    usage = tracker.update(T0 + 200, [], {}, 0)
    assert usage == {"ann": 10 * GIB * 100}  # assigned to ended, though it ended between passes
    assert tracker.update(T0 + 300, [], {}, 0) == {"ann": 10 * GIB * 100}  # not charged twice

    running = _job(store, "bob", T0 + 350)
    record = store.get(running)
    assert record is not None
    ledger = {running: Reservation(running, "n1", {"GPU-0": 10 * GIB})}
    preview = tracker.update(T0 + 400, [record], ledger, 0, store=False)
    assert preview["bob"] == 10 * GIB * 50  # a running job counts up to now...
    assert tracker.update(T0 + 400, [record], ledger, 0)["bob"] == 10 * GIB * 50
    assert float(redis_client.hget(keys.FAIRSHARE, "_at")) == T0 + 400  # ...and is stored
    assert tracker.update(T0 + 500, [record], ledger, 0)["bob"] == 10 * GIB * 150  # then from there on


def test_usage_decays_with_the_half_life(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    day = 86400.0
    tracker = UsageTracker(redis_client, half_life_s=day)
    tracker.update(T0 - 1, [], {}, 0)
    done = _job(store, "ann", T0)
    store.transition(Transition(done, JobState.COMPLETED, {"ended_at": T0 + 1}))
    first = tracker.update(T0 + 2, [], {}, 0)["ann"]
    later = tracker.update(T0 + 2 + day, [], {}, 0)["ann"]
    assert abs(later - first / 2) < first * 1e-6


def test_finished_jobs_kept_across_windows_charge_what_a_fresh_tracker_charges(redis_client: redis.Redis) -> None:
    """A tracker keeps the finished jobs it read while they stay in its window (scheduler/usage.py,
    `_ended_since`); a tracker that keeps nothing must charge the same at every step: after the
    table goes back to an older `_at` (another scheduler's), and after a kept job's end changes."""
    store = JobStore(redis_client)
    kept = UsageTracker(redis_client, half_life_s=0)

    def same_as_fresh(now: float) -> dict[str, float]:
        fresh = UsageTracker(redis_client, half_life_s=0).update(now, [], {}, 0, store=False)
        usage = kept.update(now, [], {}, 0)
        assert usage == fresh
        return usage

    def complete(job_id: int, at: float) -> None:
        store.transition(Transition(job_id, JobState.COMPLETED, {"ended_at": at}))
        redis_client.zadd(keys.FINISHED, {str(job_id): at})  # the script scores it by the clock: T0's

    kept.update(T0 - 10, [], {}, 0)  # starts the clock
    first, second = _job(store, "ann", T0), _job(store, "bob", T0)
    complete(first, T0 + 100)
    complete(second, T0 + 180)
    assert same_as_fresh(T0 + 200) == {"ann": 10 * GIB * 100, "bob": 10 * GIB * 180}
    same_as_fresh(T0 + 300)
    redis_client.hset(keys.FAIRSHARE, "_at", repr(T0 + 150))  # an older table: bob's end is in it again
    assert same_as_fresh(T0 + 400)["bob"] == 10 * GIB * (180 + 30)
    third = _job(store, "cid", T0 + 400)
    complete(third, T0 + 410)
    same_as_fresh(T0 + 420)  # read and kept: it ended in the window
    redis_client.hset(keys.job(third), "ended_at", repr(T0 + 430))  # it ended again, later
    redis_client.zadd(keys.FINISHED, {str(third): T0 + 430})
    assert same_as_fresh(T0 + 440)["cid"] == 10 * GIB * (10 + 10)


def test_a_finished_job_charged_while_active_is_charged_as_a_fresh_tracker_charges_it(
    redis_client: redis.Redis,
) -> None:
    """A job the tracker charged while it was active is charged at its end from the record it
    kept (only the fields that move are read) - unless it ran another attempt since, whose
    spec may differ (an OOM retry raises --mem): then it is read whole, as a fresh tracker does."""
    store = JobStore(redis_client)
    kept = UsageTracker(redis_client, half_life_s=0)
    kept.update(T0 - 10, [], {}, 0)
    same, retried = _job(store, "ann", T0), _job(store, "bob", T0)
    records = [store.get(same), store.get(retried)]
    ledger = {i: Reservation(i, "n1", {"GPU-0": 10 * GIB}) for i in (same, retried)}
    kept.update(T0 + 100, [r for r in records if r is not None], ledger, 0)  # both charged while active
    spec = json.loads(redis_client.hget(keys.job(retried), "spec"))
    redis_client.hset(keys.job(retried), mapping={"spec": json.dumps({**spec, "mem_bytes": 30 * GIB}), "attempt": "2"})
    for job_id in (same, retried):
        store.transition(Transition(job_id, JobState.COMPLETED, {"ended_at": T0 + 150}))
        redis_client.zadd(keys.FINISHED, {str(job_id): T0 + 150})
    fresh = UsageTracker(redis_client, half_life_s=0).update(T0 + 200, [], {}, 0, store=False)
    assert kept.update(T0 + 200, [], {}, 0) == fresh
    assert fresh["bob"] - 10 * GIB * 100 == 30 * GIB * 50  # the new attempt's request
