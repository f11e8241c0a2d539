"""Atomic dispatch: PENDING -> ASSIGNED, ledger reservation, lease, and the RQ job on the
node's queue, for a whole batch in one MULTI/EXEC guarded by WATCH on the job records.

If anything touched one of the jobs since we read it (a cancel, a hold), EXEC fails and
nothing of the batch is written; the next pass sees the new state. A crash before EXEC
writes nothing; after it, everything. With a leader's fence, the fence key is WATCHed too
and must still hold it: once a newer leader exists, this scheduler's EXEC writes nothing
(raises Fenced).

The launches of one batch travel in one RQ job per node (up to LAUNCHES_PER_ENTRY each,
`worker.tasks.launch_many`) instead of one RQ job per launch: RQ's cost per job (enqueue
here, dequeue and bookkeeping in the worker) was most of a launch's hand-over. A lone
launch keeps its own entry (`worker.tasks.launch`, id `launch_entry_id`), which a cancel
can take back; a launch inside a shared entry is taken back by the worker's check that
the job is still ASSIGNED to that attempt on that node when it comes to it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from jobs import keys, lifecycle
from jobs.lifecycle import Fence, Transition
from jobs.states import JobState
from jobs.store import Fenced, JobStore
from scheduler.policy.placement import Assignment

LAUNCH_FUNCTION = "worker.tasks.launch"
# The RQ job only hands the launch to the worker; the training run itself is supervised by
# gpulab's leases, so this timeout bounds the hand-over, not the job (RQ's default is 180 s).
LAUNCH_TIMEOUT_S = 120
# Test hook (tests/integration/test_leader.py): "1" makes the scheduler SIGSTOP itself once,
# right before its first dispatch EXEC, the worst moment for a leader to freeze.
STOP_BEFORE_EXEC_ENV = "GPULAB_TEST_STOP_BEFORE_DISPATCH_EXEC"

LAUNCH_MANY_FUNCTION = "worker.tasks.launch_many"
# Launches per shared RQ job: each takes a shim start (~30-40 ms), so 64 stay far inside
# LAUNCH_TIMEOUT_S even on a loaded host, and a node's first jobs do not wait for its last.
LAUNCHES_PER_ENTRY = 64

log = logging.getLogger("gpulab.dispatch")


class Dispatcher:
    def __init__(self, client: redis.Redis, store: JobStore, assign_timeout_s: float) -> None:
        self.client = client
        self.store = store
        self.assign_timeout_s = assign_timeout_s
        self.fence: Fence | None = None  # the leader's, set by the loop before each pass
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
        fence = self.fence
        with self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(*job_keys, *([fence.key] if fence else []))
                # Read on another connection: WATCH still catches any change made after it.
                # One script call for every job (JOB_FIELDS), not one command each to pack.
                current = self.store.job_fields([a.job_id for a in assignments], ("state", "attempt"))
                if fence and _text(self.client.get(fence.key)) != fence.token:
                    raise Fenced("dispatch refused: a newer leader holds the fence")
                pipe.multi()
                written = []
                transitions = []
                launches: dict[str, list[tuple[int, int]]] = {}
                now = time.time()
                for assignment, (state, attempt) in zip(assignments, current, strict=True):
                    if state != JobState.PENDING.value:
                        continue
                    transitions.append(self._assign(assignment, int(attempt or "0") + 1, now))
                    launches.setdefault(assignment.node, []).append((assignment.job_id, int(attempt or "0") + 1))
                    written.append(assignment)
                self.store.queue_transitions(pipe, transitions)  # one command for the batch
                for node, pairs in launches.items():
                    for start in range(0, len(pairs), LAUNCHES_PER_ENTRY):
                        self._queue_launches(pipe, node, pairs[start : start + LAUNCHES_PER_ENTRY])
                if written:
                    _stop_here_if_asked()
                    pipe.execute()
                return written
            except redis.WatchError:
                if fence and _text(self.client.get(fence.key)) != fence.token:
                    log.warning("dispatch of %d jobs refused: a newer leader holds the fence", len(assignments))
                    raise Fenced("dispatch refused: a newer leader holds the fence") from None
                return []

    def _assign(self, a: Assignment, attempt: int, now: float) -> Transition:
        gpus = [{"index": g.index, "uuid": g.uuid} for g in a.gpus]
        reservation = {"node": a.node, "gpus": a.reserved_bytes, "whole_gpu": a.whole_gpu}
        return lifecycle.assign(a.job_id, attempt, a.node, gpus, reservation, self.assign_timeout_s, now)

    def _queue_launches(self, pipe: redis.client.Pipeline, node: str, pairs: list[tuple[int, int]]) -> None:
        if len(pairs) > 1:
            first, first_attempt = pairs[0]
            self.queue(node).enqueue_call(
                LAUNCH_MANY_FUNCTION,
                args=([list(p) for p in pairs],),
                timeout=LAUNCH_TIMEOUT_S,
                result_ttl=600,
                failure_ttl=7 * 86400,
                job_id=f"gpulab-batch-{first}-{first_attempt}",  # (job, attempt) is dispatched once
                description=json.dumps({"gpulab_jobs": [p[0] for p in pairs]}),
                pipeline=pipe,
            )
            return
        [(job_id, attempt)] = pairs
        self.queue(node).enqueue_call(
            LAUNCH_FUNCTION,
            args=(job_id, attempt),
            timeout=LAUNCH_TIMEOUT_S,
            result_ttl=600,
            failure_ttl=7 * 86400,
            job_id=lifecycle.launch_entry_id(job_id, attempt),
            description=json.dumps({"gpulab_job": job_id, "attempt": attempt}),
            pipeline=pipe,
        )


def _text(value: bytes | None) -> str | None:
    return value.decode() if value is not None else None


def _stop_here_if_asked() -> None:
    if os.environ.pop(STOP_BEFORE_EXEC_ENV, "") == "1":
        print("test hook: stopping before dispatch EXEC", flush=True)
        # At this thread, not the process: kill(getpid()) may be taken by another thread, and
        # this one ran on and sent its EXEC before the stop reached it (the loop has a thread
        # of its own since the scheduler stops promptly).
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
