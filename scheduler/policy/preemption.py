"""Preemption by checkpoint: which running jobs to stop so a waiting job with a higher claim
can start. Pure (docs/ARCHITECTURE.md, "Preemption").

A waiting job may preempt when preemption is on (`preempt_after_s` > 0) and it would not
otherwise start soon: its expected start (the forecast) is more than `preempt_after_s`
away, or unknown and it has waited that long. Its victims must all

- have opted in (`JobSpec.may_be_preempted`: built-in-loop jobs by default, others with
  `--preemptible`); a job that did not is never chosen, whatever its priority;
- have a claim lower than the preemptor's by more than `preempt_margin`, where
  claim = weight_priority * --priority + weight_fairshare * F(user) (no age: age would let
  the older victim win its GPUs straight back);
- have run at least `preempt_min_run_s` (this attempt), so two jobs whose claims cross as
  fair share shifts trade places at most once per that time, not every pass;
- not be stopping already.

Victims are taken on one node, lowest claim first and then the most recently started (the
least progress at risk if it has no recent checkpoint), adding
one at a time until the real `place()` says the preemptor fits there with them gone. The
node needing the fewest victims wins. One preemptor per pass, and none while the victims
of an earlier preemption are still stopping: the loop acts again on what actually freed.
Work per pass is bounded: the possible victims are found once, a waiting job whose claim is
not above the lowest of theirs costs O(1), and at most `MAX_TRIED` jobs are probed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from jobs.config import PolicyConfig
from scheduler.policy.accounting import AccountingPolicy, GpuAccount
from scheduler.policy.fairshare import fairshare_factors
from scheduler.policy.forecast import SimCluster
from scheduler.policy.placement import place
from scheduler.policy.types import PendingJob, RunningJob

MAX_TRIED = 8  # waiting jobs a pass probes for victims (each probe runs `place` a few times)


@dataclass(frozen=True)
class Candidate:
    """A running job as preemption sees it."""

    job: RunningJob
    priority: int  # its --priority
    started_at: float
    preemptible: bool


@dataclass(frozen=True)
class Preemption:
    job_id: int  # the job that will start once the victims are gone
    node: str
    victims: tuple[int, ...]
    detail: str


def claim(priority: int, user: str, factors: Mapping[str, float], config: PolicyConfig) -> float:
    return config.weight_priority * priority + config.weight_fairshare * factors.get(user, 0.0)


def wants_preemption(job: PendingJob, expected_start: float | None, now: float, config: PolicyConfig) -> bool:
    """Would `job` not start within `preempt_after_s` without help?"""
    after = config.preempt_after_s
    if after <= 0:
        return False
    if expected_start is not None:
        return expected_start - now > after
    return now - job.submitted_at >= after


def choose_preemption(
    waiting: list[PendingJob],
    candidates: list[Candidate],
    accounts: dict[str, list[GpuAccount]],
    policy: AccountingPolicy,
    *,
    config: PolicyConfig,
    expected: Mapping[int, float | None],
    usage: Mapping[str, float],
    now: float,
    stopping: frozenset[int] = frozenset(),
    unavailable_nodes: frozenset[str] = frozenset(),
) -> Preemption | None:
    """`waiting`: the jobs this pass left waiting, highest priority first. `stopping`: running
    jobs already asked to stop. Returns at most one preemption."""
    if config.preempt_after_s <= 0 or stopping:
        return None
    running = [c.job for c in candidates]
    factors = fairshare_factors(usage, {j.user for j in waiting} | {r.user for r in running})
    claims = {c.job.id: claim(c.priority, c.job.user, factors, config) for c in candidates}
    # Victims any job could have, found once: the per-job filter below is then O(1) for the
    # (usual) waiting job whose claim is not above the lowest of them.
    possible = [
        c
        for c in candidates
        if c.preemptible
        and c.job.id not in stopping
        and now - c.started_at >= config.preempt_min_run_s
        and c.job.node not in unavailable_nodes
    ]
    if not possible:
        return None
    lowest = min(claims[c.job.id] for c in possible)
    tried = 0
    for job in waiting:
        if not wants_preemption(job, expected.get(job.id), now, config):
            continue
        mine = claim(job.priority, job.user, factors, config)
        if mine <= lowest + config.preempt_margin:
            continue
        eligible = [c for c in possible if mine > claims[c.job.id] + config.preempt_margin]
        tried += 1
        if tried > MAX_TRIED:
            return None  # bounded work per pass: the next pass tries again
        best = _best_node(job, eligible, running, claims, accounts, policy, config, usage, now, unavailable_nodes)
        if best is not None:
            node, victims = best
            detail = f"for job {job.id} (claim {mine:.0f} > " + ", ".join(f"job {v} {claims[v]:.0f}" for v in victims)
            return Preemption(job.id, node, victims, detail + ")")
    return None


def _best_node(
    job: PendingJob,
    eligible: list[Candidate],
    running: list[RunningJob],
    claims: Mapping[int, float],
    accounts: dict[str, list[GpuAccount]],
    policy: AccountingPolicy,
    config: PolicyConfig,
    usage: Mapping[str, float],
    now: float,
    unavailable: frozenset[str],
) -> tuple[str, tuple[int, ...]] | None:
    by_node: dict[str, list[Candidate]] = {}
    for c in eligible:
        by_node.setdefault(c.job.node, []).append(c)
    best: tuple[tuple[int, float], str, tuple[int, ...]] | None = None
    alone = replace(config, max_reservations=0)  # a probe: would it fit now, nothing held back
    for node in sorted(by_node):
        if node not in accounts or (job.node and job.node != node):
            continue
        order = sorted(by_node[node], key=lambda c: (claims[c.job.id], -c.started_at, c.job.id))
        cluster = SimCluster({node: accounts[node]}, [r for r in running if r.node == node])
        gone: list[int] = []
        for victim in order:
            cluster.release(victim.job.id)
            gone.append(victim.job.id)
            left = [r for r in running if r.id not in gone]
            result = place(
                [job], cluster.accounts, policy, config=alone, running=left, usage=usage, now=now,
                unavailable_nodes=unavailable,
            )  # fmt: skip
            if result.assignments:
                key = (len(gone), sum(claims[v] for v in gone))
                if best is None or key < best[0]:
                    best = (key, node, tuple(gone))
                break
    return None if best is None else (best[1], best[2])
