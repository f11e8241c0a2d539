"""The preemption policy (scheduler/policy/preemption.py), by properties over random
clusters of running jobs: only jobs that opted in are ever chosen, only for a higher claim
past the margin, only after their minimum run time; the preemptor then fits; two jobs never
preempt each other back and forth; nothing happens while preemption is off or victims are
still stopping."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.config import PolicyConfig
from scheduler.policy.fairshare import fairshare_factors
from scheduler.policy.forecast import SimCluster
from scheduler.policy.placement import PendingJob, RunningJob, place
from scheduler.policy.preemption import Candidate, choose_preemption, claim
from tests.unit.placement_sim import GIB, POLICY, Gpu, Sim

NOW = 100_000.0
CONFIG = PolicyConfig(preempt_after_s=60.0, preempt_min_run_s=600.0, preempt_margin=100.0, weight_age=0.0)


@st.composite
def busy_clusters(draw: st.DrawFn) -> tuple[list[Gpu], list[Candidate]]:
    gpus = [Gpu(f"n{n}", i, 24 * GIB) for n in range(draw(st.integers(1, 2))) for i in range(draw(st.integers(1, 3)))]
    candidates = []
    free = {g.uuid: g.total for g in gpus}
    for k in range(draw(st.integers(1, 8))):
        gpu = draw(st.sampled_from(gpus))
        mem = draw(st.sampled_from([4, 8, 12, 20])) * GIB
        if free[gpu.uuid] < mem:
            continue
        free[gpu.uuid] -= mem
        job = RunningJob(500 + k, draw(st.sampled_from("abc")), gpu.node, {gpu.uuid: mem})
        started = NOW - draw(st.sampled_from([10.0, 700.0, 5000.0]))
        candidates.append(Candidate(job, draw(st.integers(0, 3)), started, draw(st.booleans())))
    return gpus, candidates


def accounts_for(gpus: list[Gpu], candidates: list[Candidate]):  # type: ignore[no-untyped-def]
    cluster = SimCluster(Sim(gpus, CONFIG).accounts(), [])
    for c in candidates:
        cluster.start(c.job)
    return cluster.accounts


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(busy_clusters(), st.integers(0, 5), st.sampled_from([4, 12, 20]), st.sampled_from("abcd"))
def test_victims_opted_in_have_a_lower_claim_ran_long_enough_and_make_room(busy, priority, mem, user) -> None:  # type: ignore[no-untyped-def]
    gpus, candidates = busy
    job = PendingJob(1, 1, mem * GIB, priority=priority, user=user, submitted_at=0.0)
    accounts = accounts_for(gpus, candidates)
    usage = {"a": 5.0, "b": 1.0}
    got = choose_preemption(
        [job], candidates, accounts, POLICY, config=CONFIG, expected={1: None}, usage=usage, now=NOW
    )
    if got is None:
        return
    factors = fairshare_factors(usage, {user} | {c.job.user for c in candidates})
    mine = claim(priority, user, factors, CONFIG)
    by_id = {c.job.id: c for c in candidates}
    for victim in got.victims:
        c = by_id[victim]
        assert c.preemptible
        assert mine > claim(c.priority, c.job.user, factors, CONFIG) + CONFIG.preempt_margin
        assert NOW - c.started_at >= CONFIG.preempt_min_run_s
        assert c.job.node == got.node
    # With the victims gone, the preemptor fits (and not with one victim fewer, on that node).
    cluster = SimCluster(accounts, [c.job for c in candidates])
    for victim in got.victims:
        cluster.release(victim)
    left = [c.job for c in candidates if c.job.id not in got.victims]
    assert place([job], cluster.accounts, POLICY, config=CONFIG, running=left, now=NOW).assignments
    # The victim, waiting in turn, can never take its GPUs back from the preemptor.
    for victim in got.victims:
        c = by_id[victim]
        back = PendingJob(victim, 1, c.job.gpus[next(iter(c.job.gpus))], priority=c.priority, user=c.job.user)
        preemptor = Candidate(RunningJob(1, user, got.node, {"x": mem * GIB}), priority, 0.0, True)
        again = choose_preemption(
            [back], [preemptor], accounts, POLICY, config=CONFIG, expected={victim: None}, usage=usage, now=NOW
        )
        assert again is None or 1 not in again.victims


def test_a_job_that_did_not_opt_in_is_never_preempted() -> None:
    gpus = [Gpu("n0", 0, 24 * GIB)]
    low = Candidate(RunningJob(7, "a", "n0", {"n0-0": 20 * GIB}), 0, 0.0, preemptible=False)
    urgent = PendingJob(1, 1, 20 * GIB, priority=1000, user="b")
    accounts = accounts_for(gpus, [low])
    kw = {"config": CONFIG, "expected": {1: None}, "usage": {}, "now": NOW}
    assert choose_preemption([urgent], [low], accounts, POLICY, **kw) is None  # type: ignore[arg-type]
    opted = replace(low, preemptible=True)
    got = choose_preemption([urgent], [opted], accounts, POLICY, **kw)  # type: ignore[arg-type]
    assert got is not None and got.victims == (7,) and got.node == "n0"
    # Off, too soon, already stopping, or not waiting long enough: nothing.
    off = replace(CONFIG, preempt_after_s=0.0)
    assert choose_preemption([urgent], [opted], accounts, POLICY, **{**kw, "config": off}) is None  # type: ignore[arg-type]
    young = replace(opted, started_at=NOW - 5)
    assert choose_preemption([urgent], [young], accounts, POLICY, **kw) is None  # type: ignore[arg-type]
    stopping = frozenset({99})
    assert choose_preemption([urgent], [opted], accounts, POLICY, stopping=stopping, **kw) is None  # type: ignore[arg-type]
    soon = {**kw, "expected": {1: NOW + 30}}
    assert choose_preemption([urgent], [opted], accounts, POLICY, **soon) is None  # type: ignore[arg-type]


def test_equal_claims_never_preempt_each_other() -> None:
    gpus = [Gpu("n0", 0, 24 * GIB)]
    a = Candidate(RunningJob(7, "a", "n0", {"n0-0": 20 * GIB}), 0, 0.0, True)
    b = PendingJob(1, 1, 20 * GIB, priority=0, user="a")
    got = choose_preemption(
        [b], [a], accounts_for(gpus, [a]), POLICY, config=CONFIG, expected={1: None}, usage={}, now=NOW
    )
    assert got is None
