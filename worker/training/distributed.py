"""DDP for the built-in loop: `gpulab train --gpus N` runs it under `torchrun` on one node.

torchrun starts one process per GPU with RANK / LOCAL_RANK / WORLD_SIZE set; each joins the
process group (NCCL on GPUs, gloo on CPU, so the same code is tested on CPU machines and
simulated GPUs), trains its shard of every epoch, and gradients are averaged by
DistributedDataParallel. What makes it resume exactly like the single-process loop:

- Shards are fixed by position, not by sampler state: batch i of the epoch's (seeded)
  sequence goes to rank i % world, and every rank takes len // world batches, so all ranks
  run the same number of steps (none waits forever in an all-reduce) and a resumed rank
  skips its own first k batches.
- Only rank 0 writes checkpoints and the status file; every rank loads the same checkpoint.
  Replicas are identical after every step (same init seed, averaged gradients), so rank 0's
  state is everyone's.
- A stop (SIGTERM) is agreed on between steps by an all-reduce, so every rank stops after the
  same step and rank 0's checkpoint is that step for everyone.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, Sampler

from worker.training.data import with_batch_sampler

BARRIER_TIMEOUT_S = 300  # rank 0's final evaluation runs while the others wait here


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env(env: dict[str, str] | None = None) -> tuple[int, int, int] | None:
    """(rank, local_rank, world_size) when started by torchrun with more than one process."""
    env = dict(os.environ if env is None else env)
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    return int(env["RANK"]), int(env.get("LOCAL_RANK", env["RANK"])), world


def setup(device: torch.device) -> DistContext | None:
    """Join the process group (when under torchrun with WORLD_SIZE > 1); None otherwise.
    On CUDA each rank takes the GPU of its local rank among the job's visible ones."""
    ranks = from_env()
    if ranks is None:
        return None
    rank, local_rank, world = ranks
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistContext(rank, local_rank, world, backend)


def rank_device(device: torch.device, ctx: DistContext | None) -> torch.device:
    if ctx is not None and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def teardown(ctx: DistContext | None, finished: bool) -> None:
    """Leave the process group while the interpreter is fully alive.

    A rank that finished (or stopped with the others) first waits for the rest (rank 0 is
    still evaluating), so no rank tears gloo down under a peer that is still talking to it. The DDP wrapper keeps the
    group alive through reference cycles; left to interpreter shutdown, gloo's threads die
    with the interpreter and the rank aborts ("terminate called without an active
    exception", seen once in CI on rank 1 after a clean run). Collect them now instead.
    """
    if ctx is None or not dist.is_initialized():
        return
    if finished:
        try:
            if ctx.backend == "gloo":  # the barrier that can time out and name the missing rank
                dist.monitored_barrier(timeout=timedelta(seconds=BARRIER_TIMEOUT_S))
            else:
                dist.barrier()
        except RuntimeError as exc:  # a peer died or hung after training: leave anyway
            print(f"gpulab training: rank {ctx.rank}: the ranks did not meet at the end: {exc}", flush=True)
    gc.collect()
    dist.destroy_process_group()
    gc.collect()


def agree_stop(local_stop: bool, device: torch.device) -> bool:
    """True on every rank if any rank was asked to stop (one tiny all-reduce)."""
    flag = torch.tensor([1.0 if local_stop else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def same_step(step: int, device: torch.device) -> None:
    """Raise unless every rank found the same checkpoint step (a rank that resumed elsewhere
    would train a different model and average garbage into the others)."""
    both = torch.tensor([float(step), -float(step)], device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    if both[0].item() != step or -both[1].item() != step:
        raise RuntimeError(f"ranks resumed from different checkpoints (this rank: step {step})")


class ShardBatchSampler(Sampler[list[int]]):
    """Rank `rank`'s share of an epoch's batches: batch i goes to rank i % world; every rank
    gets len // world batches (the tail that cannot be split evenly is dropped)."""

    def __init__(self, batch_sampler: Iterable[list[int]], rank: int, world: int) -> None:
        self.batch_sampler = batch_sampler
        self.rank = rank
        self.world = world

    @property
    def sampler(self) -> Any:
        """The shuffling sampler inside, so the loop's per-epoch seeding reaches it."""
        return getattr(self.batch_sampler, "sampler", None)

    def __len__(self) -> int:
        return len(self.batch_sampler) // self.world  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        limit = len(self) * self.world
        for i, batch in enumerate(self.batch_sampler):
            if i >= limit:
                return
            if i % self.world == self.rank:
                yield batch


def shard_loader(loader: Any, ctx: DistContext) -> Any:
    """The same DataLoader over this rank's shard. Map-style datasets only: an iterable one
    has no positions to split, and ranks with unequal steps would wait on each other forever."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        raise ValueError("--gpus > 1 (DDP) needs a DataLoader over a map-style dataset (with __getitem__)")
    return with_batch_sampler(loader, ShardBatchSampler(loader.batch_sampler, ctx.rank, ctx.world_size))  # type: ignore[arg-type]


def wrap_model(model: torch.nn.Module, device: torch.device, ctx: DistContext) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)
