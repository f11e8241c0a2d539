"""The invariants of gpulab's Redis state (docs/ARCHITECTURE.md, "Invariants"), checked on one
atomic snapshot. Tests assert them after every fault; `gpulab doctor` reports them."""

from __future__ import annotations

import redis

from jobs import keys


def violations(client: redis.Redis) -> list[str]:
    """What is wrong now, one line each; [] when every invariant holds.

    - the ledger holds exactly the reservations of the active (ASSIGNED/RUNNING) jobs;
    - every lease belongs to an active job;
    - no job is both waiting and active.
    """
    pipe = client.pipeline(transaction=True)  # one MULTI: a consistent snapshot
    pipe.hkeys(keys.LEDGER)
    pipe.smembers(keys.ACTIVE)
    pipe.zrange(keys.PENDING, 0, -1)
    pipe.keys(keys.lease("*"))  # O(keys); fine for an admin check and for tests
    raw_ledger, raw_active, raw_pending, raw_leases = pipe.execute()
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
