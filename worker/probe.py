"""The GpuProbe protocol: one call that returns a snapshot of every GPU on this host."""

from __future__ import annotations

from typing import Protocol

from jobs.gpus import GpuSnapshot


class GpuProbe(Protocol):
    def snapshot(self) -> GpuSnapshot:
        """Read every GPU now. Never raises for one bad GPU: that device comes back unhealthy."""
        ...

    def close(self) -> None: ...
