"""GPU memory accounting: how much of each GPU the scheduler may still promise
(docs/ARCHITECTURE.md, "Memory accounting").

    available(gpu) = min(nvml_free - headroom - pending_growth, total - committed - headroom)

`committed` holds every gpulab job at max(request, observed peak) - or at peak + spike buffer
once it has outgrown its request - plus processes outside gpulab at their observed peak plus
the spike buffer. `pending_growth` is what gpulab jobs asked for but have not allocated yet:
without it, NVML's free memory double-books a job that has just started. Pure functions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from jobs.gpus import NodeHeartbeat


@dataclass(frozen=True)
class AccountingPolicy:
    headroom_bytes: int = 256 * 2**20
    spike_buffer_bytes: int = 512 * 2**20
    idle_gpu_max_used_bytes: int = 512 * 2**20


@dataclass(frozen=True)
class Reservation:
    """A ledger entry: what one gpulab job was promised on each GPU of one node."""

    job_id: int
    node: str
    gpus: dict[str, int]  # uuid -> bytes reserved (a whole-GPU job reserves the GPU's total)
    whole_gpu: bool = False


@dataclass
class GpuAccount:
    node: str
    index: int
    uuid: str
    name: str
    healthy: bool
    total: int
    nvml_free: int
    used: int
    committed: int = 0  # gpulab jobs (request or peak) + outside processes (peak + buffer)
    gpulab_reserved: int = 0  # the gpulab part of committed
    gpulab_used: int = 0  # what gpulab jobs hold right now
    foreign_peak: int = 0  # outside processes, at their observed peak
    pending_growth: int = 0
    jobs: int = 0
    whole_gpu_taken: bool = False
    error: str | None = None

    def available(self, policy: AccountingPolicy) -> int:
        if not self.healthy or self.whole_gpu_taken:
            return 0
        by_nvml = self.nvml_free - policy.headroom_bytes - self.pending_growth
        by_ledger = self.total - self.committed - policy.headroom_bytes
        return max(0, min(by_nvml, by_ledger))

    def idle(self, policy: AccountingPolicy) -> bool:
        """Free for a whole-GPU job: nothing of gpulab's on it and next to nothing used by others."""
        return (
            self.healthy
            and self.jobs == 0
            and self.used <= policy.idle_gpu_max_used_bytes
            and self.foreign_peak <= policy.idle_gpu_max_used_bytes
        )

    def reserve(self, amount: int, *, whole: bool) -> None:
        """Account for a job placed in this pass (it has allocated nothing yet)."""
        self.jobs += 1
        self.committed += amount
        self.gpulab_reserved += amount
        self.pending_growth += amount
        self.whole_gpu_taken = self.whole_gpu_taken or whole


def build_accounts(
    heartbeats: list[NodeHeartbeat], ledger: list[Reservation], policy: AccountingPolicy
) -> dict[str, list[GpuAccount]]:
    """Per node, one account per GPU, from the latest heartbeats and the ledger."""
    accounts: dict[str, list[GpuAccount]] = {}
    by_uuid: dict[str, GpuAccount] = {}
    usage: dict[tuple[int, str], tuple[int, int]] = {}
    for beat in heartbeats:
        node_accounts = _fresh_accounts(beat, policy)
        by_uuid.update((a.uuid, a) for a in node_accounts)
        accounts[beat.node] = node_accounts
        usage.update(_job_usage(beat))
    for res in ledger:
        _charge(res, by_uuid, usage, policy)
    return accounts


def node_accounts(beat: NodeHeartbeat, ledger: Iterable[Reservation], policy: AccountingPolicy) -> list[GpuAccount]:
    """One node's part of `build_accounts`, for the reservations with a GPU on it: the same
    accounts when no other heartbeat names this node's GPUs (their uuids, in a job's usage),
    which lets a caller rebuild only the nodes whose heartbeat or reservations changed."""
    accounts = _fresh_accounts(beat, policy)
    by_uuid = {a.uuid: a for a in accounts}
    usage = _job_usage(beat)
    for res in ledger:
        _charge(res, by_uuid, usage, policy)
    return accounts


def _fresh_accounts(beat: NodeHeartbeat, policy: AccountingPolicy) -> list[GpuAccount]:
    """The node's accounts before any reservation: what NVML and outside processes hold."""
    out = []
    for dev in beat.snapshot.devices:
        account = GpuAccount(
            node=beat.node,
            index=dev.index,
            uuid=dev.uuid,
            name=dev.name,
            healthy=dev.healthy,
            total=dev.total_bytes,
            nvml_free=dev.free_bytes,
            used=dev.used_bytes,
            foreign_peak=beat.foreign_peak_bytes.get(dev.uuid, 0),
            error=dev.error,
        )
        if account.foreign_peak:
            account.committed += account.foreign_peak + policy.spike_buffer_bytes
        out.append(account)
    return out


def _job_usage(beat: NodeHeartbeat) -> dict[tuple[int, str], tuple[int, int]]:
    return {(u.job_id, u.uuid): (u.current_bytes, u.peak_bytes) for u in beat.job_usage}


def _charge(
    res: Reservation,
    by_uuid: dict[str, GpuAccount],
    usage: dict[tuple[int, str], tuple[int, int]],
    policy: AccountingPolicy,
) -> None:
    """Charge one ledger entry to the accounts of its GPUs found in `by_uuid`."""
    for uuid, requested in res.gpus.items():
        account = by_uuid.get(uuid)
        if account is None:
            continue  # node down (or, for `node_accounts`, another node's GPU): the reaper deals with its jobs
        current, peak = usage.get((res.job_id, uuid), (0, 0))
        if res.whole_gpu:
            held = account.total
            account.whole_gpu_taken = True
        elif peak > requested:
            held = peak + policy.spike_buffer_bytes  # outgrew its request: no longer trusted
        else:
            held = requested
        account.jobs += 1
        account.committed += held
        account.gpulab_reserved += held
        account.gpulab_used += current
        account.pending_growth += max(0, held - current) if not res.whole_gpu else 0
