"""Property tests of placement over random clusters and queues (hypothesis):
- one pass never over-commits a GPU, never breaks a constraint, a cap or an array throttle,
  and accounts for every job exactly once;
- over whole simulated schedules, the reserved head job starts no later than it would
  without backfill, and per-user caps hold at every pass."""

from __future__ import annotations

from collections import Counter, defaultdict

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from jobs.config import PolicyConfig
from scheduler.policy.accounting import GpuAccount
from scheduler.policy.feasibility import Feasibility, Shape
from scheduler.policy.placement import PendingJob, PlacementResult, RunningJob, place
from tests.unit.placement_sim import GIB, POLICY, Gpu, Running, Sim, simulate

SIZES = [16, 24, 40, 80]
MODELS = ["NVIDIA A100", "NVIDIA RTX 4090"]


@st.composite
def clusters(draw: st.DrawFn) -> list[Gpu]:
    gpus = []
    for n in range(draw(st.integers(1, 3))):
        size = draw(st.sampled_from(SIZES))
        model = draw(st.sampled_from(MODELS))
        gpus += [Gpu(f"n{n}", i, size * GIB, model) for i in range(draw(st.integers(1, 4)))]
    return gpus


@st.composite
def queues(draw: st.DrawFn, *, limits: bool = False, constraints: bool = True) -> list[PendingJob]:
    jobs = []
    for job_id in range(1, draw(st.integers(1, 25)) + 1):
        mem = draw(st.sampled_from([None, 2, 4, 8, 12, 20, 30, 60]))
        array = draw(st.sampled_from([None, None, None, 900, 901])) if constraints else None
        jobs.append(
            PendingJob(
                id=job_id,
                gpus=draw(st.integers(1, 3)),
                mem_bytes=None if mem is None else mem * GIB,
                priority=draw(st.integers(0, 3)),
                user=draw(st.sampled_from("abc")),
                submitted_at=float(draw(st.integers(0, 100))),
                time_limit_s=float(draw(st.integers(1, 50))) if limits else draw(st.sampled_from([None, 30.0, 300.0])),
                exclusive=constraints and draw(st.booleans()) and mem is not None and draw(st.booleans()),
                node=draw(st.sampled_from(["", "", "", "", "n0", "n2"])) if constraints else "",
                gpu_model=draw(st.sampled_from(["", "", "", "a100"])) if constraints else "",
                array_id=array,
                array_throttle=0 if array is None else 2,
            )
        )
    return jobs


@st.composite
def policies(draw: st.DrawFn) -> PolicyConfig:
    return PolicyConfig(
        weight_fairshare=draw(st.sampled_from([0.0, 1000.0])),
        weight_age=draw(st.sampled_from([0.0, 1000.0])),
        max_age_s=100.0,
        reserve_after_s=float(draw(st.sampled_from([0, 50, 1000]))),
        max_reservations=draw(st.integers(0, 3)),
        max_gpus_per_user=draw(st.sampled_from([0, 2, 4])),
        max_mem_per_user_bytes=draw(st.sampled_from([0, 40 * GIB, 100 * GIB])),
        max_running_per_user=draw(st.sampled_from([0, 1, 3])),
    )


def busy_sim(gpus: list[Gpu], config: PolicyConfig, occupants: list[tuple[int, int, float | None]]) -> Sim:
    """A Sim with some jobs already running: (gpu position, GiB, time limit)."""
    sim = Sim(gpus, config)
    for n, (pos, gib, limit) in enumerate(occupants):
        gpu = gpus[pos % len(gpus)]
        used = sum(r.reserved.get(gpu.uuid, 0) for r in sim.running.values())
        amount = min(gib * GIB, gpu.total - used)
        if amount <= 0:
            continue
        array = 900 if n % 4 == 0 else None
        job = PendingJob(1000 + n, 1, amount, user="abc"[n % 3], time_limit_s=limit, array_id=array)
        end = float("inf") if limit is None else limit
        sim.running[job.id] = Running(job, gpu.node, {gpu.uuid: amount}, False, 0.0, end)
    return sim


