"""Reservations for blocked jobs: where a job will fit first as running jobs drain, and when.

A job blocked longer than `reserve_after_s` picks the GPUs (on one node) that free enough
memory soonest, judged by the running jobs' time limits, and holds them: no later job may
take the memory it needs there, except a job sure to end (by its own time limit) before
the expected start - EASY backfill. Running jobs without a time limit make the estimate
unknown (infinite); the hold still stands, so the job starts as soon as they drain. Pure.
"""

from __future__ import annotations

from scheduler.policy.cluster_state import INF, WHOLE, ClusterState, Hold, Slot
from scheduler.policy.types import PendingJob, ReservationPlan


def plan_reservation(cluster: ClusterState, job: PendingJob, now: float) -> tuple[list[Slot], float] | None:
    """The GPUs to hold for `job` and its expected start, or None if no node could take it."""
    best: tuple[tuple[float, int, int], list[Slot], float] | None = None
    model = job.gpu_model.lower()
    for node in cluster._candidate_nodes(job):
        ready = []
        for slot in node.slots:
            if slot.hold is not None or not slot.acct.healthy or (model and model not in slot.model):
                continue
            at = _ready_at(cluster, slot, job, now)
            if at is not None:
                ready.append((*at, slot))
        if len(ready) < job.gpus:
            continue
        ready.sort(key=lambda r: (r[0], r[1], r[2]))
        chosen = ready[: job.gpus]
        est = max(r[0] for r in chosen)
        key = (est, sum(r[1] for r in chosen), chosen[0][2])
        if best is None or key < best[0]:
            best = (key, [r[3] for r in chosen], est)
    return None if best is None else (best[1], best[2])


def _ready_at(cluster: ClusterState, slot: Slot, job: PendingJob, now: float) -> tuple[float, int, int] | None:
    """(when the job could start on this GPU, how much is missing now, tie-break), or None if never."""
    policy = cluster.policy
    acct = slot.acct
    ends = sorted(slot.ends)
    if job.whole:
        if job.exclusive and acct.total < (job.mem_bytes or 0) + policy.headroom_bytes:
            return None
        if slot.idle:
            return now, 0, slot.order
        others = max(acct.foreign_peak, acct.used - acct.gpulab_used)
        if others > policy.idle_gpu_max_used_bytes or not ends:
            return INF, len(ends) + 1, slot.order  # held by something outside gpulab: unknown
        return max(now, ends[-1][0]), len(ends), slot.order
    need = job.mem_bytes or 0
    if acct.total - policy.headroom_bytes < need:
        return None
    have = slot.avail
    if have >= need:
        return now, 0, slot.order
    shortfall = need - have
    for end, freed in ends:
        have += freed
        if have >= need:
            return max(now, end), shortfall, slot.order
    return INF, shortfall, slot.order


def reserve(cluster: ClusterState, job: PendingJob, now: float) -> ReservationPlan | None:
    planned = plan_reservation(cluster, job, now)
    if planned is None:
        return None
    slots, est = planned
    cluster.hold(slots, Hold(job.id, WHOLE if job.whole else (job.mem_bytes or 0), est))
    return ReservationPlan(job.id, slots[0].acct.node, tuple(s.acct.index for s in slots), est)
