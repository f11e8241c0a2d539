"""gpulab's policy in the simulator: the real `scheduler.policy.placement.place`, fed GpuAccounts
built from the simulated cluster as `build_accounts` builds them from heartbeats and the
ledger (used = what jobs hold, committed = what they were promised), plus the running jobs
and the simulated clock for aging and reservations. Jobs are placed in queue order (one
user, equal --priority: aging keeps FIFO), so the prefilter below can reason about order.

`place` looks at every pending job and explains each one it leaves waiting: O(queue x GPUs)
per event with the whole queue. The prefilter hands it only what can matter, without
changing its answer:
- per shape (GPUs, memory), at most S jobs, S an upper bound on how many of that shape fit
  now (free memory // need): once S of a shape started, or one failed for room, the rest
  of that shape fail too;
- when the oldest job has waited `reserve_after_s`, the first `len(candidates) + 1` jobs of
  the queue: the first of them that fails may reserve GPUs, which changes what fits after
  it; and all nodes (the reservation may pick a full one);
- after a reservation, per shape the first S jobs that end before the reserved start: only
  those may use the held GPUs, so a shorter job behind a blocked one may still start.
Exact for `max_reservations` <= 1 (more: the whole queue is passed). `tests/unit/
test_replay.py` checks the answers against `prefilter=False`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from bench.replay.sim import Gpu, Node, Queue, SimJob, Start
from scheduler.policy.accounting import AccountingPolicy, GpuAccount
from scheduler.policy.placement import PendingJob, RunningJob, place

USER = "replay"  # the traces carry no users: one user, so fair share cannot reorder anything
_PLACE_ARGS = set(inspect.signature(place).parameters)
_PENDING_FIELDS = {f.name for f in fields(PendingJob)}


class GpulabPolicy:
    by_request = True
    exclusive = False

    def __init__(
        self,
        name: str = "gpulab",
        policy: AccountingPolicy | None = None,
        *,
        config: Any = None,  # jobs.config.PolicyConfig, where placement takes one
        time_limits: bool = True,  # jobs declare --time = their real run time (like EASY's estimates)
        prefilter: bool = True,
    ) -> None:
        self.name = name
        self.policy = policy or AccountingPolicy()
        self.config = config
        self.time_limits = time_limits
        self.prefilter = prefilter
        self.calls = 0
        self._running: dict[int, Any] = {}

    @property
    def max_reservations(self) -> int:
        if self.config is None or "config" not in _PLACE_ARGS:
            return 0
        return int(getattr(self.config, "max_reservations", 0))

    def available(self, gpu: Gpu) -> int:
        """GpuAccount.available for a simulated GPU (no foreign processes)."""
        if gpu.whole:
            return 0
        h = self.policy.headroom_bytes
        return max(0, min(gpu.cap - gpu.used - h - gpu.growth, gpu.cap - gpu.requested - h))

    def idle(self, gpu: Gpu) -> bool:
        return gpu.jobs == 0 and gpu.used <= self.policy.idle_gpu_max_used_bytes

    def account(self, node: Node, index: int) -> GpuAccount:
        g = node.gpus[index]
        name = f"n{node.index}"
        return GpuAccount(
            node=name,
            index=index,
            uuid=f"{name}-{index}",
            name="simulated",
            healthy=True,
            total=g.cap,
            nvml_free=max(0, g.cap - g.used),
            used=g.used,
            committed=g.requested,
            gpulab_reserved=g.requested,
            gpulab_used=g.used,
            pending_growth=g.growth,
            jobs=g.jobs,
            whole_gpu_taken=g.whole > 0,
        )

    def pending(self, job: SimJob) -> PendingJob:
        values: dict[str, Any] = {"id": job.id, "gpus": job.gpus, "mem_bytes": job.mem, "user": USER}
        values["submitted_at"] = job.arrival
        values["time_limit_s"] = job.duration if self.time_limits else None
        return PendingJob(**{k: v for k, v in values.items() if k in _PENDING_FIELDS})

    def running(self, nodes: list[Node], wanted: list[int]) -> list[Any]:
        out = []
        for i in wanted:
            for job_id, (end, start) in nodes[i].running.items():
                entry = self._running.get(job_id)
                if entry is None:
                    job = start.job
                    held = {f"n{i}-{k}": nodes[i].gpus[k].cap if job.mem is None else job.mem for k in start.gpus}
                    ends = end if self.time_limits else None
                    entry = RunningJob(job_id, USER, f"n{i}", held, job.mem is None, ends)
                    self._running[job_id] = entry
                out.append(entry)
        return out

    def schedule(self, now: float, queue: Queue, nodes: list[Node], launch: Callable[[Start], None]) -> None:
        everything = [n.index for n in nodes]
        if not self.prefilter:
            result = self._place(now, list(queue), nodes, everything)
        else:
            bounds, wanted = self.bounds(queue, nodes)
            if not bounds:
                return  # nothing can start; a reservation made now would be dropped with the pass
            fit = {j.id: j for shape, n in bounds.items() for j in queue.first(shape, n)}
            head = queue.head()
            if not self.max_reservations or now - head.arrival < self.config.reserve_after_s:
                result = self._place(now, _in_order(fit), nodes, wanted)
            elif self.max_reservations > 1:
                result = self._place(now, list(queue), nodes, everything)
            else:
                # The job that reserves is the first that fails; at most len(fit) start before it.
                for _, job in zip(range(len(fit) + 1), queue, strict=False):
                    fit[job.id] = job
                result = self._place(now, _in_order(fit), nodes, everything)
                if result.reservations and self.time_limits:
                    # Jobs sure to end before the reserved start may use the held GPUs: per shape,
                    # the first that could are candidates too (see the module docstring).
                    until = max(plan.est_start for plan in result.reservations)
                    extra = {j.id: j for shape, n in bounds.items() for j in _ending_by(queue, shape, n, now, until)}
                    if extra.keys() - fit.keys():
                        result = self._place(now, _in_order({**fit, **extra}), nodes, everything)
        for a in result.assignments:
            launch(Start(queue.jobs[a.job_id], int(a.node[1:]), tuple(g.index for g in a.gpus)))

    def _place(self, now: float, jobs: list[SimJob], nodes: list[Node], wanted: list[int]) -> Any:
        accounts = {f"n{i}": [self.account(nodes[i], k) for k in range(len(nodes[i].gpus))] for i in wanted}
        kwargs: dict[str, Any] = {}
        if "now" in _PLACE_ARGS:
            kwargs["now"] = now
        if "running" in _PLACE_ARGS:
            kwargs["running"] = self.running(nodes, wanted)
        if self.config is not None and "config" in _PLACE_ARGS:
            kwargs["config"] = self.config
        self.calls += 1
        return place([self.pending(j) for j in jobs], accounts, self.policy, **kwargs)

    def bounds(self, queue: Queue, nodes: list[Node]) -> tuple[dict[tuple[int, int | None], int], list[int]]:
        """Per queued shape, at most how many of its jobs could start now (0s left out), and
        the nodes with room for at least one of them."""
        avail = [sorted((self.available(g) for g in n.gpus), reverse=True) for n in nodes]
        idle = [sum(self.idle(g) for g in n.gpus) for n in nodes]
        total_avail = sum(sum(a) for a in avail)
        total_idle = sum(idle)
        width = max(len(n.gpus) for n in nodes)
        # best[g]: the most memory g GPUs of one node offer each (the g-th largest hole, best node)
        best = [0] + [max((a[g - 1] for a in avail if len(a) >= g), default=0) for g in range(1, width + 1)]
        most_idle = max(idle)
        bounds: dict[tuple[int, int | None], int] = {}
        for (gpus, mem), bucket in queue.by_shape.items():
            if gpus > width:
                continue
            if mem is None:
                bound = total_idle // gpus if most_idle >= gpus else 0
            else:
                bound = total_avail // (mem * gpus) if best[gpus] >= mem else 0
            if bound:
                bounds[(gpus, mem)] = min(bound, len(bucket))
        whole = any(mem is None for _, mem in bounds)
        min_mem = min((mem for _, mem in bounds if mem is not None), default=None)
        wanted = [
            n.index
            for n in nodes
            if (whole and idle[n.index]) or (min_mem is not None and avail[n.index][0] >= min_mem)
        ]
        return bounds, wanted


def _in_order(jobs: dict[int, SimJob]) -> list[SimJob]:
    return sorted(jobs.values(), key=lambda j: j.id)


def _ending_by(queue: Queue, shape: tuple[int, int | None], n: int, now: float, until: float) -> list[SimJob]:
    found = []
    for job in queue.by_shape[shape].values():
        if now + job.duration <= until:
            found.append(job)
            if len(found) == n:
                break
    return found
