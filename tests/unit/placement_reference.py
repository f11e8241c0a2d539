"""The placement loop as it was before it merged grouped queues (scheduler/policy/queue.py):
every job, sorted whole by `rank`, one at a time. Kept as the reference the faster
`place_queue` must agree with, decision for decision (tests/unit/test_placement_queue.py)."""

from __future__ import annotations

from collections.abc import Mapping

from jobs.config import PolicyConfig
from jobs.states import Reason
from scheduler.policy.accounting import AccountingPolicy, GpuAccount
from scheduler.policy.cluster_state import IGNORE_HOLDS, INF, ClusterBase, ClusterState, clone
from scheduler.policy.feasibility import Feasibility
from scheduler.policy.limits import UserLimits
from scheduler.policy.placement import (
    _DEFAULT_POLICY,
    _blocked,
    _Front,
    _held_back,
    _reserved,
    _try_reserve,
    rank,
)
from scheduler.policy.types import Assignment, PendingJob, PlacementResult, RunningJob, Waiting


def reference_place(
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
    """Decide which pending jobs start now and where. Nothing passed in is modified."""
    running = list(running)
    cluster = ClusterState(ClusterBase.build(accounts, policy, unavailable_nodes, running))
    feasible = Feasibility(accounts, policy.headroom_bytes)
    limits = UserLimits(config, running)
    ordered = rank(jobs, usage or {}, {r.user for r in running}, now, config)
    result = PlacementResult(order=[j.id for j in ordered])
    hard, soft = _Front(), _Front()  # fails even ignoring holds / fails because of holds
    # Shapes known to fail even ignoring holds, with their one explanation: most of a long
    # queue is answered from here, without a search (the pass's cost floor per waiting job).
    blocked: dict[tuple[bool, str, str, int, int], Waiting] = {}
    waiting = result.waiting
    any_cap, reserve_after, max_reservations = limits.any_cap, config.reserve_after_s, config.max_reservations
    for job in ordered:
        if any_cap:
            why = limits.blocked(job)
            if why is not None:
                waiting[job.id] = Waiting(Reason.USER_LIMIT, why)
                continue
        if job.array_throttle:
            why = limits.throttled(job)
            if why is not None:
                waiting[job.id] = Waiting(Reason.ARRAY_TASK_LIMIT, why)
                continue
        whole = job.mem_bytes is None or job.exclusive
        mem = job.mem_bytes or 0
        signature = (whole, job.node, job.gpu_model, job.gpus, mem)
        known = blocked.get(signature)
        if known is not None and (
            len(result.reservations) >= max_reservations or now - job.submitted_at < reserve_after
        ):
            waiting[job.id] = known
            continue
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
                result.waiting[job.id] = _reserved(job, plan)
            elif fits_without_holds:
                result.waiting[job.id] = _held_back(job, cluster)
            else:
                if signature not in blocked:
                    blocked[signature] = _blocked(job, cluster, feasible, accounts, unavailable_nodes)
                result.waiting[job.id] = blocked[signature]
            continue
        node, slots = choice
        amounts = [s.acct.total if whole else mem for s in slots]
        if whole:
            why = limits.over_memory(job.user, sum(amounts))
            if why is not None:
                result.waiting[job.id] = Waiting(Reason.USER_LIMIT, why)
                continue
        slots = cluster.take(slots, amounts, whole, end)  # this pass's copies, as changed
        reserved = {s.acct.uuid: a for s, a in zip(slots, amounts, strict=True)}
        result.assignments.append(Assignment(job.id, node, tuple(clone(s.acct) for s in slots), reserved, whole))
        limits.add(job.user, job.gpus, sum(amounts), job.array_id)
    return result
