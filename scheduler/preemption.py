"""Preemption for the scheduler loop: feeds the pure policy (scheduler/policy/preemption.py)
and asks the victims' workers to stop them. The worker sends SIGTERM (the built-in loop
checkpoints), SIGKILL after `kill_grace_s`, and requeues the job with reason Preempted
(`lifecycle.preempted`).

Which victims are still stopping is kept here, in memory: a restarted scheduler forgets it,
and at worst asks again for a job that is already stopping (the worker ignores a second
request for the same attempt).
"""

from __future__ import annotations

import logging

import redis

from jobs.config import Config
from jobs.lifecycle import Fence
from jobs.record import JobRecord
from jobs.store import JobStore
from scheduler.policy.accounting import AccountingPolicy, GpuAccount
from scheduler.policy.placement import rank
from scheduler.policy.preemption import Candidate, Preemption, choose_preemption
from scheduler.policy.types import PendingJob, RunningJob

log = logging.getLogger("gpulab.scheduler")


class Preemptor:
    def __init__(self, client: redis.Redis, config: Config) -> None:
        self.store = JobStore(client)
        self.config = config
        self.stopping: dict[int, int] = {}  # victim id -> its attempt, until it leaves the active set

    def run(
        self,
        now: float,
        waiting: list[PendingJob],  # the jobs this pass left waiting, in any order
        expected: dict[int, float | None],
        active: list[JobRecord],
        running: list[RunningJob],
        accounts: dict[str, list[GpuAccount]],
        policy: AccountingPolicy,
        usage: dict[str, float],
        unavailable: frozenset[str],
        fence: Fence | None = None,
    ) -> Preemption | None:
        """Choose and ask for at most one preemption; the request carries the leader's `fence`
        (jobs.store.Fenced when a newer scheduler leads)."""
        if self.config.policy.preempt_after_s <= 0:
            return None
        live = {r.id: r.attempt for r in active}
        self.stopping = {j: a for j, a in self.stopping.items() if live.get(j) == a}
        if not waiting:
            return None
        waiting = rank(waiting, usage, {r.user for r in running}, now, self.config.policy)
        records = {r.id: r for r in active}
        candidates = [
            Candidate(
                job,
                records[job.id].spec.priority,
                records[job.id].started_at or now,
                records[job.id].spec.may_be_preempted and records[job.id].started_at is not None,
            )
            for job in running
            if job.id in records
        ]
        chosen = choose_preemption(
            waiting,
            candidates,
            accounts,
            policy,
            config=self.config.policy,
            expected=expected,
            usage=usage,
            now=now,
            stopping=frozenset(self.stopping),
            unavailable_nodes=unavailable,
        )
        if chosen is None:
            return None
        for victim in chosen.victims:
            record = records[victim]
            log.info("preempting job %s on %s %s", victim, record.node, chosen.detail)
            if self.store.request_preempt(victim, record.node, record.attempt, chosen.job_id, chosen.detail, fence):
                self.stopping[victim] = record.attempt
        return chosen
