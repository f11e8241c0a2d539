"""Each pending job's priority broken into its parts, for `gpulab queue` (like Slurm's sprio).

Computed as the scheduler's pass computes it - stored usage decayed to now plus what the
active jobs used since it was stored (scheduler/usage.py), the same formula - so what
`queue` shows is what the next pass will order by."""

from __future__ import annotations

from typing import Any

import redis

from jobs.config import PolicyConfig
from jobs.record import JobRecord
from jobs.states import ACTIVE_STATES, JobState
from scheduler.cluster import read_heartbeats, read_ledger
from scheduler.policy.fairshare import fairshare_factors, priority_parts
from scheduler.usage import UsageTracker

GIB_HOUR = 2**30 * 3600.0


def priority_views(
    client: redis.Redis, config: PolicyConfig, records: list[JobRecord], now: float
) -> dict[int, dict[str, Any]]:
    pending = [r for r in records if r.state == JobState.PENDING]
    if not pending:
        return {}
    active = [r for r in records if r.state in ACTIVE_STATES]
    ledger = {r.job_id: r for r in read_ledger(client)}
    beats, _down = read_heartbeats(client)
    whole_gpu_bytes = max((d.total_bytes for b in beats for d in b.snapshot.devices), default=0)
    tracker = UsageTracker(client, config.fairshare_half_life_s)
    usage = tracker.update(now, active, ledger, whole_gpu_bytes, store=False)
    users = {r.user for r in pending} | {r.user for r in active}
    factors = fairshare_factors(usage, users)
    views = {}
    for record in pending:
        parts = priority_parts(record.spec.priority, factors[record.user], now - record.submitted_at, config)
        views[record.id] = {**parts.to_json(), "usage_gib_hours": round(usage.get(record.user, 0.0) / GIB_HOUR, 3)}
    return views
