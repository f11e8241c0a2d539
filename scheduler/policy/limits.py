"""Per-user caps ([policy] max_gpus_per_user, max_mem_per_user, max_running_per_user) and
array throttles (`--array 0-31%4`), counted over running jobs plus this pass's placements."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from jobs.config import PolicyConfig
from jobs.sizes import format_size
from scheduler.policy.types import PendingJob, RunningJob


@dataclass
class Use:
    gpus: int = 0
    mem: int = 0
    jobs: int = 0


class UserLimits:
    def __init__(self, config: PolicyConfig, running: list[RunningJob]) -> None:
        self.max_gpus = config.max_gpus_per_user
        self.max_mem = config.max_mem_per_user_bytes
        self.max_jobs = config.max_running_per_user
        self.any_cap = bool(self.max_gpus or self.max_mem or self.max_jobs)
        self.use: dict[str, Use] = {}
        self.array_running: Counter[int] = Counter()
        if self.any_cap:
            for job in running:
                self.add(job.user, len(job.gpus), sum(job.gpus.values()), job.array_id)
        else:
            self.array_running.update(job.array_id for job in running if job.array_id is not None)

    def add(self, user: str, gpus: int, mem: int, array_id: int | None) -> None:
        if array_id is not None:
            self.array_running[array_id] += 1
        if not self.any_cap:  # nothing reads per-user use: not counted (every pass, every job)
            return
        use = self.use.setdefault(user, Use())
        use.gpus += gpus
        use.mem += mem
        use.jobs += 1

    def blocked(self, job: PendingJob) -> str | None:
        """Why the user's caps keep `job` waiting, judged before choosing GPUs (whole-GPU jobs'
        memory is checked again once their GPUs are known, by `over_memory`)."""
        use = self.use.get(job.user) or Use()
        if self.max_jobs and use.jobs + 1 > self.max_jobs:
            return f"{job.user} has {use.jobs} running jobs; max_running_per_user = {self.max_jobs}"
        if self.max_gpus and use.gpus + job.gpus > self.max_gpus:
            return f"{job.user} uses {use.gpus} GPUs, this job needs {job.gpus}; max_gpus_per_user = {self.max_gpus}"
        if not job.whole:
            return self.over_memory(job.user, job.gpus * (job.mem_bytes or 0))
        return None

    def over_memory(self, user: str, amount: int) -> str | None:
        use = self.use.get(user) or Use()
        if self.max_mem and use.mem + amount > self.max_mem:
            return (
                f"{user} holds {format_size(use.mem)}, this job needs {format_size(amount)}; "
                f"max_mem_per_user = {format_size(self.max_mem)}"
            )
        return None

    def throttled(self, job: PendingJob) -> str | None:
        if job.array_id is None or not job.array_throttle:
            return None
        running = self.array_running[job.array_id]
        if running < job.array_throttle:
            return None
        return f"array {job.array_id} runs {running} tasks, at most {job.array_throttle} at once"
