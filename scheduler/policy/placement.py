"""The placement policy: a pure function from (pending jobs, GPU accounts, running jobs,
fair-share usage, now, policy) to assignments plus a reason for every job left waiting.
No I/O, so it is property-tested, benchmarked at scale and replayed over traces.

Order: priority = weight_priority * --priority + weight_fairshare * F(user) + weight_age *
A(waited) (see scheduler/fairshare.py), ties by submission. Jobs are placed in that order;
one that does not fit does not block smaller ones behind it (backfill), except that a job
blocked longer than `reserve_after_s` holds the GPUs where it will fit first
(scheduler/reservations.py). GPUs are chosen best-fit - the smallest hole that holds the
job, on one node for multi-GPU jobs - to keep large holes whole.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping

from jobs.config import PolicyConfig
from jobs.sizes import format_size
from jobs.states import Reason
from scheduler.policy.accounting import AccountingPolicy, GpuAccount
from scheduler.policy.cluster_state import IGNORE_HOLDS, INF, ClusterBase, ClusterState, clone
from scheduler.policy.fairshare import fairshare_factors
from scheduler.policy.feasibility import Feasibility, Shape
from scheduler.policy.limits import UserLimits
from scheduler.policy.queue import WaitingQueue
from scheduler.policy.reservations import reserve
from scheduler.policy.types import (
    Assignment,
    PendingJob,
    PlacementResult,
    ReservationPlan,
    RunningJob,
    Waiting,
)

__all__ = [
    "Assignment",
    "PendingJob",
    "PlacementResult",
    "RunningJob",
    "Waiting",
    "WaitingQueue",
    "order_jobs",
    "place",
    "place_queue",
]

_DEFAULT_POLICY = PolicyConfig()


def rank(
    jobs: list[PendingJob], usage: Mapping[str, float], running_users: set[str], now: float, config: PolicyConfig
) -> list[PendingJob]:
    """Jobs in scheduling order: highest priority first (the sum `priority_parts` breaks
    down), then oldest, then lowest id. Inlined: this runs for every pending job each pass."""
    factors = fairshare_factors(usage, running_users | {j.user for j in jobs})
    wp, wf, wa, max_age = config.weight_priority, config.weight_fairshare, config.weight_age, config.max_age_s
    if max_age <= 0:
        max_age, now = 1.0, math.inf  # every job counts as fully aged
    decorated = []
    for j in jobs:
        waited = now - j.submitted_at
        age = 0.0 if waited <= 0 else (1.0 if waited >= max_age else waited / max_age)
        decorated.append((-(wp * j.priority + wf * factors[j.user] + wa * age), j.submitted_at, j.id, j))
    decorated.sort(key=lambda d: d[:3])
    return [d[3] for d in decorated]


def order_jobs(jobs: list[PendingJob]) -> list[PendingJob]:
    """Order by --priority alone (no usage, no aging): what `place` does with default weights at t=0."""
    return rank(jobs, {}, set(), 0.0, _DEFAULT_POLICY)


class _Front:
    """Shapes that failed this pass. Placing only takes room away and holds only add
    restrictions, so a job at least as large - more GPUs, more memory, ending no earlier,
    same constraints - fails too and is answered without a search. Covered shapes stay
    covered for the rest of the pass, so those answers are remembered."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[bool, str, str], list[tuple[int, int, float]]] = {}
        self._covered: set[tuple[tuple[bool, str, str], int, int, float]] = set()

    def covers(self, key: tuple[bool, str, str], gpus: int, mem: int, end: float) -> bool:
        shape = (key, gpus, mem, end)
        if shape in self._covered:
            return True
        if any(g <= gpus and m <= mem and e <= end for g, m, e in self._by_key.get(key, ())):
            self._covered.add(shape)
            return True
        return False

    def add(self, key: tuple[bool, str, str], gpus: int, mem: int, end: float) -> None:
        entries = self._by_key.setdefault(key, [])
        entries[:] = [x for x in entries if not (gpus <= x[0] and mem <= x[1] and end <= x[2])]
        entries.append((gpus, mem, end))


def place(
    jobs: list[PendingJob],
    accounts: dict[str, list[GpuAccount]],
    policy: AccountingPolicy,
    *,
    config: PolicyConfig = _DEFAULT_POLICY,
    running: list[RunningJob] | tuple[RunningJob, ...] = (),
    usage: Mapping[str, float] | None = None,
    now: float = 0.0,
    unavailable_nodes: frozenset[str] = frozenset(),
) -> PlacementResult:
    """Decide which pending jobs start now and where. Nothing passed in is modified.
    `result.order` lists every job in scheduling order (the daemon's `place_queue` skips it)."""
    result = place_queue(
        WaitingQueue(jobs),
        accounts,
        policy,
        config=config,
        running=running,
        usage=usage,
        now=now,
        unavailable_nodes=unavailable_nodes,
    )
    running_users = {r.user for r in running}
    result.order = [j.id for j in rank(jobs, usage or {}, running_users, now, config)]
    return result


