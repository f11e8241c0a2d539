"""The scheduler's preemption request (scripts.REQUEST_PREEMPT) against a real Redis: it
reaches only a still-RUNNING attempt, carries the leader's fence (refused, with nothing
written, once a newer scheduler leads), and tells the job's worker in the same step."""

from __future__ import annotations

import time

import pytest
import redis

from jobs import keys, lifecycle
from jobs.lifecycle import Attempt, Fence
from jobs.spec import JobSpec
from jobs.store import Fenced, JobStore


def test_a_preemption_request_is_fenced_and_only_for_the_running_attempt(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    job_id = store.submit(JobSpec(command=("true",), cwd="/", mem_bytes=2**30), user="u", uid=0)
    now = time.time()
    gpus = [{"index": 0, "uuid": "GPU-0"}]
    store.transition(lifecycle.assign(job_id, 1, "n1", gpus, {"node": "n1", "gpus": {"GPU-0": 2**30}}, 10, now))
    redis_client.set(keys.node_epoch("n1"), "7")
    store.transition(lifecycle.start(Attempt(job_id, 1, "n1", Fence(keys.node_epoch("n1"), "7")), 1, "/l", 10, now))
    leader = Fence("test:leader-fence", "3")
    redis_client.set(leader.key, "3")
    control = keys.node_control("n1")

    assert not store.request_preempt(job_id, "n1", 2, 99, "for job 99", leader)  # not that attempt
    assert redis_client.llen(control) == 0
    assert store.request_preempt(job_id, "n1", 1, 99, "for job 99", leader)
    assert redis_client.lrange(control, 0, -1) == [f"preempt {job_id} 1 99".encode()]
    assert redis_client.hget(keys.job(job_id), "preempt_requested") == b"99"
    assert store.history(job_id)[-1]["reason"] == "Preempted"

    redis_client.set(leader.key, "4")  # a newer scheduler leads now
    with pytest.raises(Fenced):
        store.request_preempt(job_id, "n1", 1, 100, "for job 100", leader)
    assert redis_client.llen(control) == 1 and redis_client.hget(keys.job(job_id), "preempt_requested") == b"99"
