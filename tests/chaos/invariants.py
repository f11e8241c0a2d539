"""Invariants of gpulab's Redis state that must hold at any moment, whatever failed: the
product's own checker (jobs/invariants.py, also run by `gpulab doctor`), as an assertion."""

from __future__ import annotations

import redis

from jobs import keys
from jobs.invariants import violations


def check_invariants(client: redis.Redis) -> None:
    problems = violations(client)
    if problems:
        ids = sorted({int(i) for i in client.hkeys(keys.LEDGER)} | {int(i) for i in client.smembers(keys.ACTIVE)})
        problems.append(f"states: { {i: client.hget(keys.job(i), 'state') for i in ids} }")
    assert not problems, "\n".join(problems)
