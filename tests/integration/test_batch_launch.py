"""Launches decided in one pass travel in one RQ job per node (scheduler/dispatch.py), and
each launch inside it is still checked on its own by the worker."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from rq import Queue
from rq.serializers import JSONSerializer

from jobs import keys, lifecycle
from jobs.config import Config, WorkerConfig
from jobs.lifecycle import Transition
from jobs.record import JobRecord
from jobs.spec import JobSpec
from jobs.states import JobState, Reason
from jobs.store import Fenced, JobStore, TransitionRefused
from scheduler.dispatch import Dispatcher
from scheduler.policy.accounting import GpuAccount
from scheduler.policy.placement import Assignment
from tests.helpers.stack import Stack, eventually
from worker.daemon import WorkerDaemon
from worker.sim_probe import SimProbe


def _assignment(job_id: int, node: str) -> Assignment:
    gpu = GpuAccount(node, 0, f"GPU-{node}", "Sim", True, 24 * 2**30, 24 * 2**30, 0)
    return Assignment(job_id, node, (gpu,), {f"GPU-{node}": 2**30}, False)


def test_one_rq_job_per_node_carries_the_batch(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    spec = JobSpec(command=("true",), cwd="/", mem_bytes=2**30)
    a, b, c, d = (store.submit(spec, user="u", uid=1) for _ in range(4))
    plan = [_assignment(a, "n1"), _assignment(b, "n1"), _assignment(d, "n2"), _assignment(c, "n1")]
    assert Dispatcher(redis_client, store, 30).dispatch(plan) == plan
    n1 = Queue(keys.node_queue_name("n1"), connection=redis_client, serializer=JSONSerializer)
    n2 = Queue(keys.node_queue_name("n2"), connection=redis_client, serializer=JSONSerializer)
    assert [(j.func_name, j.args) for j in n1.get_jobs()] == [("worker.tasks.launch_many", [[[a, 1], [b, 1], [c, 1]]])]
    assert [(j.func_name, j.args) for j in n2.get_jobs()] == [("worker.tasks.launch", [d, 1])]


def test_a_job_cancelled_inside_a_shared_launch_never_starts(stack: Stack) -> None:
    stack.start_scheduler()
    worker = stack.start_worker()
    worker.proc.send_signal(signal.SIGSTOP)  # the launches wait in the queue
    try:
        first = stack.submit("--mem", "1GiB", "--array", "0-2", "--", "true")
        ids = [first, first + 1, first + 2]
        for job_id in ids:
            stack.wait_state(job_id, JobState.ASSIGNED)
        queue = Queue(keys.node_queue_name("n1"), connection=stack.redis, serializer=JSONSerializer)
        # One launch for all three: still queued, or already moved by the worker's BLMOVE
        # (blocked in Redis before the SIGSTOP, so the server hands it over regardless).
        launches = queue.get_job_ids() + [i.decode() for i in stack.redis.lrange(queue.intermediate_queue_key, 0, -1)]
        assert [queue.fetch_job(i).func_name for i in launches] == ["worker.tasks.launch_many"]  # type: ignore[union-attr]
        assert stack.cli("cancel", str(ids[1])).returncode == 0
        stack.wait_state(ids[1], JobState.CANCELLED)
    finally:
        worker.proc.send_signal(signal.SIGCONT)
    for job_id in (ids[0], ids[2]):
        stack.wait_state(job_id, JobState.COMPLETED)
    cancelled = stack.store.get(ids[1])
    assert cancelled is not None and cancelled.state == JobState.CANCELLED and cancelled.started_at is None
    eventually(lambda: queue.count == 0)


# ---- the worker's side: one batch of launches (worker/daemon.py WorkerDaemon.launch_many) ----
# The daemon runs in the test's process, against the real Redis, with real shims from its fork
# server. Races are made to happen at a chosen step by hooking the step's own callback.

NODE = "bl"


@pytest.fixture
def daemon(tmp_path: Path, redis_client: redis.Redis) -> Iterator[WorkerDaemon]:
    config = Config(state_dir=tmp_path / "state", worker=WorkerConfig(lease_ttl_s=30, kill_grace_s=1))
    (tmp_path / "sim").mkdir()
    worker = WorkerDaemon(config, redis_client, SimProbe(NODE, [2**34], tmp_path / "sim"), NODE, simulated=True)
    worker._claim_name()
    # An aborted shim's end looks for job processes its shim left to this worker (a
    # subreaper) and kills them: in the test's process that would be its Redis server. This
    # process is no subreaper, so no job process can be left to it.
    worker._reap_orphans = lambda: None  # type: ignore[method-assign]
    stopping = threading.Event()
    shipper = threading.Thread(target=worker.logs.run, args=(stopping,), daemon=True)  # ends wait for it
    shipper.start()
    yield worker
    stopping.set()
    shipper.join()
    worker.shim_server.close()


def _assigned(store: JobStore, tmp_path: Path, count: int, cwd: str | None = None) -> list[int]:
    """Jobs ASSIGNED to NODE (attempt 1), each appending its id to tmp_path/ran when it runs."""
    ids = []
    for _ in range(count):
        command = ("/bin/sh", "-c", f'echo "$GPULAB_JOB_ID" >> {tmp_path / "ran"}')
        spec = JobSpec(command=command, cwd=cwd or str(tmp_path), env={"PATH": "/usr/bin:/bin"}, mem_bytes=2**20)
        job_id = store.submit(spec, user="me", uid=os.geteuid())
        gpus = [{"index": 0, "uuid": f"GPU-sim-{NODE}-0"}]
        reservation = {"node": NODE, "gpus": {f"GPU-sim-{NODE}-0": 2**20}, "whole_gpu": False}
        store.transition(lifecycle.assign(job_id, 1, NODE, gpus, reservation, 30, time.time()))
        ids.append(job_id)
    return ids


def _ran(tmp_path: Path) -> list[int]:
    marker = tmp_path / "ran"
    return sorted(int(line) for line in marker.read_text().split()) if marker.exists() else []


def _final(store: JobStore, job_id: int) -> JobRecord:
    record = store.wait_final(job_id, 30)
    assert record is not None and record.is_final, record
    return record


def _on_log_open(daemon: WorkerDaemon, job_id: int, action: Callable[[], object]) -> None:
    """Run `action` when job `job_id`'s shim is being spawned: after the batch's read, before
    any of its start transitions."""
    add = daemon.logs.add

    def hooked(job: int, attempt: int, fd: int, offset: int) -> None:
        add(job, attempt, fd, offset)
        if job == job_id:
            action()

    daemon.logs.add = hooked  # type: ignore[method-assign]


def test_a_batch_starts_each_launch_on_its_own(daemon: WorkerDaemon, tmp_path: Path) -> None:
    """Moved on before the batch, or unable to start: only that launch ends; the others run."""
    store = daemon.store
    a, b, moved = _assigned(store, tmp_path, 3)
    (broken,) = _assigned(store, tmp_path, 1, cwd=str(tmp_path / "nowhere"))
    store.transition(lifecycle.cancel(moved, JobState.ASSIGNED, "test", time.time(), node=NODE, attempt=1))
    results = daemon.launch_many([(a, 1), (moved, 1), (broken, 1), (b, 2), (b, 1)])
    assert results[0].startswith(f"started job {a} ")
    assert results[1] == f"skipped: job {moved} attempt 1 is no longer assigned here"
    assert results[2].startswith("failed: ")
    assert results[3] == f"skipped: job {b} attempt 2 is no longer assigned here"
    assert results[4].startswith(f"started job {b} ")
    assert _final(store, a).state == JobState.COMPLETED
    assert _final(store, b).state == JobState.COMPLETED
    failed = _final(store, broken)
    assert (failed.state, failed.reason) == (JobState.FAILED, Reason.LAUNCH_FAILED.value)
    assert _ran(tmp_path) == [a, b]


def test_a_job_cancelled_while_its_batch_starts_never_runs(daemon: WorkerDaemon, tmp_path: Path) -> None:
    """Read as ASSIGNED, cancelled before its start transition: refused, its shim aborted,
    its command never runs; the rest of the batch starts."""
    store = daemon.store
    a, b, c = _assigned(store, tmp_path, 3)
    cancel = lifecycle.cancel(b, JobState.ASSIGNED, "test", time.time(), node=NODE, attempt=1)
    _on_log_open(daemon, c, lambda: JobStore(daemon.redis).transition(cancel))
    results = daemon.launch_many([(a, 1), (b, 1), (c, 1)])
    assert results[1] == f"skipped: job {b}: cannot go to RUNNING from CANCELLED"
    assert _final(store, a).state == JobState.COMPLETED
    assert _final(store, c).state == JobState.COMPLETED
    cancelled = _final(store, b)
    assert cancelled.state == JobState.CANCELLED and cancelled.started_at is None
    assert _ran(tmp_path) == [a, c]
    assert b not in daemon.runners


def test_a_batch_whose_worker_was_fenced_meanwhile_starts_nothing(
    daemon: WorkerDaemon, tmp_path: Path, redis_client: redis.Redis
) -> None:
    """Another worker took the node's name while the batch's shims started: every start
    transition is refused on the token, no command runs, and this worker leaves (SIGTERM)."""
    store = daemon.store
    ids = _assigned(store, tmp_path, 3)
    _on_log_open(daemon, ids[0], lambda: redis_client.incr(keys.node_epoch(NODE)))
    signalled: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: signalled.append(signum))
    try:
        results = daemon.launch_many([(job_id, 1) for job_id in ids])
        eventually(lambda: signalled)  # the handler runs in this (main) thread
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert results == [f"skipped: job {job_id}: this worker was fenced off node {NODE}" for job_id in ids]
    assert daemon.fenced.is_set()
    for job_id in ids:
        record = store.get(job_id)
        assert record is not None and record.state == JobState.ASSIGNED and record.started_at is None
    assert daemon.runners == {}
    assert _ran(tmp_path) == []


def test_a_job_stopped_between_its_start_and_go_never_runs(daemon: WorkerDaemon, tmp_path: Path) -> None:
    """A cancel that reaches the worker after the batch's start transitions, before "go"
    (what the control thread does on `cancel <job> <attempt>`): that command never runs, and
    its end says so; the others run."""
    store = daemon.store
    a, b, c = _assigned(store, tmp_path, 3)
    transition_each = store.transition_each

    def then_cancel(transitions: list[Transition]) -> list[str | TransitionRefused | Fenced | redis.RedisError]:
        outcomes = transition_each(transitions)
        daemon.runners[b].stop("cancelled")
        return outcomes

    store.transition_each = then_cancel  # type: ignore[method-assign]
    daemon.launch_many([(a, 1), (b, 1), (c, 1)])
    assert _final(store, a).state == JobState.COMPLETED
    assert _final(store, c).state == JobState.COMPLETED
    cancelled = _final(store, b)
    assert (cancelled.state, cancelled.detail) == (JobState.CANCELLED, "cancelled before it started")
    assert _ran(tmp_path) == [a, c]
