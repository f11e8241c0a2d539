"""A discrete-event cluster simulator for replaying job traces against placement policies.

Time only moves at events. At each event time the simulator first retires every job that
ends then, then queues every job that arrives then, then asks the policy once to start
jobs (`Policy.schedule`). A job's memory use is constant while it runs, so whether it
OOMs is decided when it starts: it is counted as OOMed if the memory actually in use on
one of its GPUs (its own included) exceeds the card. An OOMed job still runs to its end
(the count is "would have OOMed"; the schedule stays comparable across policies).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Protocol

GiB = 2**30


@dataclass(frozen=True)
class SimJob:
    id: int  # arrival order: ids increase with arrival time
    arrival: float
    duration: float
    gpus: int  # all on one node
    mem: int | None  # per-GPU request in bytes; None = a whole GPU
    usage: int | None = None  # per-GPU bytes actually used; None = the request (whole GPU: the card)


@dataclass(frozen=True)
class Start:
    job: SimJob
    node: int
    gpus: tuple[int, ...]  # indices on that node


@dataclass
class Gpu:
    cap: int
    requested: int = 0  # what running jobs asked for (a whole-GPU job asks for the card)
    used: int = 0  # what running jobs actually use
    growth: int = 0  # asked for but not (yet) used: the accounting's pending growth (docs/ARCHITECTURE.md)
    jobs: int = 0
    whole: int = 0  # whole-GPU jobs on it


@dataclass
class Node:
    index: int
    gpus: list[Gpu]
    running: dict[int, tuple[float, Start]] = field(default_factory=dict)  # job id -> (end, where)

    def free_gpus(self) -> list[int]:
        return [i for i, g in enumerate(self.gpus) if g.jobs == 0]


class Queue:
    """Waiting jobs in arrival order, also indexed by shape (gpus, mem) for fast policies."""

    def __init__(self) -> None:
        self.jobs: dict[int, SimJob] = {}
        self.by_shape: dict[tuple[int, int | None], dict[int, SimJob]] = {}

    def __len__(self) -> int:
        return len(self.jobs)

    def __iter__(self) -> Iterator[SimJob]:
        return iter(self.jobs.values())

    def head(self) -> SimJob:
        return next(iter(self.jobs.values()))

    def first(self, shape: tuple[int, int | None], n: int) -> list[SimJob]:
        return list(islice(self.by_shape[shape].values(), n))

    def add(self, job: SimJob) -> None:
        self.jobs[job.id] = job
        self.by_shape.setdefault((job.gpus, job.mem), {})[job.id] = job

    def remove(self, job: SimJob) -> None:
        del self.jobs[job.id]
        shape = (job.gpus, job.mem)
        bucket = self.by_shape[shape]
        del bucket[job.id]
        if not bucket:
            del self.by_shape[shape]


class Policy(Protocol):
    name: str
    by_request: bool  # places by requested memory: it must never over-commit a card
    exclusive: bool  # one job per GPU

    def schedule(self, now: float, queue: Queue, nodes: list[Node], launch: Callable[[Start], None]) -> None: ...


@dataclass
class JobResult:
    job: SimJob
    start: float
    end: float
    oom: bool
    first_start: float | None = None  # before a preemption; None = `start`
    preemptions: int = 0
    lost: float = 0.0  # seconds of work lost to preemptions (since the last checkpoint)

    @property
    def jct(self) -> float:
        return self.end - self.job.arrival

    @property
    def wait(self) -> float:
        """Until the job first started (a preempted job's later waits are in its JCT)."""
        return (self.start if self.first_start is None else self.first_start) - self.job.arrival


@dataclass
class SimResult:
    policy: str
    jobs: list[JobResult]
    capacity: int  # bytes over all GPUs
    queued_time: float  # seconds during which at least one job waited
    requested_while_queued: float  # integral of requested bytes over those seconds
    timeline: list[tuple[float, float, int]]  # (time, requested / capacity, jobs waiting) after each event


class OverCommit(AssertionError):
    pass


def make_nodes(shape: list[list[int]]) -> list[Node]:
    return [Node(i, [Gpu(cap) for cap in caps]) for i, caps in enumerate(shape)]


def simulate(jobs: list[SimJob], policy: Policy, cluster: list[list[int]], *, check: bool = False) -> SimResult:
    """Replay `jobs` (sorted by arrival, then id) on `cluster` (per node, each GPU's bytes)."""
    nodes = make_nodes(cluster)
    capacity = sum(sum(caps) for caps in cluster)
    queue = Queue()
    ends: list[tuple[float, int]] = []  # heap of (end time, job id)
    placed: dict[int, Start] = {}  # running jobs
    results: dict[int, JobResult] = {}
    timeline: list[tuple[float, float, int]] = []
    requested = 0
    queued_time = 0.0
    integral = 0.0
    now = 0.0
    i = 0

    def stop(job_id: int, checkpoint_every: float) -> None:
        """Preempt a running job: its GPUs are free now; the rest of its work, plus what it did
        since its last checkpoint (every `checkpoint_every` s of its run), waits again."""
        nonlocal requested
        start = placed.pop(job_id)
        requested -= _release(nodes[start.node], start)
        before = results[job_id]
        ran = now - before.start
        lost = ran % checkpoint_every if checkpoint_every > 0 else ran
        rest = replace(start.job, duration=start.job.duration - ran + lost)
        first = before.start if before.first_start is None else before.first_start
        results[job_id] = JobResult(rest, before.start, now, False, first, before.preemptions + 1, before.lost + lost)
        queue.add(rest)

    bind = getattr(policy, "bind", None)
    if bind is not None:
        bind(stop)

    def launch(start: Start) -> None:
        nonlocal requested
        job = start.job
        node = nodes[start.node]
        if len(start.gpus) != job.gpus or len(set(start.gpus)) != job.gpus:
            raise OverCommit(f"{policy.name}: job {job.id} needs {job.gpus} distinct GPUs, got {start.gpus}")
        queue.remove(job)
        oom = False
        for index in start.gpus:
            gpu = node.gpus[index]
            ask = gpu.cap if job.mem is None else job.mem
            use = ask if job.usage is None else job.usage
            gpu.requested += ask
            gpu.used += use
            gpu.growth += 0 if job.mem is None else max(0, ask - use)
            gpu.jobs += 1
            gpu.whole += job.mem is None
            requested += ask
            oom = oom or gpu.used > gpu.cap
            if check:
                _check_gpu(policy, gpu, job)
        end = now + job.duration
        node.running[job.id] = (end, start)
        placed[job.id] = start
        before = results.get(job.id)
        if before is None:
            results[job.id] = JobResult(job, now, end, oom)
        else:  # it runs again after a preemption
            results[job.id] = JobResult(
                job, now, end, oom or before.oom, before.first_start, before.preemptions, before.lost
            )
        heapq.heappush(ends, (end, job.id))

    while i < len(jobs) or ends or len(queue):
        next_arrival = jobs[i].arrival if i < len(jobs) else float("inf")
        next_end = ends[0][0] if ends else float("inf")
        t = min(next_arrival, next_end)
        if t == float("inf"):
            raise RuntimeError(f"{policy.name}: {len(queue)} jobs can never start (first: {queue.head()})")
        if len(queue):
            queued_time += t - now
            integral += requested * (t - now)
        now = t
        while ends and ends[0][0] <= now:
            end, job_id = heapq.heappop(ends)
            if job_id not in placed or results[job_id].end != end:
                continue  # preempted: this end is its earlier run's
            start = placed.pop(job_id)
            requested -= _release(nodes[start.node], start)
        while i < len(jobs) and jobs[i].arrival <= now:
            queue.add(jobs[i])
            i += 1
        if len(queue):
            policy.schedule(now, queue, nodes, launch)
        timeline.append((now, requested / capacity, len(queue)))
    ordered = [results[j.id] for j in jobs]
    return SimResult(policy.name, ordered, capacity, queued_time, integral, timeline)


def _release(node: Node, start: Start) -> int:
    job = start.job
    freed = 0
    for index in start.gpus:
        gpu = node.gpus[index]
        ask = gpu.cap if job.mem is None else job.mem
        use = ask if job.usage is None else job.usage
        gpu.requested -= ask
        gpu.used -= use
        gpu.growth -= 0 if job.mem is None else max(0, ask - use)
        gpu.jobs -= 1
        gpu.whole -= job.mem is None
        freed += ask
    del node.running[job.id]
    return freed


def _check_gpu(policy: Policy, gpu: Gpu, job: SimJob) -> None:
    if policy.exclusive and gpu.jobs > 1:
        raise OverCommit(f"{policy.name}: job {job.id} shares an exclusive GPU")
    if policy.by_request and gpu.requested > gpu.cap:
        raise OverCommit(f"{policy.name}: job {job.id} over-commits a GPU ({gpu.requested} > {gpu.cap})")
    if gpu.whole and gpu.jobs > 1 and policy.by_request:
        raise OverCommit(f"{policy.name}: job {job.id} shares a GPU with a whole-GPU job")
