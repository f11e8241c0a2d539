"""GPU snapshot records shared by the worker (which measures) and the scheduler (which places).

They travel through Redis as JSON inside a node's heartbeat, so they live in `jobs/`:
both sides import them and neither imports the other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class GpuProcess:
    """One process holding memory on a GPU, as NVML reports it."""

    pid: int
    used_bytes: int


@dataclass(frozen=True)
class GpuDevice:
    """One GPU at one instant. `healthy=False` means the probe could not read it."""

    index: int
    uuid: str
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    utilization_pct: int | None = None
    processes: tuple[GpuProcess, ...] = ()
    healthy: bool = True
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["processes"] = [asdict(p) for p in self.processes]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GpuDevice:
        procs = tuple(GpuProcess(int(p["pid"]), int(p["used_bytes"])) for p in data.get("processes", ()))
        return cls(
            index=int(data["index"]),
            uuid=str(data["uuid"]),
            name=str(data["name"]),
            total_bytes=int(data["total_bytes"]),
            free_bytes=int(data["free_bytes"]),
            used_bytes=int(data["used_bytes"]),
            utilization_pct=data.get("utilization_pct"),
            processes=procs,
            healthy=bool(data.get("healthy", True)),
            error=data.get("error"),
        )


@dataclass(frozen=True)
class GpuSnapshot:
    """All GPUs of one node, read in one probe call."""

    devices: tuple[GpuDevice, ...]
    taken_at: float
    driver: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"devices": [d.to_json() for d in self.devices], "taken_at": self.taken_at, "driver": self.driver}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GpuSnapshot:
        return cls(
            devices=tuple(GpuDevice.from_json(d) for d in data.get("devices", ())),
            taken_at=float(data.get("taken_at", 0.0)),
            driver=str(data.get("driver", "")),
        )


@dataclass(frozen=True)
class JobGpuUsage:
    """Memory one gpulab job holds on one GPU right now and at its peak (by process tree)."""

    job_id: int
    uuid: str
    current_bytes: int
    peak_bytes: int


@dataclass(frozen=True)
class NodeHeartbeat:
    """What a worker publishes every heartbeat: its GPUs and what each of its jobs holds.

    `foreign_peak_bytes` is, per GPU uuid, the sum of the observed peaks of processes that
    gpulab did not start (held until they exit, so placement never trusts a dip).
    """

    node: str
    snapshot: GpuSnapshot
    job_usage: tuple[JobGpuUsage, ...] = ()
    foreign_peak_bytes: dict[str, int] = field(default_factory=dict)
    draining: bool = False
    sent_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "snapshot": self.snapshot.to_json(),
            "job_usage": [asdict(u) for u in self.job_usage],
            "foreign_peak_bytes": dict(self.foreign_peak_bytes),
            "draining": self.draining,
            "sent_at": self.sent_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NodeHeartbeat:
        return cls(
            node=str(data["node"]),
            snapshot=GpuSnapshot.from_json(data["snapshot"]),
            job_usage=tuple(JobGpuUsage(**u) for u in data.get("job_usage", ())),
            foreign_peak_bytes={str(k): int(v) for k, v in data.get("foreign_peak_bytes", {}).items()},
            draining=bool(data.get("draining", False)),
            sent_at=float(data.get("sent_at", 0.0)),
        )
