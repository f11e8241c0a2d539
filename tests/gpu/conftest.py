"""GPU tests run only where NVML and a CUDA build of torch both see a GPU; elsewhere they skip.

The check is an autouse fixture of this directory, so it applies to tests/gpu alone, and
torch is imported only when such a test is collected (the daemons never import it).
"""

from __future__ import annotations

import functools

import pytest

from worker.nvml_probe import nvml_available


@functools.cache
def gpu_skip_reason() -> str | None:
    """Why the GPU tests cannot run here, or None when they can."""
    if not nvml_available():
        return "no GPU: NVML is unavailable (no NVIDIA driver, or it sees no GPU)"
    try:
        import torch
    except ImportError:
        return "no GPU tests without torch: torch is not installed"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} cannot use CUDA here (CPU-only build or driver mismatch)"
    return None


@pytest.fixture(autouse=True)
def _require_gpu() -> None:
    reason = gpu_skip_reason()
    if reason is not None:
        pytest.skip(reason)
