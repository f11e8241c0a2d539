"""What the scheduler keeps between passes instead of reading it again (scheduler/active.py,
scheduler/pending.py, scheduler/forecast.py, scheduler/cluster.py): each cache must show
what a fresh read of Redis shows - a changed record is seen, a gap makes it read again."""

from __future__ import annotations

import gc
import json
import time
import weakref
from collections.abc import Callable
from dataclasses import replace

import pytest
import redis

from jobs import keys, lifecycle
from jobs.config import Config, SchedulerConfig
from jobs.gpus import GpuDevice, GpuSnapshot, NodeHeartbeat
from jobs.lifecycle import Fence, Transition
from jobs.record import JobRecord
from jobs.spec import JobSpec
from jobs.states import JobState
from jobs.store import Fenced, JobStore
from scheduler.active import ActiveReader
from scheduler.cluster import Ledger, NodeReader, read_ledger
from scheduler.daemon import Scheduler, collect_and_freeze
from scheduler.forecast import DurationHistory, duration_key
from scheduler.pending import ESTIMATES_PER_PASS
from scheduler.policy.accounting import build_accounts
from scheduler.policy.cluster_state import ClusterBase
from scheduler.policy.inputs import running_job
from scheduler.policy.types import RunningJob

GIB = 2**30


def fake_node(client: redis.Redis, name: str = "n1", gpus: int = 1) -> None:
    """A node that heartbeats (as far as Redis can tell); no worker takes its launches."""
    devices = tuple(GpuDevice(i, f"GPU-{name}-{i}", "Sim", 80 * GIB, 80 * GIB, 0) for i in range(gpus))
    beat = NodeHeartbeat(name, GpuSnapshot(devices, time.time()), sent_at=time.time())
    client.set(keys.node(name), json.dumps(beat.to_json()), px=600_000)
    client.sadd(keys.NODES, name)


def submit(store: JobStore, count: int = 1, *, mem: int = GIB, name: str = "") -> list[int]:
    spec = JobSpec(command=("true",), cwd="/", mem_bytes=mem, name=name, env={"PATH": "/usr/bin:/bin"})
    return store.submit_reserved(store.reserve_ids(count), [spec] * count, user="alice", uid=1000)


def seen(record: JobRecord) -> tuple[object, ...]:
    """What the pass uses of an active job."""
    return (record.id, record.state, record.attempt, record.node, record.gpus, record.spec, record.user,
            record.submitted_at, record.array_id, record.assigned_at, record.started_at, record.peak_bytes)  # fmt: skip


def fresh_active(client: redis.Redis) -> dict[int, tuple[object, ...]]:
    return {a.record.id: seen(a.record) for a in ActiveReader(client).read()}


def run(store: JobStore, job_id: int, attempt: int) -> None:
    store.transition(
        Transition(job_id, JobState.RUNNING, {"started_at": time.time()}, guard=("attempt", str(attempt)), wake=False)
    )


def dispatched(client: redis.Redis, count: int) -> tuple[JobStore, Scheduler, list[int]]:
    """`count` (at most 3) jobs placed and dispatched by a fresh scheduler on a 2-GPU node."""
    store = JobStore(client)
    fake_node(client, gpus=2)
    scheduler = Scheduler(Config(), client)
    ids = submit(store, count)
    assert scheduler.run_pass().placed == count
    return store, scheduler, ids


def test_a_dispatched_job_is_known_to_the_active_reader_as_a_fresh_read_knows_it(
    redis_client: redis.Redis,
) -> None:
    store, scheduler, ids = dispatched(redis_client, 3)
    run(store, ids[0], 1)
    scheduler.run_pass()  # the records come from the waiting jobs' cache, refreshed by their rows
    kept = {a.record.id: seen(a.record) for a in scheduler.active.update(set())}
    assert kept == fresh_active(redis_client)
    assert set(kept) == set(ids) and kept[ids[0]][1] == JobState.RUNNING


