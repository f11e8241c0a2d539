"""The start forecast (scheduler/policy/forecast.py): the queue simulated forward with the
real `place()`. With every job's time limit known and no new arrivals, the forecast is the
schedule itself, so it must agree exactly with the reference simulation of the property
tests; unknown ends and infeasible jobs give no estimate rather than a wrong one."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import HealthCheck, given, settings

from jobs.config import PolicyConfig
from scheduler.policy.forecast import expected_end, forecast_starts, same_estimate
from scheduler.policy.placement import PendingJob, RunningJob
from tests.unit.placement_sim import GIB, POLICY, Gpu, Sim, simulate
from tests.unit.test_placement_props import clusters, policies, queues

GPUS = [Gpu("a", 0, 24 * GIB), Gpu("a", 1, 24 * GIB)]


def limit(job):  # type: ignore[no-untyped-def]
    return job.time_limit_s


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(), queues(limits=True), policies())
def test_with_known_time_limits_the_forecast_is_the_schedule(gpus, jobs, config) -> None:  # type: ignore[no-untyped-def]
    jobs = [replace(j, submitted_at=0.0) for j in jobs]
    actual = simulate(gpus, jobs, config)
    sim = Sim(gpus, config)
    got = forecast_starts(
        jobs,
        sim.accounts(),
        POLICY,
        running=[],
        duration_of=limit,
        now=0.0,
        config=config,
        max_steps=500,
        coalesce_s=0.0,
        coalesce_share=0.0,
    )
    assert {k: v for k, v in got.starts.items() if v is not None} == actual


def test_running_jobs_end_at_their_limits_and_the_queue_follows() -> None:
    running = [
        RunningJob(100, "u", "a", {"a-0": 20 * GIB}, ends_at=600.0),
        RunningJob(101, "u", "a", {"a-1": 20 * GIB}, ends_at=900.0),
    ]
    accounts = Sim(GPUS, PolicyConfig()).accounts()
    for r in running:
        for acct in accounts["a"]:
            if acct.uuid in r.gpus:
                acct.committed = acct.gpulab_reserved = acct.used = acct.gpulab_used = 20 * GIB
                acct.nvml_free = 4 * GIB
                acct.jobs = 1
    jobs = [
        PendingJob(1, 1, 10 * GIB, time_limit_s=100.0),
        PendingJob(2, 1, 10 * GIB, time_limit_s=100.0),
        PendingJob(3, 1, 20 * GIB, time_limit_s=100.0),
        PendingJob(4, 1, 30 * GIB, time_limit_s=100.0),  # never fits a 24 GiB card
    ]
    got = forecast_starts(jobs, accounts, POLICY, running=running, duration_of=limit, now=0.0)
    assert got.starts == {1: 600.0, 2: 600.0, 3: 700.0, 4: None}
    assert got.complete


def test_a_running_job_without_an_end_leaves_the_jobs_behind_it_unknown() -> None:
    accounts = Sim(GPUS[:1], PolicyConfig()).accounts()
    acct = accounts["a"][0]
    acct.committed = acct.gpulab_reserved = acct.used = acct.gpulab_used = 20 * GIB
    acct.nvml_free, acct.jobs = 4 * GIB, 1
    running = [RunningJob(100, "u", "a", {"a-0": 20 * GIB}, ends_at=None)]
    got = forecast_starts(
        [PendingJob(1, 1, 2 * GIB), PendingJob(2, 1, 10 * GIB)], accounts, POLICY,
        running=running, duration_of=limit, now=5.0,
    )  # fmt: skip
    assert got.starts == {1: 5.0, 2: None} and not got.complete
    learned = expected_end(running[0], started_at=0.0, learned_s=50.0, now=5.0, grace_s=60.0)
    assert learned.ends_at == 65.0  # overdue by its history: expected soon, never in the past
    got = forecast_starts([PendingJob(2, 1, 10 * GIB)], accounts, POLICY, running=[learned], duration_of=limit, now=5.0)
    assert got.starts == {2: 65.0}


def test_the_forecast_stops_after_max_steps() -> None:
    jobs = [PendingJob(i, 1, 20 * GIB, time_limit_s=10.0) for i in range(1, 11)]
    got = forecast_starts(
        jobs, Sim(GPUS[:1], PolicyConfig()).accounts(), POLICY, running=[], duration_of=limit, now=0.0, max_steps=3
    )
    assert got.steps == 3 and not got.complete
    assert [got.starts[i] for i in range(1, 5)] == [0.0, 10.0, 20.0, None]


def test_estimates_within_tolerance_are_not_rewritten() -> None:
    assert same_estimate(1000.0, 1020.0, now=0.0)
    assert not same_estimate(1000.0, 1100.0, now=900.0)
    assert same_estimate(None, None, now=0.0) and not same_estimate(None, 5.0, now=0.0)


def test_a_slow_forecast_is_not_rerun_before_ten_times_its_own_duration() -> None:
    """The forecast shares the scheduler's process: a 5 s forecast on a queue that changes
    every second must not run back to back (it would slow every pass)."""
    import redis as redis_py

    from jobs.config import Config
    from scheduler.forecast import Forecaster

    forecaster = Forecaster(redis_py.Redis(port=1), Config())  # `due` talks to no Redis
    assert forecaster.due(0.0, frozenset({1}))
    forecaster._at, forecaster._queue, forecaster.last_ms = 0.0, frozenset({1}), 5_000.0
    changed = frozenset({1, 2})
    assert not forecaster.due(2.0, changed)  # queue changed, but only 2 s after a 5 s run
    assert not forecaster.due(49.0, changed)
    assert forecaster.due(50.0, changed)
    forecaster.last_ms = 10.0  # a cheap forecast: a changed queue is recomputed after 1 s
    assert forecaster.due(1.0, changed)
    assert not forecaster.due(1.0, frozenset({1}))  # unchanged: every eta_interval_s
