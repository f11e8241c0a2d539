"""The invariants of gpulab's Redis state (docs/ARCHITECTURE.md, "Invariants"), checked on one
atomic snapshot. Tests assert them after every fault; `gpulab doctor` reports them."""

from __future__ import annotations

import redis

from jobs import keys, scripts


def violations(client: redis.Redis) -> list[str]:
    """What is wrong now, one line each; [] when every invariant holds.

    - the ledger holds exactly the reservations of the active (ASSIGNED/RUNNING) jobs;
    - every lease belongs to an active job;
    - no job is both waiting and active.
    """
    # One script: a consistent snapshot. Its SCAN of the lease keys is O(keys); fine for an
    # admin check and for tests.
    snapshot = client.eval(scripts.INVARIANT_SNAPSHOT, 3, keys.LEDGER, keys.ACTIVE, keys.PENDING, keys.lease("*"))
    raw_ledger, raw_active, raw_pending, raw_leases = snapshot
    ledger = {int(i) for i in raw_ledger}
    active = {int(i) for i in raw_active}
    pending = {int(i) for i in raw_pending}
    prefix = keys.lease("")
    leases = {int(k.decode().removeprefix(prefix)) for k in raw_leases}
    problems = []
    if ledger - active:
        problems.append(f"reservations held by jobs that are not active: {sorted(ledger - active)[:20]}")
    if active - ledger:
        problems.append(f"active jobs without a reservation: {sorted(active - ledger)[:20]}")
    if leases - active:
        problems.append(f"leases of jobs that are not active: {sorted(leases - active)[:20]}")
    if pending & active:
        problems.append(f"jobs both waiting and active: {sorted(pending & active)[:20]}")
    return problems
