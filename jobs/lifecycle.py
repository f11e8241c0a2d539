"""Every change of a job's state, each written once, as a pure function from what is known to
the writes it implies (docs/ARCHITECTURE.md, "The life of a job").

A `Transition` names the target state, the states it may come from, the fields to write, and
what happens to the job's ledger reservation, lease and RQ launch entry. `JobStore.transition`
applies one atomically (one Lua script). The rules that used to be repeated are here once:

- leaving a node (requeue, hold, any final state) releases the reservation, drops the lease
  and clears the attempt's fields (`ATTEMPT_FIELDS`), so nothing waits behind memory nobody
  uses and no stale flag carries into the next attempt;
- whether a job that lost its node runs again, is held, or fails (`after_node_loss`);
- every write from a worker is guarded by the attempt number and the worker's fencing token,
  so a late or stale worker cannot change a newer attempt.

Nothing here talks to Redis or reads the clock except through the `now` argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from jobs.spec import JobSpec
from jobs.states import ACTIVE_STATES, JobState, Reason

# Fields that belong to one attempt: cleared whenever a job goes back to wait.
ATTEMPT_FIELDS: tuple[str, ...] = (
    "node",
    "gpus",
    "pid",
    "current_bytes",
    "mem_warning",
    "cancel_requested",
    "started_at",
    "est_start_at",
    "preempt_requested",
    "idle_since",
)


# States a record that fails validation may be quarantined from (to FAILED).
QUARANTINABLE = frozenset({JobState.PENDING, JobState.HELD, JobState.ASSIGNED, JobState.RUNNING})


@dataclass(frozen=True)
class Fence:
    """A worker's fencing token: the write is refused unless `key` still holds `token`."""

    key: str
    token: str


@dataclass(frozen=True)
class Transition:
    """One state change and everything it implies; applied atomically by `JobStore`."""

    job_id: int
    target: JobState
    fields: Mapping[str, Any]
    expect: frozenset[JobState] | None = None  # None: any state with an edge to `target`
    reservation: dict[str, Any] | None = None  # set the ledger entry (dispatch)
    lease_ttl_s: float | None = None  # set the lease for `lease_node` (dispatch, start)
    lease_node: str = ""
    wake: bool = True
    guard: tuple[str, str] | None = None  # (field, value) that must still hold, e.g. the attempt
    fence: Fence | None = None
    detail: str = ""
    launch_queue: str = ""  # the RQ queue holding this attempt's launch entry, removed on leaving
    launch_id: str = ""

    @property
    def leaves_node(self) -> bool:
        """Requeue, hold and every final state give the GPUs back."""
        return self.target not in ACTIVE_STATES

    def writes(self) -> dict[str, Any]:
        """The fields written, with the attempt's fields cleared when the job leaves its node."""
        if self.target in (JobState.PENDING, JobState.HELD):
            return {**dict.fromkeys(ATTEMPT_FIELDS, ""), **self.fields}
        return dict(self.fields)


def launch_entry_id(job_id: int, attempt: int) -> str:
    """The RQ job id of one attempt's launch (idempotent: one entry per attempt)."""
    return f"gpulab-{job_id}-{attempt}"


# ---- scheduler ---------------------------------------------------------------------------------
def assign(
    job_id: int,
    attempt: int,
    node: str,
    gpus: list[dict[str, Any]],
    reservation: dict[str, Any],
    lease_ttl_s: float,
    now: float,
) -> Transition:
    """PENDING -> ASSIGNED: the reservation and a short lease (the worker must start it in time)."""
    where = ",".join(str(g["index"]) for g in gpus)
    return Transition(
        job_id,
        JobState.ASSIGNED,
        {"node": node, "gpus": gpus, "assigned_at": now, "attempt": attempt, "reason": "", "detail": ""},
        expect=frozenset({JobState.PENDING}),
        reservation=reservation,
        lease_ttl_s=lease_ttl_s,
        lease_node=node,
        wake=False,
        detail=f"on {node} GPU {where} (attempt {attempt})",
    )