def test_a_spec_rewritten_by_a_retry_another_scheduler_dispatched_is_read_again(
    redis_client: redis.Redis,
) -> None:
    """The waiting record of attempt N may stand for attempt N+1 only: here the job ran out
    of memory (its spec rewritten with more --mem) and another scheduler dispatched the
    retry while this one was away, so its cache still holds attempt 0 with the old spec."""
    store = JobStore(redis_client)
    fake_node(redis_client)
    scheduler = Scheduler(Config(), redis_client)
    [job_id] = submit(store, mem=GIB)
    assert scheduler.run_pass().placed == 1  # attempt 1; its waiting record (attempt 0) is still cached
    run(store, job_id, 1)
    old = store.get(job_id)
    assert old is not None
    retry = JobSpec(**{**old.spec.__dict__, "mem_bytes": 2 * GIB})
    store.transition(Transition(job_id, JobState.PENDING, {"spec": retry.to_json(), "oom_retries": 1}, wake=False))
    assert Scheduler(Config(), redis_client).run_pass().placed == 1  # the other one: attempt 2
    scheduler.run_pass()
    [active] = [a.record for a in scheduler.active.update(set())]
    assert (active.attempt, active.spec.mem_bytes) == (2, 2 * GIB)
    assert {active.id: seen(active)} == fresh_active(redis_client)


