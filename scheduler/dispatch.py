"""Atomic dispatch: PENDING -> ASSIGNED, ledger reservation, lease, and the RQ job on the
node's queue, for a whole batch in one MULTI/EXEC guarded by WATCH on the job records.

If anything touched one of the jobs since we read it (a cancel, a hold), EXEC fails and
nothing of the batch is written; the next pass sees the new state. A crash before EXEC
writes nothing; after it, everything.
"""

from __future__ import annotations

import json
import time

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from jobs import keys, lifecycle
from jobs.states import JobState
from jobs.store import JobStore
from scheduler.policy.placement import Assignment

LAUNCH_FUNCTION = "worker.tasks.launch"
# The RQ job only hands the launch to the worker; the training run itself is supervised by
# gpulab's leases, so this timeout bounds the hand-over, not the job (RQ's default is 180 s).
LAUNCH_TIMEOUT_S = 120


class Dispatcher:
    def __init__(self, client: redis.Redis, store: JobStore, assign_timeout_s: float) -> None:
        self.client = client
        self.store = store
        self.assign_timeout_s = assign_timeout_s
        self._queues: dict[str, Queue] = {}

    def queue(self, node: str) -> Queue:
        if node not in self._queues:
            self._queues[node] = Queue(keys.node_queue_name(node), connection=self.client, serializer=JSONSerializer)
        return self._queues[node]

    def dispatch(self, assignments: list[Assignment]) -> list[Assignment]:
        """Dispatch what placement decided; return the assignments that were written."""
        if not assignments:
            return []
        job_keys = [keys.job(a.job_id) for a in assignments]
        with self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(*job_keys)
                # Read on another connection: WATCH still catches any change made after it.
                reader = self.client.pipeline(transaction=False)
                for key in job_keys:
                    reader.hmget(key, "state", "attempt")
                current = reader.execute()
                pipe.multi()
                written = []
                for assignment, (state, attempt) in zip(assignments, current, strict=True):
                    if state is None or state.decode() != JobState.PENDING.value:
                        continue
                    self._queue_one(pipe, assignment, int(attempt or b"0") + 1)
                    written.append(assignment)
                if written:
                    pipe.execute()
                return written
            except redis.WatchError:
                return []

    def _queue_one(self, pipe: redis.client.Pipeline, a: Assignment, attempt: int) -> None:
        gpus = [{"index": g.index, "uuid": g.uuid} for g in a.gpus]
        reservation = {"node": a.node, "gpus": a.reserved_bytes, "whole_gpu": a.whole_gpu}
        assigned = lifecycle.assign(a.job_id, attempt, a.node, gpus, reservation, self.assign_timeout_s, time.time())
        self.store.queue_transition(pipe, assigned)
        self.queue(a.node).enqueue_call(
            LAUNCH_FUNCTION,
            args=(a.job_id, attempt),
            timeout=LAUNCH_TIMEOUT_S,
            result_ttl=600,
            failure_ttl=7 * 86400,
            job_id=lifecycle.launch_entry_id(a.job_id, attempt),
            description=json.dumps({"gpulab_job": a.job_id, "attempt": attempt}),
            pipeline=pipe,
        )
