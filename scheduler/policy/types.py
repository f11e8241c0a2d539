"""The values placement takes and returns: plain frozen data, so a pass can be recorded,
replayed and property-tested without Redis."""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.states import Reason
from scheduler.policy.accounting import GpuAccount


@dataclass(frozen=True)
class PendingJob:
    id: int
    gpus: int
    mem_bytes: int | None  # per GPU; None = a whole idle GPU
    priority: int = 0
    user: str = ""
    submitted_at: float = 0.0
    time_limit_s: float | None = None
    exclusive: bool = False  # whole GPUs even with --mem (then --mem is a floor on their size)
    node: str = ""  # only this node
    gpu_model: str = ""  # GPU name must contain this (case-insensitive)
    array_id: int | None = None
    array_throttle: int = 0  # at most this many tasks of the array running; 0 = no limit

    @property
    def whole(self) -> bool:
        return self.mem_bytes is None or self.exclusive


@dataclass(frozen=True)
class RunningJob:
    """An ASSIGNED or RUNNING job, as placement needs it: who, where, how much, until when."""

    id: int
    user: str
    node: str
    gpus: dict[str, int]  # uuid -> bytes held (the ledger's reservation)
    whole_gpu: bool = False
    ends_at: float | None = None  # start + time limit; None = no limit (unknown end)
    array_id: int | None = None


@dataclass(frozen=True)
class Assignment:
    job_id: int
    node: str
    gpus: tuple[GpuAccount, ...]
    reserved_bytes: dict[str, int]  # uuid -> bytes
    whole_gpu: bool


@dataclass(frozen=True)
class Waiting:
    reason: Reason
    detail: str
    est_start: float | None = None  # expected start, for a job holding a reservation


@dataclass(frozen=True)
class ReservationPlan:
    """GPUs held back for a blocked job as running jobs drain, and when it should fit."""

    job_id: int
    node: str
    gpu_indexes: tuple[int, ...]
    est_start: float  # math.inf when some running job there has no time limit


@dataclass
class PlacementResult:
    assignments: list[Assignment] = field(default_factory=list)
    waiting: dict[int, Waiting] = field(default_factory=dict)
    reservations: list[ReservationPlan] = field(default_factory=list)
    order: list[int] = field(default_factory=list)  # job ids, highest priority first
    # `waiting` in two parts, for a caller that must not look at every waiting job: runs of
    # jobs answered together (ids, their one Waiting; most of a long queue), and the rest.
    bulk: list[tuple[list[int], Waiting]] = field(default_factory=list)
    single: dict[int, Waiting] = field(default_factory=dict)
