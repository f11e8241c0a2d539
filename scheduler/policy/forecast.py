"""Expected start of every waiting job: the queue simulated forward with the real `place()`.

Starting from the cluster as this pass sees it, the simulation asks `place` which jobs start
now, lets them run for their expected duration (time limit, else a learned or default
duration: the caller decides), jumps to the next time a running job is expected to end,
gives its memory back, and asks again - until every job has started, nothing running is
expected to end, or `max_steps` placements were made. Every job placed at simulated time t
gets t as its expected start. Jobs left over get None (unknown: beyond the horizon or
blocked by jobs whose end nobody knows); jobs placement calls Infeasible get None too.

What it cannot know: jobs submitted later with a higher priority, jobs ending early
(cancelled, failed, shorter than their limit), nodes coming or going. So an estimate is
an upper bound only when every running and earlier job has a time limit it will use, and
it is refreshed as the queue changes (docs/ARCHITECTURE.md, "Start estimates").

Pure: `now` and all state are arguments; the accounts passed in are not modified.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from jobs.config import PolicyConfig
from jobs.states import Reason
from scheduler.policy.accounting import AccountingPolicy, GpuAccount
from scheduler.policy.cluster_state import clone
from scheduler.policy.placement import WaitingQueue, place_queue
from scheduler.policy.types import PendingJob, RunningJob

INF = float("inf")


@dataclass(frozen=True)
class Forecast:
    starts: dict[int, float | None]  # job id -> expected start (None: unknown or never)
    steps: int  # placements simulated (the cost: each is one `place` call)
    horizon: float  # simulated time reached; starts beyond it are unknown
    complete: bool  # every job either got a start or can never run


def forecast_starts(
    jobs: list[PendingJob],
    accounts: dict[str, list[GpuAccount]],
    policy: AccountingPolicy,
    *,
    running: list[RunningJob],
    duration_of: Callable[[PendingJob], float | None],
    now: float,
    config: PolicyConfig | None = None,
    usage: Mapping[str, float] | None = None,
    unavailable_nodes: frozenset[str] = frozenset(),
    max_steps: int = 200,
    coalesce_s: float = 60.0,
    coalesce_share: float = 0.05,
) -> Forecast:
    """Expected start of each job in `jobs`. Running jobs' `ends_at` must be filled in by
    the caller where it can be guessed (None = unknown: its memory never comes back here).
    `duration_of(job)` is how long a job started in the simulation runs (None = unknown).

    Ends close together are taken as one step: at simulated time t, every job ending by
    t + max(coalesce_s, coalesce_share * (t - now)) gives its memory back at once. That
    bounds the number of steps on a big cluster (hundreds of running jobs end at distinct
    times) at the price of estimates up to that much early; 0 and 0 make it exact."""
    cluster = SimCluster(accounts, running)
    waiting = {j.id: j for j in jobs}
    starts: dict[int, float | None] = dict.fromkeys(waiting)
    never: set[int] = set()
    t = now
    steps = 0
    sim_running = list(running)
    policy_config = config if config is not None else PolicyConfig()
    queue = WaitingQueue(jobs)  # kept across steps: each step costs what it places, not the queue
    while waiting and steps < max_steps:
        steps += 1
        result = place_queue(
            queue,
            cluster.accounts,
            policy,
            running=sim_running,
            usage=usage,
            now=t,
            unavailable_nodes=unavailable_nodes,
            config=policy_config,
        )
        for a in result.assignments:
            job = waiting.pop(a.job_id)
            queue.discard(job.id)
            starts[job.id] = t
            duration = duration_of(job)
            end = t + duration if duration is not None else None
            started = RunningJob(job.id, job.user, a.node, dict(a.reserved_bytes), a.whole_gpu, end, job.array_id)
            sim_running.append(started)
            cluster.start(started)
        for job_id, why in result.waiting.items():
            if why.reason == Reason.INFEASIBLE:
                never.add(job_id)
        if not result.assignments and all(j in never for j in waiting):
            break
        nxt = cluster.next_end(t)
        if nxt is None:
            break
        t = nxt
        ended = cluster.release_until(t + max(coalesce_s, coalesce_share * (t - now)))
        if ended:
            sim_running = [r for r in sim_running if r.id not in ended]
    complete = all(j in never for j in waiting)
    return Forecast(starts, steps, t, complete)


class SimCluster:
    """The accounts, changed as simulated jobs start and end. An end gives back what the job
    held (its reservation, or the whole card) to both the ledger and NVML sides."""

    def __init__(self, accounts: dict[str, list[GpuAccount]], running: list[RunningJob]) -> None:
        self.accounts = {node: [clone(a) for a in accts] for node, accts in accounts.items()}
        self.by_uuid = {a.uuid: a for accts in self.accounts.values() for a in accts}
        self.whole_jobs: dict[str, int] = {}  # uuid -> whole-GPU jobs on it
        self.ends: list[tuple[float, int]] = []  # heap of (end, job id)
        self.jobs: dict[int, RunningJob] = {}
        for job in running:
            self._track(job)
            if job.whole_gpu:
                for uuid in job.gpus:
                    self.whole_jobs[uuid] = self.whole_jobs.get(uuid, 0) + 1

    def _track(self, job: RunningJob) -> None:
        self.jobs[job.id] = job
        if job.ends_at is not None:
            heapq.heappush(self.ends, (job.ends_at, job.id))

    def start(self, job: RunningJob) -> None:
        for uuid, amount in job.gpus.items():
            acct = self.by_uuid.get(uuid)
            if acct is not None:
                acct.reserve(amount, whole=job.whole_gpu)
                acct.nvml_free = max(0, acct.nvml_free - amount)
                acct.used += amount
                acct.gpulab_used += amount
                acct.pending_growth = max(0, acct.pending_growth - amount)
                if job.whole_gpu:
                    self.whole_jobs[uuid] = self.whole_jobs.get(uuid, 0) + 1
        self._track(job)

    def next_end(self, after: float) -> float | None:
        while self.ends and self.ends[0][1] not in self.jobs:
            heapq.heappop(self.ends)
        if not self.ends:
            return None
        return max(after, self.ends[0][0])

    def release_until(self, t: float) -> set[int]:
        ended: set[int] = set()
        while self.ends and self.ends[0][0] <= t:
            _, job_id = heapq.heappop(self.ends)
            if self.release(job_id):
                ended.add(job_id)
        return ended

    def release(self, job_id: int) -> bool:
        """Give back what a running job holds (False if it is not running here)."""
        job = self.jobs.pop(job_id, None)
        if job is None:
            return False
        for uuid, amount in job.gpus.items():
            acct = self.by_uuid.get(uuid)
            if acct is None:
                continue
            held = acct.total if job.whole_gpu else amount
            acct.jobs = max(0, acct.jobs - 1)
            acct.committed = max(0, acct.committed - held)
            acct.gpulab_reserved = max(0, acct.gpulab_reserved - held)
            acct.gpulab_used = max(0, acct.gpulab_used - held)
            acct.used = max(0, acct.used - held)
            acct.nvml_free = min(acct.total, acct.nvml_free + held)
            acct.pending_growth = min(acct.pending_growth, max(0, acct.committed - acct.gpulab_used))
            if job.whole_gpu:
                left = self.whole_jobs.get(uuid, 1) - 1
                self.whole_jobs[uuid] = left
                acct.whole_gpu_taken = left > 0
        return True


def expected_end(
    job: RunningJob, started_at: float | None, learned_s: float | None, now: float, grace_s: float
) -> RunningJob:
    """A running job with its end filled in for the forecast: its time limit if it has one,
    else start + learned duration, but never before `now + grace_s` (a job past its usual
    duration is expected to end soon, not in the past). Unknown stays unknown (None)."""
    if job.ends_at is not None:
        return job
    if learned_s is None or started_at is None:
        return job
    return replace(job, ends_at=max(started_at + learned_s, now + grace_s))


def same_estimate(old: float | None, new: float | None, now: float) -> bool:
    """Close enough not to rewrite: within 30 s or 5% of the time still to wait. Keeps the
    scheduler from rewriting thousands of records when only the clock moved."""
    if old is None or new is None:
        return old is new
    return abs(old - new) <= max(30.0, 0.05 * max(0.0, min(old, new) - now))
