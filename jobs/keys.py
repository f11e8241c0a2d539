"""Every Redis key gpulab uses, built in one place, all under one prefix.

RQ's own keys (`rq:queue:gpulab-node-<name>`, registries) are RQ's; gpulab only names the
queue (`node_queue_name`).
"""

from __future__ import annotations

PREFIX = "gpulab"

NEXT_JOB_ID = f"{PREFIX}:next_job_id"
PENDING = f"{PREFIX}:pending"  # zset job id -> id (submission order); PENDING and HELD jobs
ACTIVE = f"{PREFIX}:active"  # set of ASSIGNED/RUNNING job ids
FINISHED = f"{PREFIX}:finished"  # zset job id -> ended_at
LEDGER = f"{PREFIX}:ledger"  # hash job id -> JSON reservation {node, gpus: {uuid: bytes}}
NODES = f"{PREFIX}:nodes"  # set of node names ever seen
WAKE = f"{PREFIX}:wake"  # list; a push wakes the scheduler loop
EVENTS = f"{PREFIX}:events"  # global stream of transitions (capped)
SCHEDULER_STATUS = f"{PREFIX}:scheduler"  # hash: last pass stats, pid, heartbeat
FAIRSHARE = f"{PREFIX}:fairshare"  # hash: user -> decayed usage (byte-seconds), "_at" -> charged until
DRAINED = f"{PREFIX}:drained"  # hash: node name -> why (admin `gpulab node drain`); no new jobs there


def job(job_id: int | str) -> str:
    return f"{PREFIX}:job:{job_id}"


def job_events(job_id: int | str) -> str:
    return f"{PREFIX}:job:{job_id}:events"


def waiting(user: str) -> str:
    """Set of the user's PENDING/HELD job ids (kept by the Lua scripts; max_pending_per_user)."""
    return f"{PREFIX}:waiting:{user}"


def lease(job_id: int | str) -> str:
    return f"{PREFIX}:lease:{job_id}"


def node(name: str) -> str:
    """The node's heartbeat (JSON NodeHeartbeat) with a TTL: absent = node down."""
    return f"{PREFIX}:node:{name}"


def node_control(name: str) -> str:
    """List of control messages (cancel) for one worker; it blocks on it."""
    return f"{PREFIX}:node:{name}:control"


def node_queue_name(name: str) -> str:
    """Name of the RQ queue that carries dispatches to one node (`rq info` shows it)."""
    return f"gpulab-node-{name}"
