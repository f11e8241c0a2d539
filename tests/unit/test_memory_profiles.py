"""Learned memory profiles (jobs/profiles.py) and enforcement decisions (worker/enforcement.py): pure."""

from __future__ import annotations

from jobs.profiles import LearnPolicy, Sample, from_estimate, learn, profile_key, quantile
from jobs.sizes import GiB, MiB
from jobs.spec import JobSpec
from worker.enforcement import Enforcer, GpuState, JobOnGpu

POLICY = LearnPolicy(quantile=0.95, margin=0.10, min_runs=3, outlier_factor=4.0, min_request=256 * MiB)


def runs(*peaks: int, oom: tuple[int, ...] = (), request: int | None = None) -> list[Sample]:
    return [Sample(i, 1, p, float(i), request=request, oom=i in oom) for i, p in enumerate(peaks)]


def test_quantile_is_nearest_rank() -> None:
    assert quantile([5, 1, 3, 2, 4], 0.95) == 5
    assert quantile(list(range(1, 21)), 0.95) == 19
    assert quantile([7], 0.5) == 7


def test_learned_request_is_p95_plus_margin_in_whole_mib_and_says_where_from() -> None:
    learned = learn(runs(10 * GiB, 11 * GiB, 10 * GiB, 12 * GiB, 10 * GiB, 11 * GiB), POLICY)
    assert learned is not None
    assert learned.request == -(-int(12 * GiB * 1.1) // MiB) * MiB
    assert learned.origin == "13.2GiB from 6 runs, p95 + 10%"


def test_too_few_runs_learn_nothing() -> None:
    assert learn(runs(GiB, GiB), POLICY) is None


def test_a_job_whose_peak_is_zero_gets_the_floor_not_zero() -> None:
    learned = learn(runs(0, 0, 0), POLICY)
    assert learned is not None and learned.request == 256 * MiB
    assert "at least 256MiB" in learned.origin


def test_one_huge_outlier_is_left_out_and_said() -> None:
    learned = learn(runs(4 * GiB, 4 * GiB, 4 * GiB, 4 * GiB, 100 * GiB), POLICY)
    assert learned is not None and learned.request < 5 * GiB and learned.outliers == 1
    assert "1 outlier left out" in learned.origin


def test_an_out_of_memory_run_counts_at_least_at_its_request_and_is_never_an_outlier() -> None:
    learned = learn(runs(2 * GiB, 2 * GiB, 2 * GiB, 1 * GiB, oom=(3,), request=20 * GiB), POLICY)
    assert learned is not None and learned.request >= 22 * GiB


def test_absurd_stored_samples_do_not_parse() -> None:
    assert Sample.from_json({"job_id": 1, "attempt": 1, "peak": 2**60, "at": 0}) is not None  # peak dropped to 0
    assert Sample.from_json({"job_id": 1, "attempt": 1, "peak": 2**60, "at": 0}).peak == 0  # type: ignore[union-attr]
    assert Sample.from_json({"job_id": "x"}) is None
    assert Sample.from_json([1, 2]) is None
    assert Sample.from_json({"job_id": 1, "attempt": 1, "peak": float("nan"), "at": 0}).peak == 0  # type: ignore[union-attr]


def test_estimate_request_has_the_margin_and_the_floor() -> None:
    request, origin = from_estimate(GiB, POLICY)
    assert request == -(-int(GiB * 1.1) // MiB) * MiB and "pre-run estimate" in origin
    assert from_estimate(0, POLICY)[0] == 256 * MiB


def spec(*command: str, kind: str = "command", cwd: str = "/home/a/proj", gpus: int = 1) -> JobSpec:
    return JobSpec(command=command, cwd=cwd, kind=kind, gpus=gpus)


IGNORE = ("--seed", "--out")


def test_profile_key_changes_with_the_batch_size_not_with_the_seed() -> None:
    a = profile_key(spec("python", "train.py", "--batch-size", "64", "--seed", "1"), "alice", IGNORE)
    b = profile_key(spec("python", "train.py", "--batch-size", "64", "--seed=2"), "alice", IGNORE)
    c = profile_key(spec("python", "train.py", "--batch-size", "128", "--seed", "1"), "alice", IGNORE)
    assert a.digest == b.digest != c.digest
    assert a.label == "python train.py --batch-size 64"


def test_profile_keys_of_two_users_never_collide() -> None:
    job = spec("python", "train.py")
    assert profile_key(job, "alice", IGNORE).digest != profile_key(job, "bob", IGNORE).digest
    # A user name cannot smuggle in another identity: the key hashes a JSON list.
    assert profile_key(job, 'alice","command', IGNORE).digest != profile_key(job, "alice", IGNORE).digest


def test_same_script_name_in_two_projects_is_two_profiles() -> None:
    one = profile_key(spec("python", "train.py", cwd="/home/a/p1"), "a", IGNORE)
    two = profile_key(spec("python", "train.py", cwd="/home/a/p2"), "a", IGNORE)
    assert one.digest != two.digest


def test_training_key_keeps_factory_args_and_amp_not_epochs_and_gpus_count() -> None:
    base = ("/venv/bin/python", "-P", "-m", "worker.training", "/p/digits.py")
    a = profile_key(spec(*base, "--epochs", "3", "--", "--batch", "64", kind="training"), "a", IGNORE)
    b = profile_key(spec(*base, "--epochs", "9", "--", "--batch", "64", kind="training"), "a", IGNORE)
    c = profile_key(spec(*base, "--amp", "bf16", "--", "--batch", "64", kind="training"), "a", IGNORE)
    d = profile_key(spec(*base, "--", "--batch", "64", kind="training", gpus=2), "a", IGNORE)
    assert a.digest == b.digest and len({a.digest, c.digest, d.digest}) == 3
    assert a.label == "train digits.py --batch 64"


GiB4 = 4 * GiB


def gpu(free: int, *jobs: JobOnGpu, outside: int = 0) -> GpuState:
    return GpuState("GPU-0", 0, free, jobs, outside)


def test_an_over_user_alone_on_its_gpu_is_left_alone() -> None:
    enforcer = Enforcer("stop", 1.0, 256 * MiB)
    assert enforcer.check([gpu(GiB, JobOnGpu(1, GiB4, 20 * GiB))], 0.0) == []


def test_over_user_is_warned_then_stopped_after_grace_and_the_behaving_job_never() -> None:
    enforcer = Enforcer("stop", 5.0, 256 * MiB)
    state = [gpu(3 * GiB, JobOnGpu(1, GiB4, 20 * GiB), JobOnGpu(2, 8 * GiB, GiB))]
    first = enforcer.check(state, 0.0)
    assert [(d.job_id, d.action) for d in first] == [(1, "warn")]
    assert "more than its --mem" in first[0].detail and "job 2" in first[0].detail
    assert enforcer.check(state, 4.9) == []
    assert [(d.job_id, d.action) for d in enforcer.check(state, 5.0)] == [(1, "stop")]
    assert enforcer.check(state, 9.0) == []  # stopped once


def test_grace_restarts_when_the_risk_passes() -> None:
    enforcer = Enforcer("stop", 5.0, 256 * MiB)
    risky = [gpu(3 * GiB, JobOnGpu(1, GiB4, 20 * GiB), JobOnGpu(2, 8 * GiB, GiB))]
    calm = [gpu(3 * GiB, JobOnGpu(1, GiB4, 3 * GiB), JobOnGpu(2, 8 * GiB, GiB))]
    enforcer.check(risky, 0.0)
    enforcer.check(calm, 3.0)
    assert [d.action for d in enforcer.check(risky, 6.0)] == ["warn"]
    assert enforcer.check(risky, 10.0) == []
    assert [d.action for d in enforcer.check(risky, 11.0)] == ["stop"]


def test_warn_policy_never_stops_and_never_policy_says_nothing() -> None:
    state = [gpu(0, JobOnGpu(1, GiB4, 20 * GiB), outside=GiB)]
    warn = Enforcer("warn", 0.0, 256 * MiB)
    assert [d.action for d in warn.check(state, 0.0)] == ["warn"]
    assert warn.check(state, 100.0) == []
    assert Enforcer("never", 0.0, 256 * MiB).check(state, 0.0) == []


def test_no_risk_while_the_co_tenants_promises_are_still_covered() -> None:
    enforcer = Enforcer("stop", 0.0, 256 * MiB)
    assert enforcer.check([gpu(10 * GiB, JobOnGpu(1, GiB4, 6 * GiB), JobOnGpu(2, 8 * GiB, 4 * GiB))], 0.0) == []


def test_a_whole_gpu_job_is_never_over() -> None:
    enforcer = Enforcer("stop", 0.0, 256 * MiB)
    assert enforcer.check([gpu(0, JobOnGpu(1, None, 24 * GiB), outside=GiB)], 0.0) == []
