"""The scheduler loop: reap -> read nodes, jobs and usage -> dependencies -> place (pure)
-> dispatch -> reasons.

Event-driven: it blocks on the wake list (pushed by submit, finish, cancel, node up) with a
short timeout for housekeeping, so a submit on an idle cluster starts within milliseconds.
All state is in Redis; this process keeps nothing it cannot rebuild, so it can be killed
and restarted at any moment. What it keeps between passes (the waiting and active jobs) is
kept current from the event stream (scheduler/changes.py): a pass re-reads the jobs that
changed, not the whole queue; it reads everything again at start, on a gap in the stream,
when the count of waiting (or active) jobs disagrees with Redis, and every RESYNC_S.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import time
from dataclasses import dataclass, replace

import redis

from jobs import keys, lifecycle
from jobs.config import Config
from jobs.lifecycle import Fence, Transition
from jobs.record import JobRecord
from jobs.states import JobState, Reason
from jobs.store import Fenced, JobStore, TransitionRefused
from scheduler.active import Active, ActiveReader
from scheduler.changes import ChangeFeed
from scheduler.cluster import AccountBook, Ledger, NodeReader
from scheduler.counters import MetricCounters
from scheduler.dependencies import DependencyReader
from scheduler.dispatch import Dispatcher
from scheduler.forecast import Forecaster
from scheduler.leader import Leadership
from scheduler.pending import PendingReader
from scheduler.policy.accounting import AccountingPolicy, GpuAccount, Reservation
from scheduler.policy.cluster_state import ClusterBase
from scheduler.policy.dependencies import evaluate
from scheduler.policy.inputs import pending_job, running_job
from scheduler.policy.placement import Waiting, WaitingQueue, place_queue
from scheduler.policy.types import RunningJob
from scheduler.preemption import Preemptor
from scheduler.usage import UsageTracker

log = logging.getLogger("gpulab.scheduler")

RESYNC_S = 60.0  # a full read of every waiting and active job at least this often, as a check


@dataclass(frozen=True)
class PassStats:
    pending: int
    placed: int
    reaped: int
    duration_s: float
    reservations: int = 0
    place_s: float = 0.0  # the pure placement alone


def accounting_policy(config: Config) -> AccountingPolicy:
    s = config.scheduler
    return AccountingPolicy(s.headroom_bytes, s.spike_buffer_bytes, s.idle_gpu_max_used_bytes)


class Scheduler:
    def __init__(self, config: Config, client: redis.Redis, leader: Leadership | None = None) -> None:
        self.config = config
        # With `leader`, passes run only while this scheduler holds the lease, and every write
        # carries its fence; without (tests, benchmarks), it is the only scheduler.
        self.leader = leader
        self.fence: Fence | None = None
        self.redis = client
        self.store = JobStore(client)
        self.policy = accounting_policy(config)
        self.dispatcher = Dispatcher(client, self.store, config.scheduler.assign_timeout_s)
        self.pending = PendingReader(client)
        self.active = ActiveReader(client, self.pending.known)  # a dispatched job is not parsed again
        self.ledger = Ledger(client)
        self.nodes = NodeReader(client)
        # The GPU accounts and the cluster placement starts from, kept between passes and
        # rebuilt node by node where their inputs changed; compared with fresh builds at
        # every full read (`_cluster_base`).
        self.book = AccountBook(self.policy)
        self.cluster_base: ClusterBase | None = None
        self.dependencies = DependencyReader(client)
        self.usage = UsageTracker(client, config.policy.fairshare_half_life_s)
        self.forecaster = Forecaster(client, config)
        self._queue = WaitingQueue()  # the eligible jobs, grouped for placement
        # job id -> the attempt queued, and of which job (an id names another job once Redis
        # was flushed or lost its last writes: scheduler/pending.py, `_instance`)
        self._queued: dict[int, tuple[int, float]] = {}
        self._with_deps: dict[int, JobRecord] = {}  # waiting jobs that name dependencies
        self.changes = ChangeFeed(client)
        self._last_full = -RESYNC_S  # time.monotonic() of the last full read of the waiting jobs
        self._frozen_at = self._last_full  # ... after which the caches were frozen (_freeze_caches)
        self._last_lease_check = -RESYNC_S  # ... of the active jobs and their leases
        self._ledger: dict[int, Reservation] = {}  # the reservations, as of this pass's read
        self._running: dict[int, tuple[JobRecord, Reservation | None, RunningJob]] = {}  # see _running_jobs
        self._running_list: list[RunningJob] = []  # ... the RunningJob values of `_running`
        self.preemptor = Preemptor(client, config)
        self.counters = MetricCounters(client)  # folded every few seconds: no stream entry is trimmed uncounted

    def run_forever(self, stop: threading.Event) -> None:
        """Pass after pass until `stop`. Nothing a user stored or Redis answered ends the loop:
        an unreachable or read-only Redis (restart, failover, MISCONF) is waited out with
        backoff, and any other error is logged and the pass retried."""
        interval = self.config.scheduler.housekeeping_interval_s
        backoff = 0.1
        while not stop.is_set():
            if not self._lead(stop):
                continue
            try:
                self.run_pass()
                self.counters.maybe_fold()
                self.redis.blpop([keys.WAKE], timeout=interval)
                self.redis.delete(keys.WAKE)  # coalesce: one pass answers every wake so far
                backoff = 0.1
            except Fenced as exc:
                assert self.leader is not None
                self.leader.step_down(f"a write was refused: a newer leader holds the fence ({exc})")
                continue
            except redis.ConnectionError as exc:
                log.warning("redis unreachable (%s); retrying in %.1fs", exc, backoff)
            except redis.ResponseError as exc:  # MISCONF, READONLY, OOM: writes refused for now
                log.warning("redis refused a write (%s); retrying in %.1fs", exc, backoff)
            except Exception:
                log.exception("scheduler pass failed; retrying in %.1fs", backoff)
            else:
                continue
            stop.wait(backoff)
            backoff = min(backoff * 2, min(interval, 5.0))

    def _lead(self, stop: threading.Event) -> bool:
        """Whether to run a pass now: as the leader, with its fence for every write; a follower
        waits (a short while) for the lease instead."""
        if self.leader is None:
            return True
        previous = self.fence
        self.fence = self.dispatcher.fence = self.forecaster.fence = self.leader.fence()
        if self.fence != previous:
            # A new term: another leader may have written meanwhile (reasons make no event),
            # so what this one kept in memory is read again whole.
            self.changes.forget()
        if self.fence is None and self.leader.gained.wait(self.leader.poll_s):
            stop.wait(self.leader.poll_s)  # leads, but its lease is not confirmed (Redis away)
        return self.fence is not None

    def _fenced(self, t: Transition) -> Transition:
        """The loop's transitions carry the leader's fence (refused once a newer leader exists)."""
        return t if self.fence is None else replace(t, fence=self.fence)

    def run_pass(self) -> PassStats:
        try:
            stats = self._run_pass()
        except BaseException:
            self.changes.forget()  # the events read this pass may not have been applied
            raise
        if self._frozen_at != self._last_full:
            self._freeze_caches()
        return stats

    def _freeze_caches(self) -> None:
        """After a full read (at start, on a gap, every RESYNC_S), after the pass: the records
        the readers keep (10k-100k jobs) then never make a later collection long: a full
        collection over them, at any pass that allocates, cost a 1k-job pass ~50 ms (on a
        2-core machine)."""
        self._frozen_at = self._last_full
        started = time.perf_counter()
        collect_and_freeze()
        log.debug("froze %d objects in %.1f ms", gc.get_freeze_count(), (time.perf_counter() - started) * 1000)

    def _read_jobs(self, invalid: dict[int, str]) -> tuple[list[Active], int, bool]:
        """(active jobs, how many were reaped, whether everything was read), the waiting jobs
        in `pending`: re-read what the event stream
        says changed, everything when it cannot say; leases are checked (and expired ones
        reaped) once per housekeeping interval."""
        clock = time.monotonic()
        changed, waiting_count, active_count = self.changes.poll()
        full = changed is None or clock - self._last_full >= RESYNC_S
        lapsed: list[Active] = []  # the active jobs whose lease is known gone: the reaper's
        if full:
            self.changes.mark()  # before reading everything: later changes show in the next poll
            self._last_lease_check = clock
            current = self._read_active_whole(invalid)
            lapsed = [a for a in current if not a.has_lease]
        else:
            current = self.active.update(changed or set(), invalid)
            self._ledger = self.ledger.update(changed or set())
            if not changed and active_count != len(current):
                log.warning("active jobs: %d in Redis, %d known; reading them all", active_count, len(current))
                current = self._read_active_whole(invalid)
                lapsed = [a for a in current if not a.has_lease]
            if clock - self._last_lease_check >= self.config.scheduler.housekeeping_interval_s:
                self._last_lease_check = clock
                lapsed = self.active.lapsed()
        reaped = self.reap(lapsed) if lapsed else 0
        if reaped:
            current = self._read_active_whole(invalid)
        if not full and changed is not None:
            self.pending.apply(changed, invalid)
            if not changed and waiting_count != len(self.pending):
                log.warning("waiting jobs: %d in Redis, %d known; reading them all", waiting_count, len(self.pending))
                full = True
                self.changes.mark()
                # The entries since the poll are skipped by that mark: the active jobs and the
                # ledger they changed are read again too (a job that ended then kept its GPUs).
                current = self._read_active_whole(invalid)
        if full:
            self._last_full = clock
            self.pending.read(invalid)
        return current, reaped, full

    def _read_active_whole(self, invalid: dict[int, str]) -> list[Active]:
        """Every active job and the ledger read again, together: the ledger is what they hold."""
        current = self.active.read(invalid)
        self._ledger = self.ledger.read()
        return current

    def _run_pass(self) -> PassStats:
        started = time.perf_counter()
        now = time.time()
        invalid: dict[int, str] = {}
        _current, reaped, full = self._read_jobs(invalid)
        records = self.active.records  # the active jobs' records (ActiveReader keeps them)
        active = list(records.values())
        # What came, changed or went among them and in the ledger (None: anything, after a
        # full read): what the pass derives from them is updated for those alone.
        active_changed, ledger_changed = self.active.take_changed(), self.ledger.take_changed()
        moved = None if active_changed is None or ledger_changed is None else active_changed | ledger_changed
        beats, _down, drained = self.nodes.read()
        ledger = self._ledger  # read with the active jobs (scheduler/cluster.py, Ledger)
        if invalid:
            self.quarantine(invalid)
        accounts = self.book.checked(beats, ledger) if full else self.book.build(beats, ledger)
        unavailable = frozenset(b.node for b in beats if b.draining) | frozenset(drained)
        whole_gpu_bytes = self.book.largest_gpu
        usage = self.usage.update(now, active, ledger, whole_gpu_bytes)
        touched = self.pending.take_touched()
        if full:
            self.dependencies.forget()
        self._track_dependencies(touched)
        blocked = self._dependencies()
        reasons = {k: v for k, v in blocked.items() if v.reason == Reason.DEPENDENCY}
        running = self._running_jobs(records, ledger, moved)
        base = self._cluster_base(accounts, unavailable, running, full)
        self._sync_queue(touched, blocked)
        preempting = self.config.policy.preempt_after_s > 0
        place_started = time.perf_counter()
        result = place_queue(
            self._queue,
            accounts,
            self.policy,
            config=self.config.policy,
            running=running,
            usage=usage,
            now=now,
            unavailable_nodes=unavailable,
            merge_bulk=preempting,  # a 100k-entry dict costs ~5 ms a pass; only preemption reads it
            base=base,
        )
        place_s = time.perf_counter() - place_started
        placed = self.dispatcher.dispatch(result.assignments)
        if len(placed) != len(result.assignments):
            self.store.wake_scheduler()  # something changed under us: look again at once
        reasons.update(result.single)  # with the dependencies': the jobs answered one by one
        starts = self.forecaster.update(
            now, self._queue.by_id, self.pending.known, accounts, self.policy,
            running, records, moved, usage, unavailable,
        )  # fmt: skip
        left = (  # built only for preemption: a pass over the whole queue
            [j for i, j in self._queue.by_id.items() if i in result.waiting] if preempting else []
        )
        self.preemptor.run(now, left, starts, active, running, accounts, self.policy, usage, unavailable, self.fence)
        duration = time.perf_counter() - started
        status = {  # written with the reasons, in one round trip: the pass up to its last write
            "pid": os.getpid(),
            "last_pass_at": time.time(),
            "last_pass_ms": round(duration * 1000, 3),
            "last_place_ms": round(place_s * 1000, 3),
            "pending": len(self._queue),
            "reservations": len(result.reservations),
            "last_eta_ms": round(self.forecaster.last_ms, 3),
            "last_eta_steps": self.forecaster.last_steps,
        }
        self._write_reasons(reasons, result.bulk, starts, status)
        duration = time.perf_counter() - started
        pending = len(self._queue) + sum(1 for i in blocked if self._is_pending(i))
        return PassStats(pending, len(placed), reaped, duration, len(result.reservations), place_s)

    def _cluster_base(
        self, accounts: dict[str, list[GpuAccount]], unavailable: frozenset[str], running: list[RunningJob], full: bool
    ) -> ClusterBase:
        """The cluster placement starts from, built from last pass's where the inputs allow
        (scheduler/policy/cluster_state.py); at a full read also from scratch, to compare."""
        base = ClusterBase.build(accounts, self.policy, unavailable, running, self.cluster_base)
        if full and self.cluster_base is not None:
            fresh = ClusterBase.build(accounts, self.policy, unavailable, running)
            if not base.same_as(fresh):
                log.error("the cluster state kept between passes differs from a fresh build; built again")
                base = fresh
        self.cluster_base = base
        return base

    def _running_jobs(
        self, records: dict[int, JobRecord], ledger: dict[int, Reservation], moved: set[int] | None
    ) -> list[RunningJob]:
        """Placement's view of the active jobs. A job whose record and reservation are the
        same objects as last pass (the readers keep what did not change) is not rebuilt, and
        only the jobs in `moved` are looked at (None: every one, after a full read); the list
        is a new one only when something in it changed (ClusterBase compares it by identity)."""
        if moved is None:
            cache: dict[int, tuple[JobRecord, Reservation | None, RunningJob]] = {}
            for record in records.values():
                reservation = ledger.get(record.id)
                known = self._running.get(record.id)
                if known is None or known[0] is not record or known[1] is not reservation:
                    known = (record, reservation, running_job(record, reservation))
                cache[record.id] = known
            self._running = cache
        else:
            cache = self._running
            changed = False
            for job_id in moved:
                now_active = records.get(job_id)
                if now_active is None:
                    changed = cache.pop(job_id, None) is not None or changed
                    continue
                reservation = ledger.get(job_id)
                known = cache.get(job_id)
                if known is None or known[0] is not now_active or known[1] is not reservation:
                    cache[job_id] = (now_active, reservation, running_job(now_active, reservation))
                    changed = True
            if not changed:
                return self._running_list
        self._running_list = [known[2] for known in self._running.values()]
        return self._running_list

    def _sync_queue(self, touched: set[int] | None, blocked: dict[int, Waiting]) -> None:
        """Keep the grouped queue placement works on (scheduler/policy/queue.py) equal to the
        eligible jobs (PENDING, not waiting on a dependency): a job's placement inputs do not
        change within an attempt, so only jobs that came, went or started a new attempt are
        touched, and only the jobs the reader says changed (and those with dependencies) are
        looked at; after a full read (`touched` None), every job."""
        if touched is None:
            candidates = set(self._queued) | set(self.pending.ids())
        else:
            candidates = touched | self._with_deps.keys()
        pending = JobState.PENDING
        for job_id in sorted(candidates):
            record = self.pending.known(job_id)
            if record is None or record.state is not pending or job_id in blocked:
                if self._queued.pop(job_id, None) is not None:
                    self._queue.discard(job_id)
            elif self._queued.get(job_id) != (record.attempt, record.submitted_at):
                self._queue.add(pending_job(record))
                self._queued[job_id] = (record.attempt, record.submitted_at)

    def _track_dependencies(self, touched: set[int] | None) -> None:
        """Keep `_with_deps` (the waiting jobs that name dependencies) current."""
        if touched is None:
            self._with_deps = {r.id: r for r in self.pending.records() if r.spec.after_ok or r.spec.after_any}
            return
        for job_id in touched:
            record = self.pending.known(job_id)
            if record is not None and (record.spec.after_ok or record.spec.after_any):
                self._with_deps[job_id] = record
            else:
                self._with_deps.pop(job_id, None)

    def _dependencies(self) -> dict[int, Waiting]:
        """Why the waiting jobs with dependencies wait (reason Dependency, or never satisfied:
        those are cancelled); the others are free to run."""
        with_deps = [self._with_deps[i] for i in sorted(self._with_deps)]
        states = self.dependencies.states(with_deps) if with_deps else {}
        blocked: dict[int, Waiting] = {}
        for record in with_deps:
            verdict = evaluate(record.spec, states)
            if verdict.never:
                self._cancel_never_satisfied(record, verdict.detail)
                blocked[record.id] = Waiting(Reason.DEPENDENCY_NEVER_SATISFIED, verdict.detail)
            elif not verdict.ready:
                blocked[record.id] = Waiting(Reason.DEPENDENCY, verdict.detail)
        return blocked

    def _is_pending(self, job_id: int) -> bool:
        record = self.pending.known(job_id)
        return record is not None and record.state == JobState.PENDING

    def _cancel_never_satisfied(self, record: JobRecord, detail: str) -> None:
        # If it moved meanwhile (cancelled, released), the next pass looks again.
        with contextlib.suppress(TransitionRefused):
            self.store.transition(
                self._fenced(
                    lifecycle.cancel(record.id, record.state, detail, time.time(), Reason.DEPENDENCY_NEVER_SATISFIED)
                )
            )

    def quarantine(self, invalid: dict[int, str]) -> None:
        """Records that no longer parse end FAILED with the reason, and an admin-visible event
        (`gpulab doctor`); the pass goes on without them."""
        for job_id, why in invalid.items():
            log.error("job %s: %s; quarantined (FAILED)", job_id, why)
            self.redis.xadd(keys.QUARANTINE, {"job": job_id, "why": why, "at": repr(time.time())}, maxlen=1000)
            state = self.store.raw_state(job_id)
            if state is None or state.value not in {s.value for s in lifecycle.QUARANTINABLE}:
                continue
            with contextlib.suppress(TransitionRefused):
                self.store.transition(self._fenced(lifecycle.quarantine(job_id, state, why, time.time())))

    def _write_reasons(
        self,
        single: dict[int, Waiting],
        bulk: list[tuple[list[int], Waiting]],
        starts: dict[int, float | None],
        status: dict[str, float | int],
    ) -> None:
        """Write the reasons that changed (scheduler/pending.py, `stale_reasons`), with the start
        estimates: a reservation's own, else the forecast's; and the pass's `status`."""
        now = time.time()
        stale = self.pending.stale_reasons(single, bulk, starts, now)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(keys.SCHEDULER_STATUS, mapping=status)
        infos = [(job_id, why.reason.value, why.detail, est_start) for job_id, why, est_start in stale]
        if infos:
            self.store.queue_pending_infos(pipe, infos, repr(now), self.fence)
        for job_id, reason, detail, est_start in infos:
            self.pending.remember_reason(job_id, reason, detail, est_start)
        if -1 in pipe.execute():
            raise Fenced("pending reasons refused")

    def reap(self, active: list[Active] | None = None) -> int:
        """Jobs whose lease expired: their worker is gone (or never took them)."""
        if active is None:
            active = self.active.read()
        reaped = 0
        lost_nodes: set[str] = set()
        for job in active:
            if job.has_lease:
                continue
            record = job.record
            verdict = lifecycle.lost(
                record.id,
                record.state,
                record.attempt,
                record.node,
                record.spec,
                job.cancel_requested,
                self.config.scheduler.max_requeues,
                time.time(),
            )
            try:
                self.store.transition(self._fenced(verdict))
                reaped += 1
            except TransitionRefused:
                continue  # it finished or moved in the meantime: nothing to do
            if record.node:
                lost_nodes.add(record.node)
        if lost_nodes:
            # A node that let a lease lapse is not offered again until it publishes a new
            # heartbeat: its last one can outlive the lease by a moment, and a job requeued
            # from a dead worker was then placed straight back on it (a third attempt after
            # the assign timeout; test_killed_worker_jobs_are_requeued_on_a_live_node).
            self.redis.delete(*(keys.node(n) for n in sorted(lost_nodes)))
        return reaped


def collect_and_freeze() -> None:
    """Collect everything, the objects frozen last time included, then move every object
    alive into the collector's permanent generation, where later collections skip them.
    Records are freed by reference counting when replaced (they hold no cycles); a cycle
    frozen while alive that died since is collected here, at the next full read, not leaked
    (`gc.unfreeze` first: ~70 ms over 100k records' objects, once a full read)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
