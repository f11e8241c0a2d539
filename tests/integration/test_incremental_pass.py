"""The scheduler keeps the waiting jobs in memory between passes and re-reads only the jobs
the event stream names (scheduler/changes.py). Whatever happens between passes - holds,
cancels, submits, a trimmed stream, a change that left no event - the next pass must see
the same waiting jobs as a scheduler that reads everything afresh."""

from __future__ import annotations

import time

import redis

from jobs import keys, lifecycle
from jobs.config import Config
from jobs.record import JobRecord
from jobs.spec import JobSpec
from jobs.states import JobState
from jobs.store import JobStore
from scheduler.daemon import Scheduler


def submit(store: JobStore, count: int, *, hold: bool = False) -> list[int]:
    # No worker is online: every job stays PENDING ("no worker is online").
    spec = JobSpec(command=("true",), cwd="/", mem_bytes=2**30, hold=hold, env={"PATH": "/usr/bin:/bin"})
    return store.submit_reserved(store.reserve_ids(count), [spec] * count, user="alice", uid=1000)


def picture(records: list[JobRecord]) -> list[tuple[int, str, int, str]]:
    return [(r.id, r.state.value, r.attempt, r.reason) for r in records]


def fresh_view(client: redis.Redis) -> list[tuple[int, str, int, str]]:
    other = Scheduler(Config(), client)
    other.changes.mark()
    return picture(other.pending.read())


def test_changes_between_passes_are_seen_as_a_full_read_sees_them(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    scheduler = Scheduler(Config(), redis_client)
    ids = submit(store, 40)
    assert scheduler.run_pass().pending == 40
    store.transition(lifecycle.hold(ids[0], "alice"))
    store.transition(lifecycle.cancel(ids[1], JobState.PENDING, "by alice", time.time()))
    new = submit(store, 5) + submit(store, 2, hold=True)
    stats = scheduler.run_pass()
    assert stats.pending == 40 - 2 + 5
    assert picture(scheduler.pending.records()) == fresh_view(redis_client)
    assert {r.id for r in scheduler.pending.records()} == (set(ids) - {ids[1]}) | set(new)
    store.transition(lifecycle.release(ids[0], "alice"))
    assert scheduler.run_pass().pending == 40 - 1 + 5
    assert picture(scheduler.pending.records()) == fresh_view(redis_client)


def test_a_trimmed_event_stream_makes_the_next_pass_read_everything(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    scheduler = Scheduler(Config(), redis_client)
    ids = submit(store, 10)
    scheduler.run_pass()
    redis_client.xtrim(keys.EVENTS, maxlen=0)  # as if more than the cap happened between passes
    store.transition(lifecycle.hold(ids[0], "alice"))
    redis_client.xtrim(keys.EVENTS, maxlen=0)
    assert scheduler.run_pass().pending == 9
    assert picture(scheduler.pending.records()) == fresh_view(redis_client)


def test_a_change_that_left_no_event_is_caught_by_the_count_check(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    scheduler = Scheduler(Config(), redis_client)
    ids = submit(store, 10)
    scheduler.run_pass()
    redis_client.zrem(keys.PENDING, ids[3])  # behind every script's back: no event
    redis_client.delete(keys.job(ids[3]))
    scheduler.run_pass()  # this pass reads no events, sees 9 waiting in Redis and 10 known
    assert [r.id for r in scheduler.pending.records()] == [i for i in ids if i != ids[3]]


def test_a_redis_that_lost_its_last_writes_is_read_again(redis_client: redis.Redis) -> None:
    """After a restart from an AOF missing its last second, the entry the scheduler stopped
    at is gone (the stream's tail is older): that is a gap, not 'nothing changed'."""
    store = JobStore(redis_client)
    scheduler = Scheduler(Config(), redis_client)
    ids = submit(store, 3)
    scheduler.run_pass()
    tail = redis_client.xrevrange(keys.EVENTS, count=1)[0][0]
    redis_client.xdel(keys.EVENTS, tail)  # the last event (and its job) never happened
    redis_client.zrem(keys.PENDING, ids[-1])
    redis_client.delete(keys.job(ids[-1]))
    submit(store, 1)  # a new event after the lost one: the count alone would not tell
    scheduler.run_pass()
    assert picture(scheduler.pending.records()) == fresh_view(redis_client)
    assert ids[-1] not in {r.id for r in scheduler.pending.records()}
