"""The training loop proper: steps, accumulation, AMP, checkpoints, progress, stopping.

Positions are counted so that any checkpoint can be resumed exactly: ``(epoch,
batch_in_epoch)`` is the next micro-batch to read, ``step`` the number of optimizer steps
done. Checkpoints are taken only between optimizer steps (never with gradients half
accumulated), so ``batch_in_epoch`` is always a group boundary and a resumed run re-forms
the same accumulation groups. Losses stay on the device as tensors and are read back
(one sync) only when reported or saved, so the loop does not stall a GPU every step.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from worker.training.batches import batch_size, evaluate, split_batch, to_device
from worker.training.checkpoint import CKPT_FORMAT, CheckpointManager, capture_rng_state, restore_rng_state
from worker.training.data import batches_per_epoch, epoch_batches
from worker.training.device import AmpConfig, peak_memory
from worker.training.distributed import DistContext, agree_stop, same_step, wrap_model
from worker.training.factory import TrainSpec
from worker.training.status import Progress, StatusWriter, format_progress, notice

PROGRESS_EVERY_S = 5.0
"""Seconds between human-readable progress lines on stdout (the job log)."""


class StopRequested(Exception):
    """Raised between steps after SIGTERM/SIGINT, once the checkpoint is written."""


@dataclass
class LoopOptions:
    """The run's knobs that are not the user's model/data (from the command line)."""

    epochs: int
    seed: int = 0
    accum: int = 1
    checkpoint_every_steps: int = 0
    checkpoint_every_min: float = 10.0


class Trainer:
    """Runs one attempt of a job: resume, train to the end or to a stop, evaluate, report."""

    def __init__(
        self,
        spec: TrainSpec,
        options: LoopOptions,
        device: torch.device,
        amp: AmpConfig,
        checkpoints: CheckpointManager,
        status: StatusWriter,
        stop_signal: Callable[[], int | None],
        extra_status: dict[str, Any] | None = None,
        dist_ctx: DistContext | None = None,
    ) -> None:
        self.opts = options
        self.dist = dist_ctx
        self.is_main = dist_ctx is None or dist_ctx.is_main
        self.world = 1 if dist_ctx is None else dist_ctx.world_size
        self.device = device
        self.amp = amp
        self.ckpts = checkpoints
        self.status = status
        self.stop_signal = stop_signal
        self.module = spec.model.to(device)  # the model itself: checkpoints and evaluation use it
        self.model = self.module if dist_ctx is None else wrap_model(self.module, device, dist_ctx)
        opt = spec.optimizer
        self.optimizer = opt if isinstance(opt, torch.optim.Optimizer) else opt(self.model.parameters())
        sched = spec.lr_scheduler
        if sched is not None and not (hasattr(sched, "step") and hasattr(sched, "state_dict")):
            sched = sched(self.optimizer)
        self.scheduler = sched
        self.scheduler_per_step = spec.scheduler_interval == "step"
        self.loss_fn = spec.loss_fn or torch.nn.CrossEntropyLoss()
        self.train_loader = spec.train_loader
        self.eval_loader = spec.eval_loader
        self.scaler = torch.amp.GradScaler("cuda") if amp.use_scaler else None
        self.n_batches = batches_per_epoch(self.train_loader)
        per_epoch = None if self.n_batches is None else math.ceil(self.n_batches / options.accum)
        self.steps_total = None if per_epoch is None else per_epoch * options.epochs
        self.non_blocking = device.type == "cuda" and bool(getattr(self.train_loader, "pin_memory", False))
        # Position and running statistics (all checkpointed).
        self.epoch, self.batch_in_epoch, self.step = 1, 0, 0
        self.last_loss: torch.Tensor | None = None
        self.epoch_loss_sum = torch.zeros((), device=device)
        self.epoch_samples = 0
        self.last_epoch_loss: float | None = None
        self._pending_rng: dict[str, Any] | None = None
        self._last_saved_step = -1
        self.progress = Progress(epochs=options.epochs, steps_total=self.steps_total, extra=extra_status or {})
        now = time.monotonic()
        self._last_ckpt_t = self._last_print_t = self._window_t = now
        self._window_samples, self._window_steps = 0, 0
        self._train_started = now
        self.first_step_at: float | None = None

    # ---- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CKPT_FORMAT,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "model": self.module.state_dict(),
            "world_size": self.world,
            "saved_by_rank": 0 if self.dist is None else self.dist.rank,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": capture_rng_state(),
            "loop": {
                "last_loss": None if self.last_loss is None else float(self.last_loss),
                "epoch_loss_sum": float(self.epoch_loss_sum),
                "epoch_samples": self.epoch_samples,
                "last_epoch_loss": self.last_epoch_loss,
                "seed": self.opts.seed,
                "accum": self.opts.accum,
            },
            "saved_at": time.time(),
        }

    def save_checkpoint(self) -> None:
        if self.step == self._last_saved_step or not self.is_main:  # DDP: rank 0 writes for all
            return
        path = self.ckpts.save(self.state_dict(), self.step)
        self._last_saved_step = self.step
        self._note_checkpoint(path)
        self._last_ckpt_t = time.monotonic()

    def _note_checkpoint(self, path: str) -> None:
        """Where the newest checkpoint is, in the status: `gpulab show` shows it on every host."""
        self.progress.extra["checkpoint"] = os.path.abspath(path)
        self.progress.extra["checkpoint_step"] = self.step
        self.progress.extra["checkpoint_node"] = os.environ.get("GPULAB_NODE", "")

    def resume(self) -> int | None:
        """Load the newest good checkpoint; return its step (None on a fresh start)."""
        if self.is_main:  # DDP: only rank 0 writes in the directory, so only it tidies it
            self.ckpts.clean_temp_files()
        loaded = self.ckpts.load_latest()
        if self.dist is not None:  # every rank must resume from the same step, or none trains
            same_step(-1 if loaded is None else loaded.step, self.device)
        if loaded is None:
            return None
        st = loaded.state
        self.module.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        if self.scheduler is not None and st.get("lr_scheduler") is not None:
            self.scheduler.load_state_dict(st["lr_scheduler"])
        if self.scaler is not None and st.get("scaler") is not None:
            self.scaler.load_state_dict(st["scaler"])
        self.epoch, self.batch_in_epoch, self.step = int(st["epoch"]), int(st["batch_in_epoch"]), int(st["step"])
        loop = st.get("loop", {})
        if loop.get("accum", self.opts.accum) != self.opts.accum or loop.get("seed", self.opts.seed) != self.opts.seed:
            notice("warning: --accum/--seed differ from the checkpoint's; the run will not match an uninterrupted one")
        if loop.get("last_loss") is not None:
            self.last_loss = torch.tensor(loop["last_loss"], device=self.device)
        self.epoch_loss_sum = torch.tensor(loop.get("epoch_loss_sum", 0.0), device=self.device)
        self.epoch_samples = int(loop.get("epoch_samples", 0))
        self.last_epoch_loss = loop.get("last_epoch_loss")
        self._pending_rng = st["rng"]
        self._last_saved_step = self.step
        self.progress.resumed_from_step = self.step
        self._note_checkpoint(loaded.path)
        notice(f"resumed from {loaded.path} (step {self.step}, epoch {self.epoch}, batch {self.batch_in_epoch})")
        return self.step

    # ---- training ----------------------------------------------------------------------
    def _autocast(self) -> Any:
        dtype, enabled = self.amp.dtype or torch.bfloat16, self.amp.dtype is not None
        return torch.autocast(device_type=self.device.type, dtype=dtype, enabled=enabled)

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.first_step_at is None:  # wall clock: start-up cost is measured against submit
            self.first_step_at = time.time()
        if self.scheduler is not None and self.scheduler_per_step:
            self.scheduler.step()

    def train(self) -> None:
        """Train from the current position to the last epoch; raises StopRequested on a signal.

        Loss is scaled by the group's size, so K micro-batches of B equal one batch of K*B;
        an epoch's last, shorter group is scaled by its own size. For a loader without a
        length the tail is only known when it ends, so it is scaled by 1/K.
        """
        self._train_started = time.monotonic()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        accum = self.opts.accum
        while self.epoch <= self.opts.epochs:
            batches = epoch_batches(self.train_loader, self.opts.seed, self.epoch, self.batch_in_epoch)
            if self._pending_rng is not None:  # after the loader is set up, as when it was saved
                restore_rng_state(self._pending_rng)
                self._pending_rng = None
            self._check_stop()
            micro, group_size, group_loss = 0, accum, torch.zeros((), device=self.device)
            for batch in batches:
                if micro == 0:
                    left = None if self.n_batches is None else self.n_batches - self.batch_in_epoch
                    group_size = accum if left is None else max(1, min(accum, left))
                x, y = split_batch(to_device(batch, self.device, self.non_blocking))
                with self._autocast():
                    loss = self.loss_fn(self.model(x), y)
                scaled = loss / group_size
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                n = batch_size(x, y)
                detached = loss.detach().float()
                group_loss += detached / group_size
                self.epoch_loss_sum += detached * n
                self.epoch_samples += n
                self._window_samples += n
                micro += 1
                self.batch_in_epoch += 1
                if micro == group_size:
                    self._finish_step(group_loss)
                    micro, group_loss = 0, torch.zeros((), device=self.device)
            if micro > 0:  # a length-less loader ended inside a group
                self._finish_step(group_loss * group_size / micro)
            self._end_epoch()

    def _finish_step(self, group_loss: torch.Tensor) -> None:
        self._optimizer_step()
        self.last_loss = group_loss
        self._window_steps += 1
        self._report(force=False)
        every_steps, every_min = self.opts.checkpoint_every_steps, self.opts.checkpoint_every_min
        if (every_steps > 0 and self.step % every_steps == 0) or (
            every_min > 0 and time.monotonic() - self._last_ckpt_t >= every_min * 60
        ):
            self.save_checkpoint()
        self._check_stop()

    def _end_epoch(self) -> None:
        if self.scheduler is not None and not self.scheduler_per_step:
            self.scheduler.step()
        if self.epoch_samples:
            self.last_epoch_loss = float(self.epoch_loss_sum) / self.epoch_samples
        self.epoch += 1
        self.batch_in_epoch = 0
        self.epoch_loss_sum = torch.zeros((), device=self.device)
        self.epoch_samples = 0

    def _check_stop(self) -> None:
        stop = self.stop_signal() is not None
        if self.dist is not None:  # every rank stops after the same step, or none does
            stop = agree_stop(stop, self.device)
        if stop:
            raise StopRequested

    # ---- reporting ---------------------------------------------------------------------
    def _update_progress(self) -> None:
        p = self.progress
        p.epoch = min(self.epoch, self.opts.epochs)
        p.step = self.step
        p.loss = None if self.last_loss is None else float(self.last_loss)
        now = time.monotonic()
        elapsed = now - self._window_t
        if self._window_steps and elapsed > 0:
            p.samples_per_s = self._window_samples * self.world / elapsed  # DDP: all ranks' samples
            if self.steps_total is not None:
                p.eta_s = max(0, self.steps_total - self.step) * elapsed / self._window_steps
            self._window_t, self._window_samples, self._window_steps = now, 0, 0
        p.peak_bytes, allocated = peak_memory(self.device)
        if allocated is not None:
            p.extra["peak_allocated_bytes"] = allocated

    def report_now(self) -> None:
        """Write the status file and a progress line now (start, stop)."""
        self._report(force=True)

    def _report(self, force: bool) -> None:
        """Status file (≤ 1/s) and a stdout line (every PROGRESS_EVERY_S), each when due.
        Under DDP only rank 0 reports (its loss is its shard's)."""
        if not self.is_main:
            return
        now = time.monotonic()
        status_due = force or self.status.due()
        print_due = force or now - self._last_print_t >= PROGRESS_EVERY_S
        if not (status_due or print_due):
            return
        self._update_progress()
        if status_due:
            self.status.write(self.progress)
        if print_due:
            self._last_print_t = now
            print(format_progress(self.progress), flush=True)

    def evaluate(self) -> dict[str, Any]:
        """Metrics on the eval loader (empty without one); the model is left in train mode."""
        if self.eval_loader is None:
            return {}
        with self._autocast():
            return evaluate(self.module, self.eval_loader, self.loss_fn, self.device, self.non_blocking)

    def finish(self) -> dict[str, Any]:
        """Checkpoint the end state, evaluate, write the final status; return the metrics."""
        self.save_checkpoint()
        if not self.is_main:  # rank 0 evaluates and reports for the run
            return {}
        metrics = self.evaluate()
        metrics["final_loss"] = None if self.last_loss is None else float(self.last_loss)
        metrics["train_loss_last_epoch"] = self.last_epoch_loss
        metrics["steps"] = self.step
        metrics["train_seconds"] = round(time.monotonic() - self._train_started, 3)  # this attempt
        metrics["first_step_at"] = self.first_step_at
        self._update_progress()
        self.progress.metrics = metrics
        self.progress.final = True
        self.progress.state = "completed"
        self.progress.eta_s = 0.0
        self.status.write(self.progress)
        print(format_progress(self.progress), flush=True)
        return metrics
