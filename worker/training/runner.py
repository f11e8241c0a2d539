"""One attempt of a training job, from the environment the worker sets to an exit code.

Exit codes are the worker's contract: 0 done, ``OOM_EXIT_CODE`` (75) after a CUDA
out-of-memory error, 128+signal after a graceful stop (143 for SIGTERM), 2 for a bad
factory, 1 for any other error (with a traceback in the log).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import traceback
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import numpy as np
import torch

from worker.training.checkpoint import CheckpointManager
from worker.training.data import shield_workers
from worker.training.device import amp_config, apply_memory_cap, peak_memory, select_device
from worker.training.distributed import DistContext, rank_device, setup, shard_loader, teardown
from worker.training.factory import FactoryError, build_spec
from worker.training.loop import LoopOptions, StopRequested, Trainer
from worker.training.status import OOM_EXIT_CODE, USAGE_EXIT_CODE, Progress, StatusWriter, notice

DEFAULT_CHECKPOINT_DIR = "checkpoints"
"""Used when ``GPULAB_CHECKPOINT_DIR`` is unset (relative to the job's working directory)."""


@dataclass
class RunConfig:
    """Command line plus the worker's environment variables, resolved."""

    factory: str
    factory_args: list[str] = field(default_factory=list)
    epochs: int | None = None
    seed: int = 0
    amp: str = "off"
    accum: int = 1
    checkpoint_every_steps: int = 0
    checkpoint_every_min: float = 10.0
    keep: int = 3
    device: str = "auto"
    resume: bool = True
    checkpoint_dir: str = DEFAULT_CHECKPOINT_DIR
    status_file: str | None = None
    job_id: str | None = None
    attempt: int = 1

    def with_env(self, env: dict[str, str] | None = None) -> RunConfig:
        """Fill the worker-provided fields from ``GPULAB_*`` variables."""
        env = dict(os.environ if env is None else env)
        self.checkpoint_dir = env.get("GPULAB_CHECKPOINT_DIR") or self.checkpoint_dir
        self.status_file = env.get("GPULAB_STATUS_FILE") or self.status_file
        self.job_id = env.get("GPULAB_JOB_ID") or self.job_id
        with contextlib.suppress(ValueError):
            self.attempt = int(env.get("GPULAB_ATTEMPT", self.attempt))
        return self


class StopFlag:
    """SIGTERM/SIGINT set a flag that the loop reads between steps.

    Raising from a signal handler could land inside a CUDA call or a half-applied
    optimizer step; a flag lets the current step finish. A second SIGINT raises
    KeyboardInterrupt, so a person at a terminal can still break out.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __call__(self) -> int | None:
        return self.signum


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) before the factory builds the model."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run(cfg: RunConfig) -> int:
    """Run one attempt; return the process exit code (see the module docstring)."""
    stop = StopFlag()
    stop.install()
    dist_ctx: list[DistContext | None] = [None]
    code = 1
    try:
        code = _run(cfg, stop, dist_ctx)
        return code
    finally:
        teardown(dist_ctx[0], finished=code == 0 or code > 128)  # > 128: stopped together
        stop.uninstall()


def _run(cfg: RunConfig, stop: StopFlag, dist_ctx: list[DistContext | None]) -> int:
    """The attempt itself; every way out writes the status file first, so the worker can tell why.
    Under torchrun (`--gpus N`), each rank runs this; rank 0 writes the status and checkpoints."""
    writer = StatusWriter(cfg.status_file if os.environ.get("RANK", "0") in ("", "0") else None)
    extra: dict[str, Any] = {"job_id": cfg.job_id, "attempt": cfg.attempt}
    progress = Progress(epochs=cfg.epochs or 1, steps_total=None, extra=extra)
    device = torch.device("cpu")
    try:
        seed_everything(cfg.seed)
        device = select_device(cfg.device)
        ctx = dist_ctx[0] = setup(device)
        device = rank_device(device, ctx)
        amp = amp_config(cfg.amp, device)
        fraction = apply_memory_cap(device)
        try:
            spec = build_spec(cfg.factory, cfg.factory_args)
        except FactoryError as exc:
            notice(f"error: {exc}")
            return USAGE_EXIT_CODE
        epochs = int(cfg.epochs or spec.epochs or 1)
        if ctx is not None:
            try:
                spec.train_loader = shard_loader(spec.train_loader, ctx)
            except ValueError as exc:
                notice(f"error: {exc}")
                return USAGE_EXIT_CODE
        shield_workers(spec.train_loader)
        shield_workers(spec.eval_loader)
        options = LoopOptions(
            epochs=epochs,
            seed=cfg.seed,
            accum=cfg.accum,
            checkpoint_every_steps=cfg.checkpoint_every_steps,
            checkpoint_every_min=cfg.checkpoint_every_min,
        )
        ckpts = CheckpointManager(cfg.checkpoint_dir, keep=cfg.keep)
        trainer = Trainer(spec, options, device, amp, ckpts, writer, stop, extra, ctx)
        progress = trainer.progress
        if cfg.resume:
            trainer.resume()
        cap = "" if fraction is None else f" (allocator capped at {fraction:.3f} of the GPU)"
        per_epoch = "?" if trainer.n_batches is None else str(trainer.n_batches)
        ddp = "" if ctx is None else f"DDP rank {ctx.rank}/{ctx.world_size} ({ctx.backend}), "
        notice(
            f"job {cfg.job_id or '-'} attempt {cfg.attempt}: {ddp}device {device}{cap}, amp {amp.name}, "
            f"{epochs} epochs x {per_epoch} batches, accum {cfg.accum}, "
            f"{trainer.steps_total or '?'} steps, seed {cfg.seed}, checkpoints in {ckpts.directory}",
            err=False,
        )
        trainer.report_now()
        try:
            trainer.train()
        except StopRequested:
            signum = stop.signum or signal.SIGTERM
            if trainer.step > 0:
                trainer.save_checkpoint()
            progress.state = "stopped"
            progress.extra["stop_signal"] = signal.Signals(signum).name
            trainer.report_now()
            saved = "checkpoint saved" if trainer.step > 0 else "nothing to checkpoint yet"
            notice(f"stopped by {signal.Signals(signum).name} at step {trainer.step}; {saved}")
            return 128 + signum
        trainer.finish()
        return 0
    except torch.cuda.OutOfMemoryError as exc:
        progress.oom = True
        progress.state = "oom"
        progress.peak_bytes, allocated = peak_memory(device)
        if allocated is not None:
            progress.extra["peak_allocated_bytes"] = allocated
        first = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
        progress.extra["error"] = first
        writer.write(progress)
        notice(f"CUDA out of memory (exit {OOM_EXIT_CODE}): {first}")
        return OOM_EXIT_CODE
    except Exception as exc:
        progress.state = "failed"
        progress.extra["error"] = f"{type(exc).__name__}: {exc}"[:500]
        writer.write(progress)
        traceback.print_exc()
        return 1
