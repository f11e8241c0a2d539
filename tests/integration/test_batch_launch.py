"""Launches decided in one pass travel in one RQ job per node (scheduler/dispatch.py), and
each launch inside it is still checked on its own by the worker."""

from __future__ import annotations

import signal

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from jobs import keys
from jobs.spec import JobSpec
from jobs.states import JobState
from jobs.store import JobStore
from scheduler.dispatch import Dispatcher
from scheduler.policy.accounting import GpuAccount
from scheduler.policy.placement import Assignment
from tests.helpers.stack import Stack, eventually


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
