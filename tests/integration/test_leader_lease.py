"""The leader lease and its fence against a real redis-server: one leader among many
contenders, and every kind of loop write refused once a newer leadership exists
(docs/ARCHITECTURE.md, "Leader and fencing"). The daemons' failover is in test_leader.py."""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import redis

from cli.doctor import check_leader
from jobs import keys, lifecycle
from jobs.config import Config, SchedulerConfig
from jobs.lifecycle import Fence
from jobs.spec import JobSpec
from jobs.states import JobState
from jobs.store import Fenced, JobStore
from scheduler.dispatch import Dispatcher
from scheduler.leader import Leadership, read_leader
from scheduler.policy.accounting import GpuAccount
from scheduler.policy.placement import Assignment
from scheduler.redis_server import RedisServer
from tests.helpers.stack import eventually, free_port


def _spec() -> JobSpec:
    return JobSpec(command=("true",), cwd="/", mem_bytes=2**30)


def _assignment(job_id: int) -> Assignment:
    gpu = GpuAccount("n1", 0, "GPU-x", "Sim", True, 24 * 2**30, 24 * 2**30, 0)
    return Assignment(job_id, "n1", (gpu,), {"GPU-x": 2**30}, False)


def _fence_of(leader: Leadership) -> Fence:
    fence = leader.fence()
    assert fence is not None
    return fence


