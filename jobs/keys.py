"""Every Redis key gpulab uses, built in one place, all under one prefix.

RQ's own keys (`rq:queue:gpulab-node-<name>`, `rq:job:<id>`, registries) are RQ's; gpulab
names its queues (`node_queue_name`) and, so a transition can remove a launch entry in the same
atomic step, the two RQ keys that hold one (`rq_queue`, `rq_job`).
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
WAITING_COUNT = f"{PREFIX}:waiting"  # hash: user -> number of PENDING/HELD jobs (max_pending_per_user)
WAITING_BYTES = f"{PREFIX}:waiting_bytes"  # hash: user -> bytes of their PENDING/HELD specs (max_stored_per_user)
DURATIONS = f"{PREFIX}:durations"  # hash: "user\tname" -> {"n", "mean"}: learned run times (start estimates)
# hash: Prometheus counters folded from EVENTS (scheduler/counters.py), "_cursor" -> last entry folded
METRIC_COUNTERS = f"{PREFIX}:metric_counters"
QUARANTINE = f"{PREFIX}:quarantine"  # stream: records a daemon refused (admin-visible, `gpulab doctor`)
# Leader election among schedulers (scheduler/leader.py, docs/ARCHITECTURE.md "Leader and fencing").
LEADER = f"{PREFIX}:leader"  # string "<epoch>:<token>" of the leader, with a PX TTL: the lease
LEADER_EPOCH = f"{PREFIX}:leader:epoch"  # counter, INCRed by each new leadership
LEADER_FENCE = f"{PREFIX}:leader:fence"  # "<epoch>:<token>" of the newest leadership (no TTL);
# every write of the scheduling loop checks it atomically, so an ex-leader cannot write
LEADER_INFO = f"{PREFIX}:leader:info"  # hash: holder, epoch, since_ms, lease_ms (for `gpulab doctor`)
SCHEDULERS = f"{PREFIX}:schedulers"  # zset: scheduler process (host:pid socket) -> Redis time last seen


def job(job_id: int | str) -> str:
    return f"{PREFIX}:job:{job_id}"


def job_events(job_id: int | str) -> str:
    return f"{PREFIX}:job:{job_id}:events"


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


def node_owner(name: str) -> str:
    """The worker process holding the node name (host:pid), with the heartbeat's TTL."""
    return f"{PREFIX}:node:{name}:owner"


def gpu_owner(uuid: str) -> str:
    """The node serving one physical GPU ("<node> <host:pid>"), with the heartbeat's TTL: two
    workers on one host under different names would each offer the same GPUs."""
    return f"{PREFIX}:gpu:{uuid}:owner"


def node_epoch(name: str) -> str:
    """The node's fencing token: the epoch of the worker that holds the name now. Every write a
    worker makes checks it atomically, so a frozen worker that resumes after a replacement
    took its name cannot renew, start or finish anything."""
    return f"{PREFIX}:node:{name}:epoch"


RQ_QUEUE_PREFIX = "rq:queue:"  # rq.Queue.redis_queue_namespace_prefix
RQ_JOB_PREFIX = "rq:job:"  # rq.job.Job.redis_job_namespace_prefix


def rq_queue(node_name: str) -> str:
    return RQ_QUEUE_PREFIX + node_queue_name(node_name)


def rq_job(rq_job_id: str) -> str:
    return RQ_JOB_PREFIX + rq_job_id


# ---- notifications (docs/ARCHITECTURE.md, "Notifications") -----------------------------------
NOTIFY_EVENTS = f"{PREFIX}:notify:events"  # stream: events to notify (TRANSITION script, jobs.notify.emit)
NOTIFY_EVENTS_MAXLEN = 1_000_000  # a safety net only: the notifier consumes it (consumer group)
NOTIFY_GROUP = "notifier"  # the consumer group of NOTIFY_EVENTS (a name, not a key)
NOTIFY_OUTBOX = f"{PREFIX}:notify:outbox"  # hash: delivery id -> JSON delivery (until sent or given up)
NOTIFY_DUE = f"{PREFIX}:notify:due"  # zset: delivery id -> when to (re)try it; claimed = pushed ahead
NOTIFY_QUEUED = f"{PREFIX}:notify:queued"  # hash: user -> deliveries in the outbox ([notify] max_queued_per_user)
NOTIFY_DEFAULTS = f"{PREFIX}:notify:defaults"  # hash: user -> JSON NotifySettings (`gpulab notify set`)
NOTIFY_SECRETS = f"{PREFIX}:notify:secrets"  # hash: user -> webhook signing secret (hex)


def notify_stats(user: str) -> str:
    """Hash of one user's delivery counters (sent, failed, dropped) and last error (`notify show`)."""
    return f"{PREFIX}:notify:stats:{user}"


def job_log(job_id: int | str) -> str:
    """Stream of the job's output as shipped by its workers: entry id `<byte offset>-1`, field
    `d` = the bytes; capped per job (head kept, oldest of the rest trimmed) and expiring
    after [worker] log_retention_s without news (jobs/joblog.py)."""
    return f"{PREFIX}:job:{job_id}:log"


def job_log_meta(job_id: int | str) -> str:
    """Hash beside `job_log`: `end` (offset after the last byte seen), `stored` (bytes in the
    stream), `dropped` (bytes not kept), `attempt` (the newest attempt shipping)."""
    return f"{PREFIX}:job:{job_id}:logmeta"


DAEMONS = f"{PREFIX}:daemons"  # zset: daemon id -> expiry (Redis ms); live schedulers and workers
DAEMON_INFO = f"{PREFIX}:daemons:info"  # hash: daemon id -> JSON {kind, name, host, pid, version, clock...}


def profile(digest: str) -> str:
    """A learned memory profile: list of recent finished runs (JSON samples), newest first,
    trimmed to [memory] profile_window, expiring [memory] profile_ttl_days after its last run."""
    return f"{PREFIX}:profile:{digest}"


def user_profiles(user: str) -> str:
    """zset profile digest -> last run time: one user's profiles (`gpulab profile`)."""
    return f"{PREFIX}:profiles:{user}"
