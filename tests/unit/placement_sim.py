"""A discrete-event simulation around the pure `place()`: GPUs whose memory is exactly what
the running jobs reserved, jobs that run exactly their time limit. Used by the property
tests to compare schedules (with and without backfill) and check invariants at every pass."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from jobs.config import PolicyConfig
from scheduler.policy.accounting import AccountingPolicy, GpuAccount
from scheduler.policy.placement import PendingJob, PlacementResult, RunningJob, place

GIB = 2**30
POLICY = AccountingPolicy(headroom_bytes=0, spike_buffer_bytes=0, idle_gpu_max_used_bytes=0)


@dataclass
class Gpu:
    node: str
    index: int
    total: int
    name: str = "Sim GPU"

    @property
    def uuid(self) -> str:
        return f"{self.node}-{self.index}"


@dataclass
class Running:
    job: PendingJob
    node: str
    reserved: dict[str, int]
    whole: bool
    start: float
    end: float


@dataclass
class Sim:
    gpus: list[Gpu]
    config: PolicyConfig
    running: dict[int, Running] = field(default_factory=dict)
    started: dict[int, float] = field(default_factory=dict)
    unavailable: frozenset[str] = frozenset()

    def accounts(self) -> dict[str, list[GpuAccount]]:
        out: dict[str, list[GpuAccount]] = {}
        for gpu in self.gpus:
            held = [r for r in self.running.values() if gpu.uuid in r.reserved]
            used = sum(r.reserved[gpu.uuid] for r in held)
            out.setdefault(gpu.node, []).append(
                GpuAccount(
                    node=gpu.node, index=gpu.index, uuid=gpu.uuid, name=gpu.name, healthy=True, total=gpu.total,
                    nvml_free=max(0, gpu.total - used), used=used, committed=used, gpulab_reserved=used,
                    gpulab_used=used, jobs=len(held), whole_gpu_taken=any(r.whole for r in held),
                )
            )  # fmt: skip
        return out

    def running_jobs(self) -> list[RunningJob]:
        return [
            RunningJob(r.job.id, r.job.user, r.node, dict(r.reserved), r.whole, r.end, r.job.array_id)
            for r in self.running.values()
        ]

    def step(self, pending: list[PendingJob], now: float, *, strict: bool = False) -> PlacementResult:
        """One scheduling pass at `now`. `strict`: no backfill - nothing starts after the
        first job (in priority order) that could not."""
        result = place(
            pending, self.accounts(), POLICY, config=self.config, running=self.running_jobs(),
            now=now, unavailable_nodes=self.unavailable,
        )  # fmt: skip
        by_id = {a.job_id: a for a in result.assignments}
        jobs = {j.id: j for j in pending}
        accepted = []
        for job_id in result.order:
            if job_id not in by_id:
                if strict:
                    break
                continue
            accepted.append(by_id[job_id])
        for a in accepted:
            job = jobs[a.job_id]
            assert job.time_limit_s is not None
            end = now + job.time_limit_s
            self.running[job.id] = Running(job, a.node, dict(a.reserved_bytes), a.whole_gpu, now, end)
            self.started[job.id] = now
        result.assignments = accepted
        return result


def simulate(
    gpus: list[Gpu],
    jobs: list[PendingJob],
    config: PolicyConfig,
    *,
    strict: bool = False,
    check: Callable[[Sim, PlacementResult, float], None] | None = None,
    max_passes: int = 500,
) -> dict[int, float]:
    """Run until every job started (or nothing more can); return each job's start time."""
    sim = Sim(gpus, config)
    now = 0.0
    pending = {j.id: replace(j, submitted_at=min(j.submitted_at, now)) for j in jobs}
    for _ in range(max_passes):
        for job_id in [i for i, r in sim.running.items() if r.end <= now]:
            del sim.running[job_id]
        waiting = [j for i, j in pending.items() if i not in sim.started]
        if not waiting:
            break
        result = sim.step(waiting, now, strict=strict)
        if check is not None:
            check(sim, result, now)
        if not sim.running:
            break  # nothing running and nothing could start: the rest never will
        now = min(r.end for r in sim.running.values())
    return sim.started