def test_run_times_of_completed_jobs_are_learned_as_they_leave(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    fake_node(redis_client, gpus=3)
    scheduler = Scheduler(Config(), redis_client)
    done = submit(store, 2, name="train")
    [failed] = submit(store, 1, name="broken")
    assert scheduler.run_pass().placed == 3
    scheduler.run_pass()  # the three are active in the scheduler's picture
    for job_id, run_s in ((done[0], 100.0), (done[1], 300.0)):
        store.transition(Transition(job_id, JobState.RUNNING, {"started_at": 1000.0}, wake=False))
        store.transition(Transition(job_id, JobState.COMPLETED, {"ended_at": 1000.0 + run_s}, wake=False))
    store.transition(Transition(failed, JobState.RUNNING, {"started_at": 1000.0}, wake=False))
    store.transition(Transition(failed, JobState.FAILED, {"ended_at": 1050.0}, wake=False))
    scheduler.run_pass()
    learned = scheduler.forecaster.history.all()
    assert learned == {duration_key("alice", "train"): 200.0}  # running mean of 100 and 300


def test_a_stale_leaders_learned_durations_are_refused(redis_client: redis.Redis) -> None:
    """The learned durations are a leader's write like any other: an ex-leader that resumes
    after a newer one took the fence must not count completions again (found by the attack
    round: every other write of the loop was fenced, this one was not)."""
    store = JobStore(redis_client)
    [job_id] = submit(store, 1, name="train")
    waiting = store.get(job_id)
    assert waiting is not None
    record = waiting.updated(state=JobState.COMPLETED, started_at=1000.0, ended_at=1100.0)
    history = DurationHistory(redis_client)
    redis_client.set(keys.LEADER_FENCE, "2:new")
    with pytest.raises(Fenced):
        history.learn([record], Fence(keys.LEADER_FENCE, "1:old"))
    assert history.all() == {}
    history.learn([record], Fence(keys.LEADER_FENCE, "2:new"))
    assert history.all() == {duration_key("alice", "train"): 100.0}


def stored_reasons(client: redis.Redis, ids: list[int]) -> list[tuple[str, str]]:
    out = []
    for job_id in ids:
        reason, detail = client.hmget(keys.job(job_id), "reason", "detail")
        out.append(((reason or b"").decode(), (detail or b"").decode()))
    return out


def test_reasons_are_written_when_they_change_and_only_then(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    scheduler = Scheduler(Config(), redis_client)
    small, big = submit(store, 2, mem=GIB), submit(store, 1, mem=100 * GIB)
    scheduler.run_pass()
    assert stored_reasons(redis_client, small + big) == [("Resources", "no worker is online")] * 3
    # A mark no event announces: rewritten only if the scheduler writes that job's reason again.
    redis_client.hset(keys.job(small[0]), "detail", "mark")
    scheduler.run_pass()  # nothing changed: nothing is written
    assert stored_reasons(redis_client, small)[0] == ("Resources", "mark")
    fake_node(redis_client)  # 80 GiB: the big job can never fit here, the small ones start
    assert scheduler.run_pass().placed == 2
    [(reason, detail)] = stored_reasons(redis_client, big)
    assert reason == "Infeasible" and "the largest GPU offers" in detail


def test_the_kept_ledger_follows_dispatch_and_ends_and_a_gap_rebuilds_it(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    fake_node(redis_client, gpus=2)
    scheduler = Scheduler(Config(), redis_client)
    scheduler._last_lease_check = float("inf")  # no lease check: only the event stream updates it

    def fresh() -> dict[int, object]:
        return {r.job_id: r for r in read_ledger(redis_client)}

    ids = submit(store, 3)
    assert scheduler.run_pass().placed == 3
    scheduler.run_pass()
    assert scheduler.ledger.reservations() == fresh() and set(fresh()) == set(ids)
    run(store, ids[0], 1)
    store.transition(Transition(ids[0], JobState.COMPLETED, {"ended_at": time.time()}, wake=False))
    scheduler.run_pass()
    assert scheduler.ledger.reservations() == fresh() and set(fresh()) == set(ids[1:])
    redis_client.hdel(keys.LEDGER, ids[1])  # behind every script's back, and no event says so
    redis_client.xtrim(keys.EVENTS, maxlen=0)  # ... but a gap: the next pass reads everything
    scheduler.run_pass()
    assert scheduler.ledger.reservations() == fresh() and set(fresh()) == {ids[2]}


def test_the_kept_queue_follows_dependencies_without_events_of_their_own_and_a_gap_rebuilds_it(
    redis_client: redis.Redis,
) -> None:
    store = JobStore(redis_client)
    scheduler = Scheduler(Config(), redis_client)
    scheduler._last_lease_check = float("inf")  # only the event stream updates what it keeps
    [first] = submit(store)
    spec = JobSpec(command=("true",), cwd="/", mem_bytes=GIB, after_ok=(first,), env={"PATH": "/usr/bin:/bin"})
    [second] = store.submit_reserved(store.reserve_ids(1), [spec], user="alice", uid=1000)
    others = submit(store, 2)
    assert scheduler.run_pass().pending == 4
    assert set(scheduler._queue.by_id) == {first, *others}  # `second` waits for `first`
    fake_node(redis_client)
    assert scheduler.run_pass().placed == 3
    run(store, first, 1)
    store.transition(Transition(first, JobState.COMPLETED, {"ended_at": time.time()}, wake=False))
    # `second` has no event of its own: its dependency ended.
    assert scheduler.run_pass().placed == 1
    record = store.get(second)
    assert record is not None and record.state == JobState.ASSIGNED
    late = submit(store, 2, mem=100 * GIB)  # never fit: they stay queued
    scheduler.run_pass()
    assert set(scheduler._queue.by_id) == set(late)
    redis_client.zrem(keys.PENDING, late[0])  # behind every script's back ...
    redis_client.delete(keys.job(late[0]))
    redis_client.xtrim(keys.EVENTS, maxlen=0)  # ... with a gap: everything is read again
    assert scheduler.run_pass().pending == 1
    assert set(scheduler._queue.by_id) == {late[1]}


def full_gpu_queue(
    client: redis.Redis, count: int, *, forecasts: bool = True
) -> tuple[JobStore, Scheduler, int, list[int]]:
    """A node whose one GPU a dispatched 79 GiB job fills (no worker takes it), and `count`
    10 GiB jobs waiting behind it, one pass later: a long queue placement answers as a group.
    `forecasts` False: no start forecast runs (a test hands the scheduler its own)."""
    store = JobStore(client)
    fake_node(client)
    config = Config() if forecasts else Config(scheduler=replace(SchedulerConfig(), eta_interval_s=0.0))
    scheduler = Scheduler(config, client)
    (blocker,) = submit(store, 1, mem=79 * GIB)
    assert scheduler.run_pass().placed == 1
    queued = submit(store, count, mem=10 * GIB)
    scheduler.run_pass()
    return store, scheduler, blocker, queued


def test_the_reasons_a_pass_skips_comparing_are_the_ones_stored(redis_client: redis.Redis) -> None:
    """A long queue's reasons are compared only for jobs whose answer or record changed
    (scheduler/pending.py, `stale_reasons`); every stored reason must still be the current one,
    through a change of answer for all of them, and a job whose record moved on its own."""
    store, scheduler, blocker, queued = full_gpu_queue(redis_client, 40)
    needs = ("Resources", "needs 1x10.0GiB")
    assert set(stored_reasons(redis_client, queued)) == {needs}

    redis_client.delete(keys.node("n1"))  # the node's heartbeat lapses: every answer changes
    scheduler.run_pass()
    assert set(stored_reasons(redis_client, queued)) == {("Resources", "no worker is online")}
    fake_node(redis_client)  # and comes back
    scheduler.run_pass()
    assert set(stored_reasons(redis_client, queued)) == {needs}

    store.transition(lifecycle.hold(queued[7], "alice"))  # its record moves without the scheduler
    scheduler.run_pass()
    store.transition(lifecycle.release(queued[7], "alice"))
    scheduler.run_pass()
    assert set(stored_reasons(redis_client, queued)) == {needs}
    assert stored_reasons(redis_client, [blocker]) != [needs]


def test_a_lapsed_lease_is_reaped_by_the_lease_check_between_full_reads(redis_client: redis.Redis) -> None:
    """Between full reads the active jobs come from the cache; the lease check asks Redis for
    the leases alone (scheduler/active.py, `lapsed`) and must still see one lapse."""
    store, scheduler, ids = dispatched(redis_client, 2)
    run(store, ids[0], 1)
    scheduler.run_pass()
    redis_client.delete(keys.lease(ids[0]))  # its worker is gone
    scheduler._last_lease_check = float("-inf")  # the lease check is due; no full read is
    assert scheduler.run_pass().reaped == 1
    assert store.get(ids[0]).state in (JobState.PENDING, JobState.FAILED)  # type: ignore[union-attr]
    assert store.get(ids[1]).state == JobState.ASSIGNED  # type: ignore[union-attr]


def test_an_active_job_the_event_stream_missed_is_found_by_its_count(redis_client: redis.Redis) -> None:
    _, scheduler, ids = dispatched(redis_client, 1)
    scheduler.run_pass()  # reads the dispatch's own events
    redis_client.srem(keys.ACTIVE, ids[0])  # no event says so: only the count differs
    scheduler.run_pass()
    assert [a.record.id for a in scheduler.active.update(set())] == []


def test_a_new_forecast_rewrites_the_estimates_it_moved_and_only_those(redis_client: redis.Redis) -> None:
    store, scheduler, _, queued = full_gpu_queue(redis_client, 40, forecasts=False)
    soon, later = time.time() + 3600, time.time() + 7200

    def estimates() -> list[float | None]:
        return [r.est_start_at for r in store.get_many(queued)]

    scheduler.forecaster._done = dict.fromkeys(queued, soon)  # a forecast landed
    scheduler.run_pass()
    assert estimates() == [soon] * 40
    scheduler.forecaster._done = {**dict.fromkeys(queued, soon), queued[5]: later}  # the next moved one job
    scheduler.run_pass()
    assert estimates() == [soon] * 5 + [later] + [soon] * 34  # fails if a moved estimate stays clean


def test_estimates_a_forecast_moved_are_written_in_turns_until_all_are(redis_client: redis.Redis) -> None:
    store, scheduler, _, queued = full_gpu_queue(redis_client, 120, forecasts=False)
    soon = time.time() + 3600
    scheduler.forecaster._done = dict.fromkeys(queued, soon)
    written = []
    for _ in range(4):
        scheduler.run_pass()
        written.append(sum(r.est_start_at == soon for r in store.get_many(queued)))
    assert written == [ESTIMATES_PER_PASS, 2 * ESTIMATES_PER_PASS, 120, 120]


def beat_node(client: redis.Redis, name: str, free: int = 80 * GIB, gpus: int = 2) -> None:
    """A node's heartbeat with `free` bytes free on each GPU (a new heartbeat, new bytes)."""
    devices = tuple(GpuDevice(i, f"GPU-{name}-{i}", "Sim", 80 * GIB, free, 80 * GIB - free) for i in range(gpus))
    beat = NodeHeartbeat(name, GpuSnapshot(devices, time.time()), sent_at=time.time())
    client.set(keys.node(name), json.dumps(beat.to_json()), px=600_000)
    client.sadd(keys.NODES, name)


def fresh_running(client: redis.Redis) -> list[RunningJob]:
    ledger = {r.job_id: r for r in read_ledger(client)}
    return [running_job(a.record, ledger.get(a.record.id)) for a in ActiveReader(client).read()]


def fresh_cluster(client: redis.Redis, scheduler: Scheduler) -> ClusterBase:
    """The cluster a pass would start from if it read everything now and kept nothing."""
    beats, _down, drained = NodeReader(client).read()
    ledger = {r.job_id: r for r in read_ledger(client)}
    accounts = build_accounts(beats, list(ledger.values()), scheduler.policy)
    unavailable = frozenset(b.node for b in beats if b.draining) | frozenset(drained)
    return ClusterBase.build(accounts, scheduler.policy, unavailable, fresh_running(client))


def test_the_kept_cluster_follows_heartbeats_ledger_nodes_drains_and_a_flush(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    for name in ("n1", "n2"):
        beat_node(redis_client, name)
    scheduler = Scheduler(Config(), redis_client)
    scheduler._last_lease_check = float("inf")  # no lease check: only the event stream updates it
    ids = submit(store, 3, mem=30 * GIB)
    assert scheduler.run_pass().placed == 3  # a full read: built from scratch

    def kept_is_fresh() -> bool:
        base = scheduler.cluster_base
        return (
            base is not None
            and base.same_as(fresh_cluster(redis_client, scheduler))
            and scheduler.ledger.reservations() == {r.job_id: r for r in read_ledger(redis_client)}
            and {j.id: j for j in base.running} == {j.id: j for j in fresh_running(redis_client)}
        )

    steps: list[tuple[str, Callable[[], object]]] = [
        ("ledger entries appear", lambda: submit(store, 2, mem=20 * GIB)),
        ("a heartbeat changes", lambda: beat_node(redis_client, "n1", free=50 * GIB)),
        (
            "a ledger entry disappears",
            lambda: (
                run(store, ids[0], 1),
                store.transition(Transition(ids[0], JobState.COMPLETED, {"ended_at": time.time()}, wake=False)),
            ),
        ),
        ("a node vanishes", lambda: redis_client.delete(keys.node("n2"))),
        ("the node returns", lambda: beat_node(redis_client, "n2")),
        ("a node is drained", lambda: redis_client.hset(keys.DRAINED, "n1", "maintenance")),
        ("and undrained", lambda: redis_client.hdel(keys.DRAINED, "n1")),
        (
            "a heartbeat changes on a drained node",
            lambda: (
                redis_client.hset(keys.DRAINED, "n2", "x"),
                beat_node(redis_client, "n2", free=70 * GIB),
            ),
        ),
        ("Redis is flushed", lambda: (redis_client.flushall(), beat_node(redis_client, "n1", free=40 * GIB))),
    ]
    for what, step in steps:
        step()
        # The base is what a pass starts from: after a pass that dispatched, Redis is ahead of it.
        while scheduler.run_pass().placed:
            pass
        assert kept_is_fresh(), what


@pytest.mark.parametrize("corrupt", ["accounts", "cluster"])
def test_a_kept_cluster_gone_wrong_is_found_and_replaced_at_the_next_full_read(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture, corrupt: str
) -> None:
    store = JobStore(redis_client)
    for name in ("n1", "n2", "n3"):
        beat_node(redis_client, name)
    scheduler = Scheduler(Config(), redis_client)
    submit(store, 2, mem=30 * GIB)
    scheduler.run_pass()
    scheduler.run_pass()
    base = scheduler.cluster_base
    assert base is not None
    # What a missed invalidation would leave: the kept accounts (or slots) no longer Redis's.
    if corrupt == "accounts":
        base.accounts["n1"][0].committed += 40 * GIB
    else:
        base.slots[-1].avail -= GIB
    scheduler.changes.forget()  # a gap: the next pass reads everything, and compares
    scheduler.run_pass()
    assert scheduler.cluster_base is not None
    assert scheduler.cluster_base.same_as(fresh_cluster(redis_client, scheduler))
    fresh = build_accounts(NodeReader(redis_client).read()[0], read_ledger(redis_client), scheduler.policy)
    assert scheduler.cluster_base.accounts == fresh
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(("GPU accounts" if corrupt == "accounts" else "cluster state") in e for e in errors)


def test_the_active_jobs_and_the_ledger_report_what_came_changed_or_went(redis_client: redis.Redis) -> None:
    """What the pass keeps from the active jobs (its running list, the forecaster's record of
    them) is updated for the ids these report alone: each must name every job that moved."""
    store, _scheduler, ids = dispatched(redis_client, 3)
    reader, ledger = ActiveReader(redis_client), Ledger(redis_client)
    reader.read()
    before = ledger.read()
    assert reader.take_changed() is None and ledger.take_changed() is None  # a whole read: anything
    reader.update(set(ids))
    assert ledger.update(set(ids)) is before  # nothing changed: the same dict
    assert reader.take_changed() == set() and ledger.take_changed() == set()
    run(store, ids[0], 1)
    reader.update(set(ids))
    ledger.update(set(ids))
    assert reader.take_changed() == {ids[0]} and ledger.take_changed() == set()
    store.transition(Transition(ids[1], JobState.CANCELLED, {"ended_at": time.time()}, wake=False))
    reader.update(set(ids))
    after = ledger.update(set(ids))
    assert reader.take_changed() == {ids[1]} and ledger.take_changed() == {ids[1]}
    assert ids[1] not in reader.records and ids[1] not in after and ids[1] in before  # a new dict, the old kept
    entry = json.loads(redis_client.hget(keys.LEDGER, ids[2]))
    redis_client.hset(keys.LEDGER, ids[2], json.dumps({**entry, "gpus": {k: v + 1 for k, v in entry["gpus"].items()}}))
    reader.update({ids[2]})
    assert ledger.update({ids[2]})[ids[2]] != after[ids[2]]
    assert reader.take_changed() == set() and ledger.take_changed() == {ids[2]}
    assert set(reader.records) == {a.record.id for a in ActiveReader(redis_client).read()}


def test_a_cycle_frozen_alive_is_collected_at_the_next_full_read() -> None:
    """The pass freezes what is alive after each full read (scheduler.daemon.collect_and_freeze);
    a reference cycle frozen while alive that dies later must be collected at the next one,
    not kept for the daemon's lifetime (before: frozen objects were never collected again)."""

    class Node:
        peer: Node | None = None

    first, second = Node(), Node()
    first.peer, second.peer = second, first  # a cycle: reference counting alone never frees it
    watch = weakref.ref(first)
    try:
        collect_and_freeze()  # a full read while the cycle is alive
        del first, second
        gc.collect()  # an ordinary collection skips frozen objects
        assert watch() is not None
        collect_and_freeze()  # the next full read
        assert watch() is None
    finally:
        gc.unfreeze()