def after_node_loss(spec: JobSpec, attempt: int, max_requeues: int, why: str) -> tuple[JobState, Reason, str]:
    """A job whose node, worker or GPU went away: run it again if it asked to (`--requeue`),
    hold it after `max_requeues` attempts, otherwise it failed with NodeLost."""
    if not spec.requeue:
        return JobState.FAILED, Reason.NODE_LOST, why
    if attempt > max_requeues:
        return JobState.HELD, Reason.HELD, f"{why}; held after {attempt} attempts"
    return JobState.PENDING, Reason.REQUEUED, why


def lost(
    job_id: int,
    state: JobState,
    attempt: int,
    node: str,
    spec: JobSpec,
    cancel_requested: bool,
    max_requeues: int,
    now: float,
) -> Transition:
    """The reaper's verdict on an active job whose lease expired (its worker is gone)."""
    guard = ("attempt", str(attempt))
    expect = frozenset({state})
    where = f"node {node} lost (lease expired)"
    if cancel_requested:
        return Transition(
            job_id,
            JobState.CANCELLED,
            {"reason": Reason.CANCELLED.value, "ended_at": now},
            expect,
            guard=guard,
            detail=where,
        )
    if state == JobState.ASSIGNED:
        detail = f"node {node} did not start it; requeued"
        return Transition(
            job_id,
            JobState.PENDING,
            {"reason": "", "detail": detail},
            expect,
            guard=guard,
            detail=detail,
            launch_queue=node,  # the launch entry may still wait in the node's queue: drop it
            launch_id=launch_entry_id(job_id, attempt),
        )
    target, reason, detail = after_node_loss(spec, attempt, max_requeues, where)
    fields: dict[str, Any] = {"reason": reason.value, "detail": detail}
    if target not in (JobState.PENDING, JobState.HELD):
        fields["ended_at"] = now
    return Transition(job_id, target, fields, expect, guard=guard, detail=detail)


def cancel(
    job_id: int,
    state: JobState,
    by: str,
    now: float,
    reason: Reason = Reason.CANCELLED,
    *,
    node: str = "",
    attempt: int = 0,
) -> Transition:
    """A waiting or assigned job cancelled (a running one is stopped by its worker first).
    An assigned job's launch entry leaves its node's queue in the same step."""
    assigned = state == JobState.ASSIGNED and bool(node)
    return Transition(
        job_id,
        JobState.CANCELLED,
        {"reason": reason.value, "detail": by, "ended_at": now},
        expect=frozenset({state}),
        detail=by,
        launch_queue=node if assigned else "",
        launch_id=launch_entry_id(job_id, attempt) if assigned else "",
    )


def hold(job_id: int, by: str) -> Transition:
    return Transition(
        job_id,
        JobState.HELD,
        {"reason": Reason.HELD.value, "detail": f"held by {by}"},
        expect=frozenset({JobState.PENDING}),
        detail=f"held by {by}",
    )


def release(job_id: int, by: str) -> Transition:
    return Transition(
        job_id,
        JobState.PENDING,
        {"reason": "", "detail": f"released by {by}"},
        expect=frozenset({JobState.HELD}),
        detail=f"released by {by}",
    )


def quarantine(job_id: int, state: JobState, why: str, now: float) -> Transition:
    """A stored record that no longer validates: it fails with the reason, never the daemon."""
    return Transition(
        job_id,
        JobState.FAILED,
        {"reason": Reason.INVALID.value, "detail": why, "ended_at": now},
        expect=frozenset({state}),
        detail=why,
    )


# ---- worker ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Attempt:
    """Who writes for one attempt: the job, its attempt number, its node and worker token."""

    job_id: int
    attempt: int
    node: str
    fence: Fence | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def guard(self) -> tuple[str, str]:
        return ("attempt", str(self.attempt))


def start(a: Attempt, pid: int, log_path: str, lease_ttl_s: float, now: float) -> Transition:
    """ASSIGNED -> RUNNING, with the pid and the job's lease (renewed every heartbeat)."""
    return Transition(
        a.job_id,
        JobState.RUNNING,
        {"started_at": now, "pid": pid, "log_path": log_path, "reason": "", "detail": ""},
        expect=frozenset({JobState.ASSIGNED}),
        guard=a.guard,
        fence=a.fence,
        lease_ttl_s=lease_ttl_s,
        lease_node=a.node,
        wake=False,
        detail=f"started on {a.node}, pid {pid}",
    )


