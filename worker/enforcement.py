"""Requests are enforced on the job that breaks them (docs/ARCHITECTURE.md, "Enforcement").

CUDA has no memory isolation between processes on one GPU: a job that takes more than its
`--mem` takes it from its neighbours. Every heartbeat the worker hands this module what each
GPU holds (per job, by process tree, and by processes gpulab did not start); it answers
which jobs to warn and which to stop:

- a job is *over* when it holds more than its request on one of its GPUs (a whole-GPU job
  never is: the card is its own);
- a co-tenant is *at risk* when that GPU also holds another gpulab job or an outside
  process and its free memory no longer covers what the other jobs were promised and have
  not allocated yet, plus the headroom;
- over while a co-tenant is at risk: warned at once (an event in the job's history and a
  line in its log), and, under policy `stop`, stopped after `grace_s` if it still is. The
  timer restarts when the risk passes. Policy `warn` only warns; `never` does neither.

Only the over-user is ever acted on: a job within its request is never warned or stopped.
Pure: no clock, no I/O; the daemon applies the decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.sizes import format_size


@dataclass(frozen=True)
class JobOnGpu:
    job_id: int
    request: int | None  # None: a whole GPU
    used: int


@dataclass(frozen=True)
class GpuState:
    uuid: str
    index: int
    free: int
    jobs: tuple[JobOnGpu, ...]
    outside_used: int  # held by processes gpulab did not start


@dataclass(frozen=True)
class Decision:
    job_id: int
    action: str  # "warn" | "stop"
    detail: str


@dataclass
class _Episode:
    since: float
    warned: bool = False


@dataclass
class Enforcer:
    policy: str  # "warn" | "stop" | "never"
    grace_s: float
    headroom: int
    _episodes: dict[int, _Episode] = field(default_factory=dict)
    _stopped: set[int] = field(default_factory=set)

    def check(self, gpus: list[GpuState], now: float) -> list[Decision]:
        """What to do this heartbeat. Call with every GPU of the node; jobs that left are forgotten."""
        if self.policy == "never":
            return []
        offending: dict[int, str] = {}
        present: set[int] = set()
        for gpu in gpus:
            present.update(j.job_id for j in gpu.jobs)
            for job in gpu.jobs:
                why = _risk(gpu, job, self.headroom)
                if why and job.job_id not in offending:
                    offending[job.job_id] = why
        decisions: list[Decision] = []
        for job_id in list(self._episodes):
            if job_id not in offending:
                del self._episodes[job_id]  # back within its request, or nobody at risk: start over
        for job_id, why in offending.items():
            episode = self._episodes.setdefault(job_id, _Episode(now))
            if not episode.warned:
                episode.warned = True
                then = (
                    f"; it will be stopped in {self.grace_s:g}s unless it gives memory back"
                    if self.policy == "stop"
                    else ""
                )
                decisions.append(Decision(job_id, "warn", f"memory warning: {why}{then}"))
            elif self.policy == "stop" and now - episode.since >= self.grace_s and job_id not in self._stopped:
                self._stopped.add(job_id)
                decisions.append(Decision(job_id, "stop", f"stopped after {self.grace_s:g}s over its request: {why}"))
        self._stopped &= present
        return decisions


def _risk(gpu: GpuState, job: JobOnGpu, headroom: int) -> str:
    """Why `job` endangers a co-tenant on `gpu` now, or "" when it does not."""
    if job.request is None or job.used <= job.request:
        return ""
    others = [j for j in gpu.jobs if j.job_id != job.job_id]
    if not others and gpu.outside_used <= 0:
        return ""  # alone on the card: over its request hurts nobody (yet)
    owed = sum(max(0, (j.request or 0) - j.used) for j in others if j.request is not None)
    if gpu.free >= owed + headroom:
        return ""
    tenants = [f"job {j.job_id}" for j in others] + (["processes outside gpulab"] if gpu.outside_used > 0 else [])
    return (
        f"uses {format_size(job.used)} on GPU {gpu.index}, more than its --mem {format_size(job.request)}, "
        f"sharing it with {', '.join(tenants)}: {format_size(max(0, gpu.free))} free, "
        f"{format_size(owed)} owed to them"
    )
