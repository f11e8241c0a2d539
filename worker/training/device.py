"""Device choice, the allocator cap for the job's memory request, and AMP settings.

The scheduler places jobs by their ``--mem`` request, so a job that silently grows past it
would starve its neighbours on the same GPU. PyTorch's caching allocator can be capped per
process; the cap covers only the allocator's pool, not the CUDA context (kernels, cuBLAS
workspaces: a few hundred MiB that NVML does count), hence ``CONTEXT_ALLOWANCE_BYTES`` is
taken off the request before computing the fraction. Past the cap, PyTorch raises
``torch.cuda.OutOfMemoryError`` in this job instead of another job's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from worker.training.status import notice

CONTEXT_ALLOWANCE_BYTES = 640 * 1024 * 1024
"""Memory assumed used by the CUDA context outside the allocator (not covered by the cap).

Measured: 610 MiB of non-allocator memory on an H200 (torch 2.11, CUDA 13) right after the
first allocation; the design's first guess of 500 MiB would let a job exceed its request as
NVML sees it. Libraries loaded later (cuDNN) can add more; the worker's spike buffer absorbs it.
"""

AMP_MODES = ("off", "bf16", "fp16")


def select_device(requested: str = "auto") -> torch.device:
    """``cuda:0`` (the first GPU the worker assigned) when there is one, else CPU.

    ``CUDA_VISIBLE_DEVICES`` unset or empty means a CPU job (the worker's contract: a job
    without GPUs must not touch one that another job holds); ``--device cuda`` overrides
    that for runs by hand. If it names GPUs that torch cannot use (CPU-only torch, or the
    worker's simulated GPUs), the job runs on CPU with a warning rather than failing:
    simulated clusters run real training code that way. Only the first visible GPU is
    used by a single-process run; under torchrun (`--gpus N`) each rank takes its local rank's GPU
    (worker/training/distributed.py).
    """
    if requested == "cpu":
        return torch.device("cpu")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if requested == "cuda" or visible:
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if requested == "cuda":
            raise RuntimeError("--device cuda given but torch sees no CUDA device")
        notice(f"warning: CUDA_VISIBLE_DEVICES={visible!r} but torch sees no usable GPU; training on CPU")
    return torch.device("cpu")


def memory_fraction(mem_bytes: int, total_bytes: int) -> float:
    """The allocator fraction for a request of ``mem_bytes`` on a GPU of ``total_bytes``.

    ``(mem - allowance) / total``, at most 1. A request smaller than the allowance still gets
    ``mem / total`` (not zero, which would fail every allocation), with a warning.
    """
    usable = mem_bytes - CONTEXT_ALLOWANCE_BYTES
    if usable <= 0:
        notice(
            f"warning: GPULAB_MEM_BYTES={mem_bytes} is below the CUDA context allowance "
            f"({CONTEXT_ALLOWANCE_BYTES}); capping the allocator at the whole request"
        )
        usable = mem_bytes
    return max(0.0, min(1.0, usable / total_bytes))


def apply_memory_cap(device: torch.device) -> float | None:
    """Cap this process's allocator on ``device`` from ``GPULAB_MEM_BYTES``; return the fraction."""
    raw = os.environ.get("GPULAB_MEM_BYTES", "").strip()
    if device.type != "cuda" or not raw:
        return None
    try:
        mem_bytes = int(raw)
    except ValueError:
        notice(f"warning: GPULAB_MEM_BYTES={raw!r} is not an integer; no memory cap")
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = memory_fraction(mem_bytes, total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


@dataclass(frozen=True)
class AmpConfig:
    """How forward passes run: autocast dtype (None = fp32) and whether a GradScaler is used."""

    dtype: torch.dtype | None
    use_scaler: bool

    @property
    def name(self) -> str:
        return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "?")


def amp_config(mode: str, device: torch.device) -> AmpConfig:
    """Resolve ``--amp`` for this device.

    fp16 needs loss scaling, which the loop does with a GradScaler on CUDA only; on CPU the
    request falls back to bf16 (the reduced precision CPUs support well) with a warning.
    bf16 on a GPU without bf16 support falls back to fp16 + GradScaler.
    """
    if mode not in AMP_MODES:
        raise ValueError(f"--amp {mode!r}; accepted: {list(AMP_MODES)}")
    if mode == "off":
        return AmpConfig(None, False)
    if device.type == "cuda":
        if mode == "bf16" and not torch.cuda.is_bf16_supported():
            notice("warning: this GPU does not support bf16; using fp16 with a GradScaler")
            return AmpConfig(torch.float16, True)
        return AmpConfig(torch.bfloat16, False) if mode == "bf16" else AmpConfig(torch.float16, True)
    if mode == "fp16":
        notice("warning: --amp fp16 needs CUDA (GradScaler); falling back to bf16 autocast on CPU")
    return AmpConfig(torch.bfloat16, False)


def peak_memory(device: torch.device) -> tuple[int | None, int | None]:
    """``(peak reserved, peak allocated)`` bytes on CUDA; ``(None, None)`` on CPU.

    Reserved is what the allocator held from the driver (what the cap limits and close to
    what NVML sees); allocated is what tensors used.
    """
    if device.type != "cuda":
        return None, None
    return int(torch.cuda.max_memory_reserved(device)), int(torch.cuda.max_memory_allocated(device))