def held_after_unstarted(attempt: int, max_requeues: int) -> bool:
    """A job whose command never ran waits again whatever its spec says, until it has been
    dispatched more than `max_requeues` times: then it is held, so a node that cannot start
    anything does not spin it."""
    return attempt > max_requeues


def not_started(a: Attempt, why: str, max_requeues: int) -> Transition:
    """ASSIGNED -> PENDING: this worker could not hand the job over (it stalled, or the shim
    died before its gate), and nothing of the job ran; it waits again like any assignment
    its node did not start - HELD once dispatched more than `max_requeues` times, so a node
    that cannot start anything does not spin it."""
    target, reason = JobState.PENDING, ""
    detail = f"node {a.node} did not start it ({why}); requeued"
    if held_after_unstarted(a.attempt, max_requeues):
        target, reason = JobState.HELD, Reason.HELD.value
        detail = f"node {a.node} did not start it ({why}); held after {a.attempt} attempts"
    return Transition(
        a.job_id,
        target,
        {"reason": reason, "detail": detail},
        expect=frozenset({JobState.ASSIGNED}),
        guard=a.guard,
        fence=a.fence,
        detail=detail,
        launch_queue=a.node,
        launch_id=launch_entry_id(a.job_id, a.attempt),
    )


def launch_failed(a: Attempt, state: JobState, message: str, now: float) -> Transition:
    return Transition(
        a.job_id,
        JobState.FAILED,
        {"reason": Reason.LAUNCH_FAILED.value, "detail": message, "ended_at": now},
        expect=frozenset({state}),
        guard=a.guard,
        fence=a.fence,
        detail=message,
    )


def finish(
    a: Attempt,
    target: JobState,
    reason: Reason,
    detail: str,
    fields: Mapping[str, Any],
    now: float,
) -> Transition:
    """RUNNING -> the attempt's one outcome: final, requeued (PENDING) or HELD."""
    writes = {**fields, "reason": reason.value, "detail": detail}
    if target not in (JobState.PENDING, JobState.HELD):
        writes["ended_at"] = now
    return Transition(
        a.job_id,
        target,
        writes,
        expect=frozenset({JobState.RUNNING}),
        guard=a.guard,
        fence=a.fence,
        detail=detail or "exit code 0",
    )


def preempted(a: Attempt, detail: str, fields: Mapping[str, Any]) -> Transition:
    """RUNNING -> PENDING, reason Preempted: the job was stopped (SIGTERM, then SIGKILL after
    the grace period) for a job with a higher claim, and waits to run again; a built-in-loop
    job resumes from its last checkpoint. Guarded and fenced like every worker write."""
    return Transition(
        a.job_id,
        JobState.PENDING,
        {**fields, "reason": Reason.PREEMPTED.value, "detail": detail},
        expect=frozenset({JobState.RUNNING}),
        guard=a.guard,
        fence=a.fence,
        detail=detail,
    )


def idle_stopped(a: Attempt, detail: str, fields: Mapping[str, Any]) -> Transition:
    """RUNNING -> HELD, reason Idle: stopped ([policy] idle_action = "stop") after holding GPU
    memory unused for idle_after_s. Held, not ended: `gpulab release` runs it again, and a
    built-in-loop job resumes from the checkpoint it wrote on SIGTERM."""
    return Transition(
        a.job_id,
        JobState.HELD,
        {**fields, "reason": Reason.IDLE.value, "detail": detail},
        expect=frozenset({JobState.RUNNING}),
        guard=a.guard,
        fence=a.fence,
        detail=detail,
    )


def late_finish(ending: Transition, node: str) -> Transition:
    """The attempt ended just as its lease lapsed and the scheduler requeued it: record the
    final result anyway (same attempt, not dispatched again yet) so it does not run twice."""
    return replace(
        ending,
        expect=frozenset({JobState.PENDING}),
        fields={**ending.fields, "node": node},
        detail=f"{ending.detail} (finished as its lease lapsed)",
    )
