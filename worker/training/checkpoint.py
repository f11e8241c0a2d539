"""Atomic, rotating checkpoints that survive kill -9 and a truncated newest file.

A requeued job resumes from the newest checkpoint in ``GPULAB_CHECKPOINT_DIR``, so the
files must never be half-written: each one is ``torch.save``d to a temp file in the same
directory, fsynced, renamed over its final name (``ckpt-{step:09d}.pt``) and the directory
is fsynced, so after a crash a name exists only for a complete file. Disks still lie
(full disk, network filesystems), so loading walks from the newest file back and skips
any that fails to load, renaming it ``*.corrupt`` so that it neither shadows newer good
checkpoints nor survives the rotation in place of a good one.

Loading uses ``weights_only=False``: these files are written by this loop under the job's
own uid, and this process already runs the job's own code (the factory), so unpickling
them trusts nothing new; it lets user lr schedulers with arbitrary state round-trip.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from worker.training.status import notice

CKPT_FORMAT = 1
"""Bumped when the layout of the saved dict changes incompatibly."""

_CKPT_RE = re.compile(r"^ckpt-(\d{9,})\.pt$")
_REQUIRED_KEYS = ("format", "step", "epoch", "batch_in_epoch", "model", "optimizer", "rng")


def checkpoint_name(step: int) -> str:
    """``ckpt-000001234.pt``: zero-padded so a plain sort is a sort by step."""
    return f"ckpt-{step:09d}.pt"


def capture_rng_state() -> dict[str, Any]:
    """Every RNG the loop or user code may draw from, so a resume continues the same streams."""
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
    return {
        "python": random.getstate(),
        # numpy's state is a tuple holding an ndarray; store it as a tensor and plain values.
        "numpy": (
            str(np_state[0]),
            torch.from_numpy(np.array(np_state[1], dtype=np.uint32).copy()),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`; CUDA states only if this process sees the same count."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            notice("warning: CUDA device count changed since the checkpoint; CUDA RNG not restored")


@dataclass
class LoadedCheckpoint:
    """A checkpoint that loaded cleanly, and where it came from."""

    path: str
    step: int
    state: dict[str, Any]


class CheckpointManager:
    """Writes, rotates and finds checkpoints in one directory (one job, all its attempts)."""

    def __init__(self, directory: str, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.directory = os.path.abspath(directory)
        self.keep = keep

    def list_steps(self) -> list[tuple[int, str]]:
        """``(step, path)`` of every checkpoint file, newest first."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            m = _CKPT_RE.match(name)
            if m:
                found.append((int(m.group(1)), os.path.join(self.directory, name)))
        found.sort(reverse=True)
        return found

    def save(self, state: dict[str, Any], step: int) -> str:
        """Write ``state`` as the checkpoint for ``step`` atomically, then prune to ``keep``."""
        os.makedirs(self.directory, exist_ok=True)
        final = os.path.join(self.directory, checkpoint_name(step))
        tmp = os.path.join(self.directory, f".{checkpoint_name(step)}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as fh:
                torch.save(state, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._fsync_dir()
        self.prune()
        return final

    def prune(self) -> None:
        """Delete all but the newest ``keep`` checkpoints."""
        for _step, path in self.list_steps()[self.keep :]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def clean_temp_files(self) -> None:
        """Remove temp files a killed earlier attempt left behind (never complete checkpoints)."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        for name in names:
            if name.startswith(".ckpt-") and ".tmp-" in name:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.directory, name))

    def load_latest(self) -> LoadedCheckpoint | None:
        """The newest checkpoint that loads and looks whole; corrupt ones are set aside.

        Returns None when there is none (a fresh start).
        """
        for step, path in self.list_steps():
            try:
                state = torch.load(path, map_location="cpu", weights_only=False)
                if not isinstance(state, dict):
                    raise ValueError("not a dict")
                missing = [k for k in _REQUIRED_KEYS if k not in state]
                if missing:
                    raise ValueError(f"missing keys {missing}")
                if state["format"] != CKPT_FORMAT:
                    raise ValueError(f"format {state['format']}, expected {CKPT_FORMAT}")
                if int(state["step"]) != step:
                    raise ValueError(f"holds step {state['step']}, name says {step}")
            except Exception as exc:  # any failure means "not usable"
                notice(f"warning: skipping unreadable checkpoint {path}: {type(exc).__name__}: {exc}")
                self._quarantine(path)
                continue
            return LoadedCheckpoint(path=path, step=step, state=state)
        return None

    def _quarantine(self, path: str) -> None:
        """Rename a bad checkpoint out of the ``ckpt-*.pt`` namespace (kept for inspection)."""
        try:
            os.replace(path, path + ".corrupt")
        except OSError as exc:
            notice(f"warning: could not rename {path} aside: {exc}")

    def _fsync_dir(self) -> None:
        """Make the rename itself durable (POSIX needs the directory fsynced)."""
        try:
            fd = os.open(self.directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
