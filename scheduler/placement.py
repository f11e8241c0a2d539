"""The placement policy: a pure function from (pending jobs, GPU accounts, policy) to
assignments plus a reason for every job left waiting. No I/O, so it is property-tested,
benchmarked at scale and replayed over traces.

Order: priority (high first), then submission order. A job that does not fit does not
block smaller ones behind it (backfill). Within a node, GPUs are chosen best-fit (the
smallest hole that holds the job) to keep large holes whole; across nodes, the node whose
chosen GPUs leave the least over.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from jobs.sizes import format_size
from jobs.states import Reason
from scheduler.accounting import AccountingPolicy, GpuAccount


@dataclass(frozen=True)
class PendingJob:
    id: int
    gpus: int
    mem_bytes: int | None  # per GPU; None = a whole idle GPU
    priority: int = 0
    user: str = ""


@dataclass(frozen=True)
class Assignment:
    job_id: int
    node: str
    gpus: tuple[GpuAccount, ...]
    reserved_bytes: dict[str, int]  # uuid -> bytes
    whole_gpu: bool


@dataclass(frozen=True)
class Waiting:
    reason: Reason
    detail: str


@dataclass
class PlacementResult:
    assignments: list[Assignment] = field(default_factory=list)
    waiting: dict[int, Waiting] = field(default_factory=dict)


def order_jobs(jobs: list[PendingJob]) -> list[PendingJob]:
    return sorted(jobs, key=lambda j: (-j.priority, j.id))


def place(
    jobs: list[PendingJob],
    accounts: dict[str, list[GpuAccount]],
    policy: AccountingPolicy,
    *,
    unavailable_nodes: frozenset[str] = frozenset(),
) -> PlacementResult:
    """Decide which pending jobs start now and where. `accounts` is not modified."""
    work = {node: copy.deepcopy(gpus) for node, gpus in accounts.items() if node not in unavailable_nodes}
    result = PlacementResult()
    # A shape (gpus, mem) that did not fit cannot fit later in this pass either (placing only
    # takes memory away), so larger-or-equal shapes are answered from this set at once.
    failed_shapes: list[tuple[int, int]] = []
    for job in order_jobs(jobs):
        need = job.mem_bytes
        shape = (job.gpus, need if need is not None else 2**62)
        if any(job.gpus >= g and shape[1] >= m for g, m in failed_shapes):
            result.waiting[job.id] = _why_waiting(job, accounts, policy)
            continue
        choice = _best_node(job, work, policy)
        if choice is None:
            failed_shapes.append(shape)
            result.waiting[job.id] = _why_waiting(job, accounts, policy)
            continue
        node, chosen = choice
        reserved: dict[str, int] = {}
        for gpu in chosen:
            amount = gpu.total if need is None else need
            gpu.reserve(amount, whole=need is None)
            reserved[gpu.uuid] = amount
        result.assignments.append(Assignment(job.id, node, tuple(copy.copy(g) for g in chosen), reserved, need is None))
    return result


def _best_node(
    job: PendingJob, work: dict[str, list[GpuAccount]], policy: AccountingPolicy
) -> tuple[str, list[GpuAccount]] | None:
    best: tuple[int, str, list[GpuAccount]] | None = None
    for node, gpus in work.items():
        if job.mem_bytes is None:
            fitting = [g for g in gpus if g.idle(policy) and not g.whole_gpu_taken]
            fitting.sort(key=lambda g: g.index)
            leftover_of = {g.uuid: 0 for g in fitting}
        else:
            avail = {g.uuid: g.available(policy) for g in gpus}
            fitting = [g for g in gpus if avail[g.uuid] >= job.mem_bytes]
            fitting.sort(key=lambda g: (avail[g.uuid], g.index))
            leftover_of = {g.uuid: avail[g.uuid] - job.mem_bytes for g in fitting}
        if len(fitting) < job.gpus:
            continue
        chosen = fitting[: job.gpus]
        leftover = sum(leftover_of[g.uuid] for g in chosen)
        if best is None or leftover < best[0]:
            best = (leftover, node, chosen)
    return None if best is None else (best[1], best[2])


def _why_waiting(job: PendingJob, accounts: dict[str, list[GpuAccount]], policy: AccountingPolicy) -> Waiting:
    if not accounts:
        return Waiting(Reason.RESOURCES, "no worker is online")
    largest_node = max(len(gpus) for gpus in accounts.values())
    if job.gpus > largest_node:
        return Waiting(Reason.INFEASIBLE, f"needs {job.gpus} GPUs on one node; the largest node has {largest_node}")
    if job.mem_bytes is not None:
        capacity = max(g.total - policy.headroom_bytes for gpus in accounts.values() for g in gpus)
        if job.mem_bytes > capacity:
            return Waiting(
                Reason.INFEASIBLE,
                f"needs {format_size(job.mem_bytes)} per GPU; the largest GPU offers {format_size(capacity)}",
            )
        best = max(
            ((g.available(policy), node, g.index) for node, gpus in accounts.items() for g in gpus),
            default=(0, "", 0),
        )
        return Waiting(
            Reason.RESOURCES,
            f"needs {job.gpus}x{format_size(job.mem_bytes)}; "
            f"most available: {format_size(best[0])} on {best[1]} GPU{best[2]}",
        )
    return Waiting(Reason.RESOURCES, f"needs {job.gpus} whole idle GPU(s)")
