"""Faults injected into the real stack: a worker that never starts its job, the scheduler
killed mid-dispatch, redis-server killed and restarted. Nothing may be lost or doubled."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import redis

from jobs import keys
from jobs.gpus import GpuDevice, GpuSnapshot, NodeHeartbeat
from jobs.states import JobState
from scheduler.redis_server import RedisServer
from tests.helpers.stack import Stack, eventually, free_port, release


def _fake_node(client: redis.Redis, name: str) -> None:
    """A node that heartbeats (as far as Redis can tell) but whose worker never takes jobs."""
    device = GpuDevice(0, f"GPU-ghost-{name}", "Ghost", 24 * 2**30, 24 * 2**30, 0)
    beat = NodeHeartbeat(name, GpuSnapshot((device,), time.time()), sent_at=time.time())
    client.set(keys.node(name), json.dumps(beat.to_json()), px=60_000)
    client.sadd(keys.NODES, name)


def test_job_assigned_to_a_worker_that_never_starts_it_is_requeued(
    make_stack: Callable[..., Stack], redis_client: redis.Redis
) -> None:
    stack = make_stack(scheduler={"assign_timeout_s": 1})
    _fake_node(redis_client, "ghost")
    stack.start_scheduler()
    job_id = stack.submit("--mem", "1GiB", "--", "true")
    assert stack.wait_state(job_id, JobState.ASSIGNED).node == "ghost"
    redis_client.delete(keys.node("ghost"))  # the ghost vanishes with the job assigned to it
    requeued = stack.wait_state(job_id, JobState.PENDING)
    assert "did not start it" in requeued.detail and requeued.state == JobState.PENDING
    stack.start_worker("real")
    done = stack.wait_state(job_id, JobState.COMPLETED)
    assert (done.node, done.attempt) == ("real", 2)


def _check_invariants(client: redis.Redis, total: int) -> None:
    """Every job in exactly one index matching its state; the ledger is the active jobs.
    Read as one MULTI snapshot: the worker keeps finishing jobs meanwhile."""
    pipe = client.pipeline(transaction=True)
    pipe.zrange(keys.PENDING, 0, -1)
    pipe.smembers(keys.ACTIVE)
    pipe.zrange(keys.FINISHED, 0, -1)
    pipe.hkeys(keys.LEDGER)
    for job_id in range(1, total + 1):
        pipe.hget(keys.job(job_id), "state")
    raw_pending, raw_active, raw_finished, raw_ledger, *states = pipe.execute()
    pending, active, finished = ({int(i) for i in raw} for raw in (raw_pending, raw_active, raw_finished))
    assert pending | active | finished == set(range(1, total + 1))
    assert not (pending & active or pending & finished or active & finished)
    for job_id, raw_state in zip(range(1, total + 1), states, strict=True):
        state = raw_state.decode()
        index = "pending" if job_id in pending else "active" if job_id in active else "finished"
        expected = {"PENDING": "pending", "HELD": "pending", "ASSIGNED": "active", "RUNNING": "active"}
        assert expected.get(state, "finished") == index, (job_id, state, index)
    assert {int(i) for i in raw_ledger} == active


def test_scheduler_killed_mid_dispatch_loses_nothing(stack: Stack) -> None:
    scheduler = stack.start_scheduler()
    stack.start_worker("n1", "4x24GiB")
    total = 60
    for _ in range(total):
        stack.store.submit(_true_spec(stack), user="t", uid=0)  # straight into Redis: fast
    stack.store.wake_scheduler()
    # Kill it while it is placing and dispatching (some jobs already ASSIGNED).
    stack.wait_for(1, lambda r: r.state != JobState.PENDING)
    scheduler.stop(signal.SIGKILL)
    _check_invariants(stack.redis, total)
    stack.daemons.remove(scheduler)
    stack.start_scheduler()
    for job_id in range(1, total + 1):
        assert stack.wait_state(job_id, JobState.COMPLETED).attempt == 1
    _check_invariants(stack.redis, total)
    assert stack.redis.hlen(keys.LEDGER) == 0


def _true_spec(stack: Stack) -> object:
    from jobs.spec import JobSpec

    return JobSpec(command=("true",), cwd=str(stack.tmp_path), mem_bytes=2**30, env={"PATH": "/usr/bin:/bin"})


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "own-redis", port=free_port())
    server.start()
    yield server
    server.stop()


def test_redis_killed_and_restarted_keeps_acknowledged_jobs_and_running_work(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    client = redis.Redis.from_url(own_redis.url)
    stack = Stack(tmp_path, own_redis.url, client)
    try:
        stack.start_scheduler()
        stack.start_worker()
        fifo = stack.fifo("job")
        running = stack.submit("--mem", "1GiB", *stack.hold_job_args("1GiB", fifo))
        stack.wait_state(running, JobState.RUNNING)
        stack.wait_log(running, "holding")
        acknowledged = stack.submit("--hold", "--", "true")
        own_redis.stop(kill=True)  # kill -9 right after the submit was acknowledged

        down = stack.cli("queue")
        assert down.returncode == 1 and len(down.stderr.strip().splitlines()) == 1
        assert "Redis" in down.stderr

        own_redis.start()  # same data dir: AOF replay
        client = redis.Redis.from_url(own_redis.url)
        stack.redis = client
        from jobs.store import JobStore

        stack.store = JobStore(client)
        assert stack.store.get(acknowledged).state == JobState.HELD  # type: ignore[union-attr]
        assert stack.store.get(running).state == JobState.RUNNING  # type: ignore[union-attr]
        release(fifo)  # the job kept running through the outage
        assert stack.wait_state(running, JobState.COMPLETED).exit_code == 0
        assert stack.cli("release", str(acknowledged)).returncode == 0
        assert stack.wait_state(acknowledged, JobState.COMPLETED).exit_code == 0
        late = stack.submit("--mem", "1GiB", "--", sys.executable, "-c", "print('after the outage')")
        assert stack.wait_state(late, JobState.COMPLETED).exit_code == 0
    finally:
        stack.stop()


def _gone(pid: int | None) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_job_that_finished_as_its_lease_expired_is_not_run_again(stack: Stack) -> None:
    scheduler = stack.start_scheduler()
    worker = stack.start_worker()
    fifo = stack.fifo("job")
    job_id = stack.submit("--requeue", "--mem", "1GiB", *stack.hold_job_args("0", fifo))
    pid = stack.wait_state(job_id, JobState.RUNNING).pid
    stack.wait_log(job_id, "holding")
    worker.proc.send_signal(signal.SIGSTOP)  # the worker freezes: no lease renewals
    try:
        # The job finishes at once, while its worker is frozen. (Left running, its shim would
        # stop it before the lease lapses: a frozen worker cannot keep a job alive.)
        release(fifo)
        eventually(lambda: _gone(pid))
        requeued = stack.wait_state(job_id, JobState.PENDING)  # lease expired: the reaper requeued it
        assert requeued.attempt == 1
        scheduler.proc.send_signal(signal.SIGSTOP)  # hold the scheduler so the race is decided here
    finally:
        worker.proc.send_signal(signal.SIGCONT)
        try:
            done = stack.wait_state(job_id, JobState.COMPLETED)
        finally:
            scheduler.proc.send_signal(signal.SIGCONT)
    assert (done.attempt, done.exit_code, done.node) == (1, 0, "n1")
    assert "lease lapsed" in stack.store.history(job_id)[-1]["detail"]
    assert [e["state"] for e in stack.store.history(job_id)].count("RUNNING") == 1


@pytest.mark.slow
def test_job_that_kills_its_worker_every_time_is_held_after_the_requeue_limit(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(scheduler={"max_requeues": 2})
    stack.start_scheduler()
    # Its parent is its shim; above the shim is the shim server, then the worker (`cli worker`).
    killer = (
        "import os, signal\n"
        "pid = os.getppid()\n"
        "while pid > 1:\n"
        "    if b'worker' in open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\\0'):\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "        break\n"
        "    pid = int(open(f'/proc/{pid}/stat').read().rpartition(')')[2].split()[1])\n"
    )
    job_id = stack.submit("--requeue", "--mem", "1GiB", "--", sys.executable, "-c", killer)
    for attempt in (1, 2, 3):
        worker = stack.start_worker()
        assert worker.proc.wait(timeout=60) == -signal.SIGKILL  # the job took it down
        stack.daemons.remove(worker)
        record = stack.wait_for(job_id, lambda r: r.state in (JobState.PENDING, JobState.HELD))
        assert record.attempt == attempt
    assert record.state == JobState.HELD and "held after 3 attempts" in record.detail


def test_job_using_more_than_its_request_is_flagged_at_once(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker()
    fifo = stack.fifo("greedy")
    job_id = stack.submit("--mem", "2GiB", *stack.hold_job_args("3GiB", fifo))
    flagged = stack.wait_for(job_id, lambda r: r.state == JobState.RUNNING)
    # The warning comes with the worker's next heartbeat (no event of its own): poll `show`.
    shown = eventually(lambda: (j := json.loads(stack.cli("show", "--json", str(job_id)).stdout))["mem_warning"] and j)
    assert "3.0GiB" in shown["mem_warning"] and "2.0GiB" in shown["mem_warning"]
    assert flagged.spec.mem_bytes == 2 * 2**30
    release(fifo)
    stack.wait_state(job_id, JobState.COMPLETED)