def place_queue(
    queue: WaitingQueue,
    accounts: dict[str, list[GpuAccount]],
    policy: AccountingPolicy,
    *,
    config: PolicyConfig = _DEFAULT_POLICY,
    running: list[RunningJob] | tuple[RunningJob, ...] = (),
    usage: Mapping[str, float] | None = None,
    now: float = 0.0,
    unavailable_nodes: frozenset[str] = frozenset(),
    skip_blocked_groups: bool = True,
    merge_bulk: bool = True,
    base: ClusterBase | None = None,
) -> PlacementResult:
    """`place` over a grouped queue: jobs are taken in scheduling order by merging the
    groups' heads (scheduler/policy/queue.py), and a group whose shape cannot start this
    pass, and whose later jobs can neither reserve nor meet a cap or throttle, is answered
    whole with that shape's reason - the rest of the group is never looked at one by one.
    The result is the same as looking at every job (`skip_blocked_groups=False`, which the
    property tests compare); `result.order` is left empty. With `merge_bulk` False the
    group-answered jobs are in `result.bulk` only, not also in `result.waiting`. `base`: the
    cluster built from these same accounts, running jobs and unavailable nodes (the caller
    may keep it between passes, see ClusterBase); built here when not given."""
    if base is not None and not (
        base.accounts is accounts
        and base.running is running
        and base.unavailable == unavailable_nodes
        and base.policy == policy
    ):
        raise ValueError("the cluster base was built from other inputs")
    running = list(running)
    cluster = ClusterState(base or ClusterBase.build(accounts, policy, unavailable_nodes, running))
    feasible = Feasibility(accounts, policy.headroom_bytes)
    limits = UserLimits(config, running)
    result = PlacementResult()
    hard, soft = _Front(), _Front()  # fails even ignoring holds / fails because of holds
    # Shapes known to fail even ignoring holds, with their one explanation: most of a long
    # queue is answered from here, without a search (the pass's cost floor per waiting job).
    blocked: dict[tuple[bool, str, str, int, int], Waiting] = {}
    waiting = result.waiting
    any_cap, reserve_after, max_reservations = limits.any_cap, config.reserve_after_s, config.max_reservations
    factors = fairshare_factors(usage or {}, {r.user for r in running} | queue.users())
    wp, wf, wa = config.weight_priority, config.weight_fairshare, config.weight_age
    max_age, age_now = config.max_age_s, now
    if max_age <= 0:
        max_age, age_now = 1.0, math.inf  # every job counts as fully aged

    def order_key(j: PendingJob) -> tuple[float, float, int]:  # as `rank` orders jobs
        waited = age_now - j.submitted_at
        age = 0.0 if waited <= 0 else (1.0 if waited >= max_age else waited / max_age)
        return (-(wp * j.priority + wf * factors[j.user] + wa * age), j.submitted_at, j.id)

    if wa >= 0:
        groups = list(queue.groups.values())
        group_ids = list(queue.ids.values())
    else:  # a negative age weight puts newer jobs first: one group, sorted whole
        groups = [sorted(queue, key=order_key)]
        group_ids = [[j.id for j in groups[0]]]
        skip_blocked_groups = False
    heads = [(*order_key(group[0]), g, 0) for g, group in enumerate(groups)]
    heapq.heapify(heads)

    def consider(job: PendingJob) -> None:
        if any_cap:
            why = limits.blocked(job)
            if why is not None:
                waiting[job.id] = Waiting(Reason.USER_LIMIT, why)
                return
        if job.array_throttle:
            why = limits.throttled(job)
            if why is not None:
                waiting[job.id] = Waiting(Reason.ARRAY_TASK_LIMIT, why)
                return
        whole = job.mem_bytes is None or job.exclusive
        mem = job.mem_bytes or 0
        signature = (whole, job.node, job.gpu_model, job.gpus, mem)
        known = blocked.get(signature)
        if known is not None and (
            len(result.reservations) >= max_reservations or now - job.submitted_at < reserve_after
        ):
            waiting[job.id] = known
            return
        end = now + job.time_limit_s if job.time_limit_s else INF
        key = (whole, job.node, job.gpu_model)
        if hard.covers(key, job.gpus, mem, 0.0):
            choice, fits_without_holds = None, False
        elif soft.covers(key, job.gpus, mem, end):
            choice, fits_without_holds = None, True
        else:
            choice = cluster.find(job, end)
            fits_without_holds = choice is None and bool(cluster.held) and cluster.find(job, IGNORE_HOLDS) is not None
            if choice is None:
                if fits_without_holds:
                    soft.add(key, job.gpus, mem, end)
                else:
                    hard.add(key, job.gpus, mem, 0.0)
        if choice is None:
            plan = _try_reserve(job, cluster, result, config, now)
            if plan is not None:
                waiting[job.id] = _reserved(job, plan)
            elif fits_without_holds:
                waiting[job.id] = _held_back(job, cluster)
            else:
                if signature not in blocked:
                    blocked[signature] = _blocked(job, cluster, feasible, accounts, unavailable_nodes)
                waiting[job.id] = blocked[signature]
            return
        node, slots = choice
        amounts = [s.acct.total if whole else mem for s in slots]
        if whole:
            why = limits.over_memory(job.user, sum(amounts))
            if why is not None:
                waiting[job.id] = Waiting(Reason.USER_LIMIT, why)
                return
        slots = cluster.take(slots, amounts, whole, end)
        reserved = {s.acct.uuid: a for s, a in zip(slots, amounts, strict=True)}
        result.assignments.append(Assignment(job.id, node, tuple(clone(s.acct) for s in slots), reserved, whole))
        limits.add(job.user, job.gpus, sum(amounts), job.array_id)

    while heads:
        *_, g, pos = heapq.heappop(heads)
        group = groups[g]
        job = group[pos]
        consider(job)
        pos += 1
        if pos == len(group):
            continue
        nxt = group[pos]
        if skip_blocked_groups and not any_cap and not nxt.array_throttle:
            # The rest of the group is younger (so no older than `nxt`) and of the same shape:
            # once that shape has its blocked answer and no reservation is open to them, every
            # one of them gets that answer, whatever is placed after.
            known = blocked.get((job.mem_bytes is None or job.exclusive, job.node, job.gpu_model, job.gpus,
                                 job.mem_bytes or 0))  # fmt: skip
            if known is not None and (
                len(result.reservations) >= max_reservations or now - nxt.submitted_at < reserve_after
            ):
                result.bulk.append((group_ids[g][pos:], known))
                continue
        heapq.heappush(heads, (*order_key(nxt), g, pos))
    result.single = dict(waiting)
    if merge_bulk:  # off: `waiting` holds the single answers only (the scheduler reads `bulk`)
        for rest, known in result.bulk:
            waiting.update(dict.fromkeys(rest, known))
    return result