def test_contenders_started_at_the_same_instant_elect_one(redis_client: redis.Redis) -> None:
    contenders = [Leadership(redis_client, 5.0, f"h:{n} /s{n}") for n in range(8)]
    start = threading.Barrier(len(contenders))

    def contend(leader: Leadership) -> None:
        start.wait()
        leader.tick()

    threads = [threading.Thread(target=contend, args=(c,)) for c in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    leaders = [c for c in contenders if c.fence() is not None]
    assert len(leaders) == 1
    assert redis_client.get(keys.LEADER_FENCE).decode() == _fence_of(leaders[0]).token
    assert redis_client.get(keys.LEADER_EPOCH) == b"1"
    view = read_leader(redis_client, alive_within_s=60)
    assert view.holder == leaders[0].holder and view.epoch == 1
    assert sorted(view.alive) == sorted(c.holder for c in contenders)
    for c in contenders:  # a second round changes nothing: the leader renews, the others wait
        c.tick()
    assert [c for c in contenders if c.fence() is not None] == leaders
    assert redis_client.get(keys.LEADER_EPOCH) == b"1"


def test_a_stale_leader_can_write_nothing(redis_client: redis.Redis) -> None:
    """The ex-leader's lease lapsed (it was paused) and a successor took over: its dispatch,
    reaper transition and pending-reason write are all refused in Redis, and its renewal
    tells it to step down."""
    store = JobStore(redis_client)
    old = Leadership(redis_client, 0.5, "old")
    old.tick()
    stale = _fence_of(old)
    eventually(lambda: redis_client.get(keys.LEADER) is None, timeout=10)  # the lease ran out (Redis's TTL)
    new = Leadership(redis_client, 5.0, "new")
    new.tick()
    assert new.fence() is not None and _fence_of(new).token.startswith("2:")

    waiting = store.submit(_spec(), user="ann", uid=1000)
    dispatcher = Dispatcher(redis_client, store, 10)
    dispatcher.fence = stale
    try:
        dispatcher.dispatch([_assignment(waiting)])
        raise AssertionError("a stale dispatch went through")
    except Fenced:
        pass
    record = store.get(waiting)
    assert record is not None and record.state == JobState.PENDING and record.attempt == 0
    assert redis_client.hlen(keys.LEDGER) == 0
    assert redis_client.exists(keys.rq_job(lifecycle.launch_entry_id(waiting, 1))) == 0

    try:  # the TRANSITION script, as the reaper, quarantine and dependency cancels use it
        store.transition(replace(lifecycle.hold(waiting, "the old leader"), fence=stale))
        raise AssertionError("a stale transition went through")
    except Fenced:
        pass
    assert store.raw_state(waiting) == JobState.PENDING

    pipe = redis_client.pipeline(transaction=False)
    store.queue_pending_infos(pipe, [(waiting, "Resources", "stale", None)], repr(time.time()), stale)
    assert pipe.execute() == [-1]
    assert store.get(waiting).reason != "Resources"  # type: ignore[union-attr]

    old.tick()  # its renewal finds the lease someone else's: it steps down
    assert old.fence() is None
    # The current leader's writes go through.
    dispatcher.fence = _fence_of(new)
    assert dispatcher.dispatch([_assignment(waiting)]) == [_assignment(waiting)]
    assert store.raw_state(waiting) == JobState.ASSIGNED


def test_lease_survives_retry_and_is_freed_on_release(redis_client: redis.Redis) -> None:
    first = Leadership(redis_client, 5.0, "first")
    first.tick()
    fence = _fence_of(first).token
    # A retried acquire whose first reply was lost: the same lease comes back, no new epoch.
    first._fence = None
    first.tick()
    assert _fence_of(first).token == fence and redis_client.get(keys.LEADER_EPOCH) == b"1"
    assert 0 < redis_client.pttl(keys.LEADER) <= 5000  # a Redis TTL, not a timestamp of a host clock
    second = Leadership(redis_client, 5.0, "second")
    first.release()
    second.tick()
    assert _fence_of(second).token.startswith("2:")
    assert read_leader(redis_client, 60).alive == ["second"]


def test_redis_losing_its_data_under_the_leader_ends_its_epoch(redis_client: redis.Redis) -> None:
    """A Redis restarted without its data forgets the lease and the epoch counter: the old
    leader's fence is refused, and the new leadership's fence differs even though its epoch
    number repeats (the token is random)."""
    store = JobStore(redis_client)
    leader = Leadership(redis_client, 5.0, "l")
    leader.tick()
    before = _fence_of(leader)
    redis_client.flushall()
    job = store.submit(_spec(), user="ann", uid=1000)
    dispatcher = Dispatcher(redis_client, store, 10)
    dispatcher.fence = before
    try:
        dispatcher.dispatch([_assignment(job)])
        raise AssertionError("a fence from before the data loss went through")
    except Fenced:
        pass
    leader.tick()  # renewal fails, and it takes the free lease again
    after = _fence_of(leader)
    assert after.token.startswith("1:") and after.token != before.token


def test_doctor_fails_without_a_leader_while_schedulers_are_alive(redis_client: redis.Redis, tmp_path: Path) -> None:
    config = Config(state_dir=tmp_path, scheduler=SchedulerConfig(leader_lease_s=5.0))
    [check] = check_leader(redis_client, config)
    assert check.level == "FAIL" and "no scheduler is alive" in check.message
    leader = Leadership(redis_client, 5.0, "head:42 /run/gpulab.sock")
    follower = Leadership(redis_client, 5.0, "other:7 /run/gpulab.sock")
    leader.tick()
    follower.tick()
    [check] = check_leader(redis_client, config)
    assert check.level == "ok", check
    assert "head:42 /run/gpulab.sock, epoch 1" in check.message and "2 scheduler(s) alive" in check.message
    redis_client.delete(keys.LEADER)  # the lease gone, schedulers still alive
    [check] = check_leader(redis_client, config)
    assert check.level == "FAIL" and "no scheduler holds the leader lease while 2 scheduler(s) alive" in check.message


def test_a_release_stuck_on_a_silent_redis_still_names_the_lease_it_holds(tmp_path: Path) -> None:
    """Break (a suite run): a SIGTERM'd leader cut off from Redis did not say its lease was left
    to lapse. Its release() forgets the fence at once (the loop must stop believing it leads)
    and then waits on Redis; the stopping main thread asked `fence()` and heard "not leading"."""
    server = RedisServer(tmp_path / "silent-redis", port=free_port())
    server.start()
    assert server.proc is not None
    client = redis.Redis.from_url(server.url, socket_timeout=30)
    leader = Leadership(client, 5.0, "h:1 /s1")
    leader.tick()
    epoch = leader.unreleased_epoch()
    assert epoch is not None and leader.fence() is not None
    server.proc.send_signal(signal.SIGSTOP)
    releasing = threading.Thread(target=leader.release, daemon=True)
    try:
        releasing.start()
        eventually(lambda: leader.fence() is None)
        assert releasing.is_alive()  # still waiting for Redis
        assert leader.unreleased_epoch() == epoch
    finally:
        server.proc.send_signal(signal.SIGCONT)
    releasing.join(timeout=30)
    assert not releasing.is_alive()
    assert leader.unreleased_epoch() is None  # Redis answered: handed back
    assert client.get(keys.LEADER) is None
    server.stop()
