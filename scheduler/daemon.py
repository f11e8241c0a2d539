"""The scheduler loop: reap -> read node snapshots -> place (pure) -> dispatch -> reasons.

Event-driven: it blocks on the wake list (pushed by submit, finish, cancel, node up) with a
short timeout for housekeeping, so a submit on an idle cluster starts within milliseconds.
All state is in Redis; this process keeps nothing it cannot rebuild, so it can be killed
and restarted at any moment.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import redis

from jobs import keys, scripts
from jobs.config import Config
from jobs.record import JobRecord
from jobs.states import JobState, Reason
from jobs.store import JobStore, Transition, TransitionRefused
from scheduler.accounting import AccountingPolicy, build_accounts
from scheduler.cluster import read_heartbeats, read_ledger
from scheduler.dispatch import Dispatcher
from scheduler.placement import PendingJob, place

log = logging.getLogger("gpulab.scheduler")


@dataclass(frozen=True)
class PassStats:
    pending: int
    placed: int
    reaped: int
    duration_s: float


def accounting_policy(config: Config) -> AccountingPolicy:
    s = config.scheduler
    return AccountingPolicy(s.headroom_bytes, s.spike_buffer_bytes, s.idle_gpu_max_used_bytes)


class Scheduler:
    def __init__(self, config: Config, client: redis.Redis) -> None:
        self.config = config
        self.redis = client
        self.store = JobStore(client)
        self.policy = accounting_policy(config)
        self.dispatcher = Dispatcher(client, self.store, config.scheduler.assign_timeout_s)

    def run_forever(self, stop: threading.Event) -> None:
        interval = self.config.scheduler.housekeeping_interval_s
        while not stop.is_set():
            try:
                self.run_pass()
                self.redis.blpop([keys.WAKE], timeout=interval)
                self.redis.delete(keys.WAKE)  # coalesce: one pass answers every wake so far
            except redis.ConnectionError as exc:
                log.warning("redis unreachable (%s); retrying", exc)
                stop.wait(min(interval, 1.0))

    def run_pass(self) -> PassStats:
        started = time.perf_counter()
        reaped = self.reap()
        beats, _down = read_heartbeats(self.redis)
        ledger = read_ledger(self.redis)
        waiting = self.store.waiting()
        pending = [r for r in waiting if r.state == JobState.PENDING]
        accounts = build_accounts(beats, ledger, self.policy)
        draining = frozenset(b.node for b in beats if b.draining)
        jobs = [PendingJob(r.id, r.spec.gpus, r.spec.mem_bytes, r.spec.priority, r.user) for r in pending]
        result = place(jobs, accounts, self.policy, unavailable_nodes=draining)
        placed = self.dispatcher.dispatch(result.assignments)
        if len(placed) != len(result.assignments):
            self.store.wake_scheduler()  # something changed under us: look again at once
        self._write_reasons(pending, result.waiting)
        duration = time.perf_counter() - started
        self.redis.hset(
            keys.SCHEDULER_STATUS,
            mapping={"pid": os.getpid(), "last_pass_at": time.time(), "last_pass_ms": round(duration * 1000, 3)},
        )
        return PassStats(len(pending), len(placed), reaped, duration)

    def _write_reasons(self, pending: list[JobRecord], waiting: dict) -> None:
        pipe = self.redis.pipeline(transaction=False)
        changed = False
        for record in pending:
            why = waiting.get(record.id)
            if why is not None and (record.reason, record.detail) != (why.reason.value, why.detail):
                # Only while still PENDING: a blind HSET could overwrite a newer state's reason.
                pipe.eval(
                    scripts.SET_PENDING_REASON,
                    2,
                    keys.job(record.id),
                    keys.job_events(record.id),
                    why.reason.value,
                    why.detail,
                    repr(time.time()),
                )
                changed = True
        if changed:
            pipe.execute()

    def reap(self) -> int:
        """Jobs whose lease expired: their worker is gone (or never took them)."""
        active = self.store.active()
        if not active:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for record in active:
            pipe.exists(keys.lease(record.id))
            pipe.hget(keys.job(record.id), "cancel_requested")
        answers = pipe.execute()
        reaped = 0
        for i, record in enumerate(active):
            if answers[2 * i]:
                continue
            try:
                self.store.transition(self._lost_transition(record, bool(answers[2 * i + 1])))
                reaped += 1
            except TransitionRefused:
                pass  # it finished or moved in the meantime: nothing to do
        return reaped

    def _lost_transition(self, record: JobRecord, cancel_requested: bool) -> Transition:
        guard = ("attempt", str(record.attempt))
        expect = frozenset({record.state})
        where = f"node {record.node} lost (lease expired)"
        if cancel_requested:
            return Transition(
                record.id,
                JobState.CANCELLED,
                {"reason": Reason.CANCELLED.value, "ended_at": time.time()},
                expect,
                guard=guard,
                detail=where,
            )
        if record.state == JobState.ASSIGNED:
            detail = f"node {record.node} did not start it; requeued"
            return Transition(
                record.id,
                JobState.PENDING,
                {"reason": "", "detail": detail, "node": "", "gpus": ""},
                expect,
                guard=guard,
                detail=detail,
            )
        if record.spec.requeue and record.attempt <= self.config.scheduler.max_requeues:
            return Transition(
                record.id,
                JobState.PENDING,
                {"reason": Reason.REQUEUED.value, "detail": where, "node": "", "gpus": "", "pid": ""},
                expect,
                guard=guard,
                detail=where,
            )
        if record.spec.requeue:
            detail = f"{where}; held after {record.attempt} attempts"
            return Transition(
                record.id,
                JobState.HELD,
                {"reason": Reason.HELD.value, "detail": detail, "node": "", "gpus": "", "pid": ""},
                expect,
                guard=guard,
                detail=detail,
            )
        return Transition(
            record.id,
            JobState.FAILED,
            {"reason": Reason.NODE_LOST.value, "detail": where, "ended_at": time.time()},
            expect,
            guard=guard,
            detail=where,
        )
