"""Fair share and job priority: pure arithmetic, unit-tested on its own.

Usage is GPU memory x time: a job holding 12 GiB on each of 2 GPUs for an hour adds
2 * 12 GiB * 3600 s (its request, or its peak when larger; a whole-GPU job counts the GPU's
total). Past usage decays with a half-life, as in Slurm's multifactor priority plugin, so
last week's marathon weighs half as much as today's.

The fair-share factor follows Slurm's classic formula with equal shares among the users
who are active (have usage, pending or running jobs): F = 2^(-(U_user / U_all) * n).
A user who used nothing recently gets 1.0, one at exactly their share 0.5, one who used
everything 2^-n.

    priority = weight_priority * --priority + weight_fairshare * F + weight_age * A
    A = min(1, waited / max_age)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from jobs.config import PolicyConfig

NEGLIGIBLE_USAGE = 2**20  # byte-seconds below this are dropped from the stored table


def decay_factor(elapsed_s: float, half_life_s: float) -> float:
    """What one byte-second of usage is worth `elapsed_s` later. No decay for half_life <= 0."""
    if half_life_s <= 0 or elapsed_s <= 0:
        return 1.0
    return math.pow(0.5, elapsed_s / half_life_s)


def overlap_s(start: float | None, end: float, window_start: float, window_end: float) -> float:
    """Seconds a job running over [start, end] spent inside [window_start, window_end]."""
    if start is None:
        return 0.0
    return max(0.0, min(end, window_end) - max(start, window_start))


def charge(
    usage: Mapping[str, float], last_at: float, now: float, charges: Mapping[str, float], half_life_s: float
) -> dict[str, float]:
    """Decay `usage` from `last_at` to `now`, then add what each user used in between.

    Usage accrued during the interval is added undecayed: the interval is one scheduling
    pass (seconds), against a half-life of days.
    """
    factor = decay_factor(now - last_at, half_life_s)
    result = {user: value * factor for user, value in usage.items()}
    for user, amount in charges.items():
        if amount > 0:
            result[user] = result.get(user, 0.0) + amount
    return {user: value for user, value in result.items() if value >= NEGLIGIBLE_USAGE}


def fairshare_factors(usage: Mapping[str, float], users: Iterable[str]) -> dict[str, float]:
    """F per user, for every user in `users` and every user with usage."""
    active = set(users) | {u for u, v in usage.items() if v > 0}
    total = sum(max(0.0, usage.get(u, 0.0)) for u in active)
    if total <= 0:
        return dict.fromkeys(active, 1.0)
    n = len(active)
    return {u: math.pow(2.0, -(max(0.0, usage.get(u, 0.0)) / total) * n) for u in active}


@dataclass(frozen=True)
class PriorityParts:
    """A job's priority broken into its parts (what `gpulab queue` shows, like sprio)."""

    priority: float
    fairshare: float
    age: float
    fairshare_factor: float
    age_factor: float

    @property
    def total(self) -> float:
        return self.priority + self.fairshare + self.age

    def to_json(self) -> dict[str, float]:
        return {
            "total": round(self.total, 3),
            "priority": round(self.priority, 3),
            "fairshare": round(self.fairshare, 3),
            "age": round(self.age, 3),
            "fairshare_factor": round(self.fairshare_factor, 6),
            "age_factor": round(self.age_factor, 6),
        }


def priority_parts(priority: int, fairshare_factor: float, waited_s: float, policy: PolicyConfig) -> PriorityParts:
    age_factor = 1.0 if policy.max_age_s <= 0 else min(1.0, max(0.0, waited_s) / policy.max_age_s)
    return PriorityParts(
        priority=policy.weight_priority * priority,
        fairshare=policy.weight_fairshare * fairshare_factor,
        age=policy.weight_age * age_factor,
        fairshare_factor=fairshare_factor,
        age_factor=age_factor,
    )
