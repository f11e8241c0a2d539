"""Job states, reasons, and the table of allowed transitions (docs/ARCHITECTURE.md, "Job states")."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    PENDING = "PENDING"
    ASSIGNED = "ASSIGNED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    HELD = "HELD"


class Reason(StrEnum):
    """Why a job waits or how it ended. Names follow Slurm's where one exists."""

    NONE = ""
    RESOURCES = "Resources"
    PRIORITY = "Priority"
    DEPENDENCY = "Dependency"
    HELD = "Held"
    USER_LIMIT = "UserLimit"
    INFEASIBLE = "Infeasible"
    ARRAY_TASK_LIMIT = "JobArrayTaskLimit"
    NODE_NOT_AVAIL = "ReqNodeNotAvail"
    DEPENDENCY_NEVER_SATISFIED = "DependencyNeverSatisfied"
    EXIT_CODE = "ExitCode"
    SIGNAL = "Signal"
    OOM = "OOM"
    TIMEOUT = "Timeout"
    NODE_LOST = "NodeLost"
    CANCELLED = "Cancelled"
    LAUNCH_FAILED = "LaunchFailed"
    REQUEUED = "Requeued"
    PREEMPTED = "Preempted"  # stopped for a job with a higher claim; waits to resume from its checkpoint
    IDLE = "Idle"  # stopped after holding GPU memory at ~0% utilisation past [policy] idle_after_s
    INVALID = "InvalidRecord"  # a stored record failed validation: quarantined, never fatal


FINAL_STATES = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})
ACTIVE_STATES = frozenset({JobState.ASSIGNED, JobState.RUNNING})

# Every edge a job may take. Anything else is refused by the store (and by the Lua script
# that writes it), so a late or duplicated message can never resurrect a finished job.
ALLOWED_EDGES: dict[JobState, frozenset[JobState]] = {
    # PENDING -> COMPLETED/FAILED: the late result of the attempt the scheduler has just
    # requeued (its lease expired as it finished); guarded by the attempt number.
    JobState.PENDING: frozenset(
        {JobState.ASSIGNED, JobState.CANCELLED, JobState.HELD, JobState.FAILED, JobState.COMPLETED}
    ),
    JobState.HELD: frozenset({JobState.PENDING, JobState.CANCELLED, JobState.FAILED}),  # FAILED: quarantine
    JobState.ASSIGNED: frozenset(
        {JobState.RUNNING, JobState.PENDING, JobState.CANCELLED, JobState.FAILED, JobState.HELD}
    ),
    JobState.RUNNING: frozenset(
        {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.PENDING, JobState.HELD}
    ),
    JobState.COMPLETED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


def sources_of(target: JobState) -> frozenset[JobState]:
    """The states from which `target` may be entered."""
    return frozenset(src for src, dests in ALLOWED_EDGES.items() if target in dests)


def is_final(state: str) -> bool:
    return state in FINAL_STATES