def _try_reserve(
    job: PendingJob, cluster: ClusterState, result: PlacementResult, config: PolicyConfig, now: float
) -> ReservationPlan | None:
    if len(result.reservations) >= config.max_reservations or now - job.submitted_at < config.reserve_after_s:
        return None
    plan = reserve(cluster, job, now)
    if plan is not None:
        result.reservations.append(plan)
    return plan


def _need(job: PendingJob) -> str:
    if job.mem_bytes is None:
        return f"needs {job.gpus} whole idle GPU(s)"
    if job.exclusive:
        return f"needs {job.gpus} whole idle GPU(s) of at least {format_size(job.mem_bytes)}"
    return f"needs {job.gpus}x{format_size(job.mem_bytes)}" + (" on one node" if job.gpus > 1 else "")


def _constraints(job: PendingJob) -> str:
    parts = [f"on node {job.node}"] if job.node else []
    if job.gpu_model:
        parts.append(f"of model '{job.gpu_model}'")
    return (" " + " ".join(parts)) if parts else ""


def _reserved(job: PendingJob, plan: ReservationPlan) -> Waiting:
    gpus = ",".join(str(i) for i in plan.gpu_indexes)
    when = "" if plan.est_start < INF else "; start unknown: jobs there have no time limit"
    return Waiting(
        Reason.RESOURCES,
        f"{_need(job)}{_constraints(job)}; reserved {plan.node} GPU {gpus}{when}",
        plan.est_start if plan.est_start < INF else None,
    )


def _held_back(job: PendingJob, cluster: ClusterState) -> Waiting:
    holders = sorted({s.hold.job_id for s in cluster.held if s.hold is not None})
    return Waiting(Reason.PRIORITY, f"fits, but the memory is held for job {', '.join(map(str, holders))}")


def _blocked(
    job: PendingJob,
    cluster: ClusterState,
    feasible: Feasibility,
    accounts: dict[str, list[GpuAccount]],
    unavailable: frozenset[str],
) -> Waiting:
    if not accounts:
        return Waiting(Reason.RESOURCES, "no worker is online")
    if job.node and job.node not in accounts:
        return Waiting(Reason.NODE_NOT_AVAIL, f"node {job.node} is not online")
    never = feasible.why_never(Shape(job.gpus, job.mem_bytes, job.exclusive, job.node, job.gpu_model))
    if never is not None:
        return Waiting(Reason.INFEASIBLE, never)
    if job.node and job.node in unavailable:
        return Waiting(Reason.NODE_NOT_AVAIL, f"node {job.node} is draining")
    if not cluster.nodes:
        return Waiting(Reason.RESOURCES, "every online node is draining")
    return Waiting(Reason.RESOURCES, _need(job) + _constraints(job))