def check_pass(
    sim: Sim, accounts: dict[str, list[GpuAccount]], running: list[RunningJob], jobs: list[PendingJob],
    result: PlacementResult, config: PolicyConfig,
) -> None:  # fmt: skip
    by_id = {j.id: j for j in jobs}
    assigned = [a.job_id for a in result.assignments]
    assert len(assigned) == len(set(assigned))
    assert set(assigned).isdisjoint(result.waiting) and set(assigned) | set(result.waiting) == set(by_id)
    start = {g.uuid: g for gs in accounts.values() for g in gs}
    promised: Counter[str] = Counter()
    whole_on: Counter[str] = Counter()
    for a in result.assignments:
        job = by_id[a.job_id]
        uuids = [g.uuid for g in a.gpus]
        assert len(uuids) == job.gpus == len(set(uuids)) and all(start[u].node == a.node for u in uuids)
        assert a.node not in sim.unavailable and (not job.node or a.node == job.node)
        assert not job.gpu_model or all(job.gpu_model.lower() in start[u].name.lower() for u in uuids)
        for uuid in uuids:
            promised[uuid] += a.reserved_bytes[uuid]
            if a.whole_gpu:
                whole_on[uuid] += 1
                assert start[uuid].idle(POLICY) and not start[uuid].whole_gpu_taken
    for uuid, amount in promised.items():  # no GPU over-committed
        if whole_on[uuid]:
            assert whole_on[uuid] == 1 and amount == start[uuid].total  # alone on its GPU
        else:
            assert amount <= start[uuid].available(POLICY)
    use: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    tasks: Counter[int] = Counter(r.array_id for r in running if r.array_id is not None)
    for r in running:
        use[r.user][0] += len(r.gpus)
        use[r.user][1] += sum(r.gpus.values())
        use[r.user][2] += 1
    caps_before = {u: list(v) for u, v in use.items()}
    for a in result.assignments:
        job = by_id[a.job_id]
        use[job.user][0] += job.gpus
        use[job.user][1] += sum(a.reserved_bytes.values())
        use[job.user][2] += 1
        if job.array_id is not None:
            tasks[job.array_id] += 1
            assert tasks[job.array_id] <= job.array_throttle
    for user, (g, m, n) in use.items():  # caps hold (for users the pass gave something)
        if [g, m, n] != caps_before.get(user, [0, 0, 0]):
            assert not config.max_gpus_per_user or g <= config.max_gpus_per_user
            assert not config.max_mem_per_user_bytes or m <= config.max_mem_per_user_bytes
            assert not config.max_running_per_user or n <= config.max_running_per_user


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    clusters(), queues(), policies(),
    st.lists(st.tuples(st.integers(0, 11), st.integers(1, 40), st.sampled_from([None, 20.0, 80.0])), max_size=6),
    st.sampled_from([frozenset(), frozenset({"n1"})]), st.dictionaries(st.sampled_from("abc"), st.floats(0, 1e14)),
)  # fmt: skip
def test_one_pass_never_overcommits_and_respects_every_limit(
    gpus: list[Gpu], jobs: list[PendingJob], config: PolicyConfig,
    occupants: list[tuple[int, int, float | None]], drained: frozenset[str], usage: dict[str, float],
) -> None:  # fmt: skip
    sim = busy_sim(gpus, config, occupants)
    sim.unavailable = drained
    accounts, running = sim.accounts(), sim.running_jobs()
    result = place(jobs, accounts, POLICY, config=config, running=running, usage=usage, now=60.0,
                   unavailable_nodes=drained)  # fmt: skip
    check_pass(sim, accounts, running, jobs, result, config)
    for plan in result.reservations:
        assert plan.job_id in result.waiting and result.waiting[plan.job_id].reason.value == "Resources"


def _feasible(gpus: list[Gpu], jobs: list[PendingJob]) -> list[PendingJob]:
    """The jobs some node could ever run (the others are refused at submit)."""
    feasible = Feasibility(Sim(gpus, PolicyConfig()).accounts(), 0)
    return [j for j in jobs if feasible.why_never(Shape(j.gpus, j.mem_bytes, j.exclusive)) is None]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(), queues(limits=True, constraints=False), st.integers(1, 3))
def test_the_reserved_head_job_starts_no_later_than_without_backfill(
    gpus: list[Gpu], jobs: list[PendingJob], max_reservations: int
) -> None:
    # Drop what could never run rather than discard the example: far less filtering.
    jobs = [j.__class__(**{**j.__dict__, "submitted_at": 0.0}) for j in _feasible(gpus, jobs)]
    assume(jobs)
    # Order by --priority alone (fair share and age would reorder as the schedules differ).
    config = PolicyConfig(weight_fairshare=0, weight_age=0, reserve_after_s=0, max_reservations=max_reservations)
    with_backfill = simulate(gpus, jobs, config)
    strict = simulate(gpus, jobs, config, strict=True)
    assert set(with_backfill) == set(strict) == {j.id for j in jobs}  # everyone runs, either way
    order = sorted(jobs, key=lambda j: (-j.priority, j.id))
    head = next((j for j in order if with_backfill[j.id] > 0), None)
    assume(head is not None)
    assert head is not None
    assert with_backfill[head.id] <= strict[head.id]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(), queues(limits=True), policies())
def test_caps_and_throttles_hold_at_every_pass_of_a_schedule(
    gpus: list[Gpu], jobs: list[PendingJob], config: PolicyConfig
) -> None:
    def check(sim: Sim, result: PlacementResult, now: float) -> None:
        use: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        tasks: Counter[int] = Counter()
        per_gpu: Counter[str] = Counter()
        for r in sim.running.values():
            use[r.job.user][0] += len(r.reserved)
            use[r.job.user][1] += sum(r.reserved.values())
            use[r.job.user][2] += 1
            for uuid, amount in r.reserved.items():
                per_gpu[uuid] += amount
            if r.job.array_id is not None:
                tasks[r.job.array_id] += 1
        for g, m, n in use.values():
            assert not config.max_gpus_per_user or g <= config.max_gpus_per_user
            assert not config.max_mem_per_user_bytes or m <= config.max_mem_per_user_bytes
            assert not config.max_running_per_user or n <= config.max_running_per_user
        assert all(n <= 2 for n in tasks.values())
        totals = {g.uuid: g.total for g in gpus}
        assert all(amount <= totals[uuid] for uuid, amount in per_gpu.items())

    simulate(gpus, jobs, config, check=check)
