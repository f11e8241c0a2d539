"""The baseline policies gpulab is compared with, written for the simulator in `sim.py`.

- FifoExclusive: one job per GPU, strict arrival order (the head blocks everyone).
- TaskSpooler: task-spooler's rule: a GPU is free when more than 90% of its memory is free
  (as measured, i.e. what running jobs actually use); strict arrival order. It ignores
  requests, so it can co-locate jobs whose memory does not fit: those OOM.
- EasyBackfill: Slurm-style EASY backfill on exclusive GPUs. The head gets a reservation
  at the earliest time enough GPUs free up on one node; a later job may start now if it
  fits and either ends before that time or leaves the reserved GPUs alone. Run times are
  known exactly (Slurm uses user time limits, so this flatters backfill).
- BestFit: packing by requested memory, strict arrival order: the head goes to the node
  whose chosen GPUs leave the least memory over (best fit); no skipping ahead.

Multi-GPU jobs always need all their GPUs on one node.
"""

from __future__ import annotations

from collections.abc import Callable

from bench.replay.sim import Gpu, Node, Queue, SimJob, Start

Launch = Callable[[Start], None]


def pick_exclusive(nodes: list[Node], gpus: int, free: Callable[[Gpu], bool]) -> tuple[int, tuple[int, ...]] | None:
    """The node with the fewest free GPUs that still has `gpus` of them (keeps big holes whole)."""
    best: tuple[int, int, tuple[int, ...]] | None = None
    for node in nodes:
        idle = [i for i, g in enumerate(node.gpus) if free(g)]
        if len(idle) >= gpus and (best is None or len(idle) < best[0]):
            best = (len(idle), node.index, tuple(idle[:gpus]))
    return None if best is None else (best[1], best[2])


def _empty(gpu: Gpu) -> bool:
    return gpu.jobs == 0


class InArrivalOrder:
    """Start queue heads in arrival order while `pick` finds them a place; stop at the first
    that does not fit (no backfill). Subclasses say how a place is picked."""

    def pick(self, nodes: list[Node], job: SimJob) -> tuple[int, tuple[int, ...]] | None:
        raise NotImplementedError

    def schedule(self, now: float, queue: Queue, nodes: list[Node], launch: Launch) -> None:
        while len(queue):
            job = queue.head()
            where = self.pick(nodes, job)
            if where is None:
                return
            launch(Start(job, *where))


class FifoExclusive(InArrivalOrder):
    name = "fifo-exclusive"
    by_request = True
    exclusive = True

    def pick(self, nodes: list[Node], job: SimJob) -> tuple[int, tuple[int, ...]] | None:
        return pick_exclusive(nodes, job.gpus, _empty)


class TaskSpooler(InArrivalOrder):
    name = "task-spooler"
    by_request = False
    exclusive = False

    def __init__(self, free_fraction: float = 0.9) -> None:
        self.free_fraction = free_fraction

    def _free(self, gpu: Gpu) -> bool:
        return gpu.cap - gpu.used > self.free_fraction * gpu.cap

    def pick(self, nodes: list[Node], job: SimJob) -> tuple[int, tuple[int, ...]] | None:
        return pick_exclusive(nodes, job.gpus, self._free)


class BestFit(InArrivalOrder):
    name = "best-fit"
    by_request = True
    exclusive = False

    def pick(self, nodes: list[Node], job: SimJob) -> tuple[int, tuple[int, ...]] | None:
        return pick_best_fit(nodes, job)


def pick_best_fit(nodes: list[Node], job: SimJob) -> tuple[int, tuple[int, ...]] | None:
    best: tuple[int, int, tuple[int, ...]] | None = None
    for node in nodes:
        fitting = []
        for i, g in enumerate(node.gpus):
            ask = g.cap if job.mem is None else job.mem
            if g.cap - g.requested >= ask:
                fitting.append((g.cap - g.requested - ask, i))
        if len(fitting) < job.gpus:
            continue
        fitting.sort()
        chosen = fitting[: job.gpus]
        leftover = sum(x for x, _ in chosen)
        if best is None or leftover < best[0]:
            best = (leftover, node.index, tuple(sorted(i for _, i in chosen)))
    return None if best is None else (best[1], best[2])


class EasyBackfill(FifoExclusive):
    """Exclusive FIFO, then EASY backfill behind the head's reservation."""

    name = "easy-backfill"

    def schedule(self, now: float, queue: Queue, nodes: list[Node], launch: Launch) -> None:
        super().schedule(now, queue, nodes, launch)  # start heads in order while they fit
        if not len(queue):
            return
        free = {n.index: n.free_gpus() for n in nodes}
        most = max(len(f) for f in free.values())
        if most == 0:
            return
        head = queue.head()
        shadow, reserved_node, extra = reservation(now, head, nodes)
        starts: list[Start] = []
        jobs = iter(queue)
        next(jobs)  # the head
        for job in jobs:
            if job.gpus > most:
                continue
            # Nodes other than the reserved one first (fewest free GPUs first), then the reserved one.
            for index in sorted(free, key=lambda n: (n == reserved_node, len(free[n]))):
                if len(free[index]) < job.gpus:
                    continue
                if index == reserved_node and now + job.duration > shadow:
                    if job.gpus > extra:
                        continue
                    extra -= job.gpus
                starts.append(Start(job, index, tuple(free[index][: job.gpus])))
                free[index] = free[index][job.gpus :]
                most = max(len(f) for f in free.values())
                break
            if most == 0:
                break
        for start in starts:
            launch(start)


def reservation(now: float, head: SimJob, nodes: list[Node]) -> tuple[float, int, int]:
    """(shadow time, node, extra GPUs): when and where the head can start at the earliest, and
    how many GPUs that node has free then beyond the head's need."""
    best: tuple[float, int, int] | None = None
    for node in nodes:
        if len(node.gpus) < head.gpus:
            continue
        free = len(node.free_gpus())
        at = now
        if free < head.gpus:
            for end, n in sorted((end, len(start.gpus)) for end, start in node.running.values()):
                if free >= head.gpus and end > at:
                    break
                free += n
                at = end
        if best is None or at < best[0]:
            best = (at, node.index, free - head.gpus)
    if best is None:
        raise ValueError(f"job {head.id} needs {head.gpus} GPUs on one node; no node has that many")
    return best
