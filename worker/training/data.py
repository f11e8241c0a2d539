"""Reproducible, resumable epochs over a user's DataLoader.

A resumed run must see exactly the batches the uninterrupted run would have seen. Two
things make that true:

* Every epoch's shuffle comes from a ``torch.Generator`` seeded from ``(seed, epoch)``,
  installed on the sampler (and a second one on the loader, which seeds its workers), so
  epoch ``e`` has the same order in every attempt, independent of how many random numbers
  the model drew before.
* A resume mid-epoch skips the first ``k`` batches *by index*: the loader is cloned with a
  batch sampler that drops the first ``k`` index lists, so no skipped sample is loaded or
  transformed (on a large dataset, loading them could take as long as training them).
  Iterable datasets cannot be indexed; for them the batches are read and discarded.

Known limit: random augmentations that run inside DataLoader *workers* draw from per-worker
seeds, so after a mid-epoch resume they differ from the uninterrupted run's (the samples and
their order do not). Without workers, transforms draw from the global RNG, which the
checkpoint restores.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

_MASK63 = (1 << 63) - 1


def epoch_seed(seed: int, epoch: int) -> int:
    """A per-epoch seed; mixed so that (seed=1, epoch=2) and (seed=2, epoch=1) differ."""
    return (seed * 1_000_003 + epoch * 7_919 + 0x9E3779B1) & _MASK63


class SkipBatchSampler(Sampler[list[int]]):
    """Yields the batches of ``batch_sampler`` after the first ``skip`` ones."""

    def __init__(self, batch_sampler: Iterable[list[int]], skip: int) -> None:
        self.batch_sampler = batch_sampler
        self.skip = skip

    def __iter__(self) -> Iterator[list[int]]:
        for i, batch in enumerate(self.batch_sampler):
            if i >= self.skip:
                yield batch

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)  # type: ignore[arg-type]


def batches_per_epoch(loader: Any) -> int | None:
    """``len(loader)`` when it is known (None for an iterable without a length)."""
    try:
        return len(loader)
    except TypeError:
        return None


def seed_epoch(loader: Any, seed: int, epoch: int) -> None:
    """Install this epoch's generators on a DataLoader's sampler(s) and on the loader."""
    if not isinstance(loader, DataLoader):
        return
    base = epoch_seed(seed, epoch)
    samplers = [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
    seen: set[int] = set()
    for sampler in samplers:
        if sampler is None or id(sampler) in seen:
            continue
        seen.add(id(sampler))
        if hasattr(sampler, "generator"):
            gen = torch.Generator()
            gen.manual_seed(base)
            sampler.generator = gen
        set_epoch = getattr(sampler, "set_epoch", None)
        if callable(set_epoch):  # DistributedSampler and friends
            set_epoch(epoch)
    worker_gen = torch.Generator()
    worker_gen.manual_seed(base ^ 0x5EED5EED)
    loader.generator = worker_gen


def with_batch_sampler(loader: DataLoader[Any], batch_sampler: Any) -> DataLoader[Any]:
    """The same loader (workers, collate, pinning...) drawing its batches from ``batch_sampler``:
    used to skip the batches a resumed epoch already did, and to shard batches across DDP ranks."""
    kwargs: dict[str, Any] = {
        "batch_sampler": batch_sampler,
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
    }
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    if hasattr(loader, "in_order"):
        kwargs["in_order"] = loader.in_order
    return DataLoader(loader.dataset, **kwargs)


def epoch_batches(loader: Any, seed: int, epoch: int, skip: int = 0) -> Iterator[Any]:
    """An iterator over epoch ``epoch``'s batches, starting after the first ``skip``."""
    seed_epoch(loader, seed, epoch)
    if skip <= 0:
        return iter(loader)
    if (
        isinstance(loader, DataLoader)
        and not isinstance(loader.dataset, IterableDataset)
        and loader.batch_sampler is not None
    ):
        return iter(with_batch_sampler(loader, SkipBatchSampler(loader.batch_sampler, skip)))
    it = iter(loader)
    done = object()
    for _ in range(skip):
        if next(it, done) is done:
            break
    return it  # type: ignore[no-any-return]  # the DataLoader's iterator is untyped


def _ignore_stop_signals(init: Any) -> Any:
    """Wrap a ``worker_init_fn`` so DataLoader workers ignore SIGTERM and SIGINT."""

    def worker_init(worker_id: int) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if init is not None:
            init(worker_id)

    worker_init.__wrapped_by_gpulab__ = True  # type: ignore[attr-defined]
    return worker_init


def shield_workers(loader: Any) -> None:
    """Keep a DataLoader's worker processes alive through a graceful stop.

    The worker may signal the job's whole process group. DataLoader workers die on
    SIGTERM by default, and the main process's SIGCHLD handler then raises inside the step
    that was meant to finish. Ignoring the signal in the workers lets the step and the
    checkpoint complete; the workers still exit when the main process does (they watch
    their parent), and SIGKILL after the grace period ends them regardless.
    """
    if not isinstance(loader, DataLoader) or loader.num_workers == 0:
        return
    init = loader.worker_init_fn
    if getattr(init, "__wrapped_by_gpulab__", False):
        return
    loader.worker_init_fn = _ignore_stop_signals(init)
