"""Turning Redis records into the plain values `place` takes (and reasons back into fields)."""

from __future__ import annotations

from jobs.arrays import parse_array
from jobs.record import JobRecord
from scheduler.policy.accounting import Reservation
from scheduler.policy.types import PendingJob, RunningJob


def pending_job(record: JobRecord) -> PendingJob:
    spec = record.spec
    return PendingJob(
        id=record.id,
        gpus=spec.gpus,
        mem_bytes=spec.mem_bytes,
        priority=spec.priority,
        user=record.user,
        submitted_at=record.submitted_at,
        time_limit_s=spec.time_limit_s,
        exclusive=spec.exclusive,
        node=spec.node,
        gpu_model=spec.gpu_model,
        array_id=record.array_id,
        array_throttle=parse_array(spec.array).throttle if spec.array else 0,
    )


def running_job(record: JobRecord, reservation: Reservation | None) -> RunningJob:
    start = record.started_at if record.started_at is not None else run_start(record)
    limit = record.spec.time_limit_s
    return RunningJob(
        id=record.id,
        user=record.user,
        node=record.node,
        gpus=dict(reservation.gpus) if reservation is not None else {g.uuid: 0 for g in record.gpus},
        whole_gpu=reservation.whole_gpu if reservation is not None else record.spec.whole_gpu,
        ends_at=start + limit if (start is not None and limit) else None,
        array_id=record.array_id,
    )


def run_start(record: JobRecord) -> float | None:
    """When the job took its GPUs: assignment (memory is promised from then on)."""
    return record.assigned_at if record.assigned_at is not None else record.started_at


def charge_bytes(record: JobRecord, reservation: Reservation | None, whole_gpu_bytes: int) -> int:
    """What a job holds, for fair share: per GPU, its reservation (or request) or its peak."""
    peak = record.peak_bytes
    if reservation is not None:
        return sum(max(held, peak.get(uuid, 0)) for uuid, held in reservation.gpus.items())
    spec = record.spec
    per_gpu = whole_gpu_bytes if spec.whole_gpu else (spec.mem_bytes or 0)
    return max(spec.gpus * per_gpu, sum(peak.values()))
