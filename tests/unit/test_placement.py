"""The pure placement function, example by example: order, best fit, backfill and
reservations, whole GPUs, constraints, caps, array throttles and the reasons it gives."""

from __future__ import annotations

from dataclasses import replace

from jobs.config import PolicyConfig
from jobs.states import Reason
from scheduler.policy.accounting import AccountingPolicy, GpuAccount
from scheduler.policy.placement import PendingJob, RunningJob, order_jobs, place

GIB = 2**30
POLICY = AccountingPolicy(headroom_bytes=0, spike_buffer_bytes=0, idle_gpu_max_used_bytes=0)
NOW = 10_000.0


def gpu(node: str, index: int, total: int = 24 * GIB, held: int = 0, jobs: int = 0, name: str = "Sim") -> GpuAccount:
    return GpuAccount(
        node=node, index=index, uuid=f"{node}-{index}", name=name, healthy=True, total=total,
        nvml_free=total - held, used=held, committed=held, gpulab_reserved=held, gpulab_used=held, jobs=jobs,
    )  # fmt: skip


def cluster(**nodes: list[int]) -> dict[str, list[GpuAccount]]:
    """cluster(a=[24, 24]) -> node a with two empty 24 GiB GPUs."""
    return {n: [gpu(n, i, t * GIB) for i, t in enumerate(totals)] for n, totals in nodes.items()}


def job(job_id: int, gpus: int = 1, mem: int | None = 10, **kw: object) -> PendingJob:
    return PendingJob(job_id, gpus, None if mem is None else mem * GIB, **kw)  # type: ignore[arg-type]


def placed(result: object) -> dict[int, tuple[str, tuple[int, ...]]]:
    return {a.job_id: (a.node, tuple(g.index for g in a.gpus)) for a in result.assignments}  # type: ignore[attr-defined]


def test_order_is_priority_then_submission() -> None:
    jobs = [job(1), job(2, priority=5), job(3), job(4, priority=5)]
    assert [j.id for j in order_jobs(jobs)] == [2, 4, 1, 3]


def test_best_fit_takes_the_smallest_hole_that_holds_the_job() -> None:
    accounts = {"a": [gpu("a", 0, held=4 * GIB), gpu("a", 1, held=12 * GIB)], "b": [gpu("b", 0, held=2 * GIB)]}
    assert placed(place([job(1, mem=10)], accounts, POLICY)) == {1: ("a", (1,))}
    assert placed(place([job(1, mem=15)], accounts, POLICY)) == {1: ("a", (0,))}


def test_multi_gpu_job_gets_n_gpus_on_one_node_each_with_its_memory() -> None:
    accounts = {
        "a": [gpu("a", 0), gpu("a", 1, held=20 * GIB)],  # only one GPU with 10 GiB free
        "b": [gpu("b", 0), gpu("b", 1), gpu("b", 2, held=10 * GIB)],
    }
    assert placed(place([job(1, gpus=2, mem=10)], accounts, POLICY)) == {1: ("b", (0, 2))}
    waiting = place([job(1, gpus=3, mem=15)], accounts, POLICY).waiting[1]
    assert waiting.reason == Reason.RESOURCES and "3x15.0GiB on one node" in waiting.detail


def test_whole_gpu_and_exclusive_jobs_need_idle_gpus() -> None:
    accounts = {"a": [gpu("a", 0, held=GIB, jobs=1), gpu("a", 1, total=16 * GIB), gpu("a", 2, total=80 * GIB)]}
    assert placed(place([job(1, mem=None)], accounts, POLICY)) == {1: ("a", (1,))}
    # --exclusive with --mem 40GiB: a whole GPU of at least 40 GiB.
    assert placed(place([job(1, mem=40, exclusive=True)], accounts, POLICY)) == {1: ("a", (2,))}
    result = place([job(1, mem=None), job(2, mem=1)], {"a": [gpu("a", 0)]}, POLICY)
    assert placed(result) == {1: ("a", (0,))} and 2 in result.waiting  # nothing shares a whole GPU
    # Whole-GPU jobs go where they leave the fewest idle GPUs: big idle groups stay together.
    accounts = {"a": [gpu("a", 0), gpu("a", 1)], "b": [gpu("b", 0), gpu("b", 1, held=GIB, jobs=1)]}
    assert placed(place([job(1, mem=None)], accounts, POLICY)) == {1: ("b", (0,))}


def test_a_big_head_job_does_not_block_small_ones_behind_it() -> None:
    accounts = cluster(a=[24])
    result = place([job(1, mem=30 - 10, priority=9), job(2, mem=10)], {"a": [gpu("a", 0, held=10 * GIB)]}, POLICY)
    assert placed(result) == {2: ("a", (0,))} and result.waiting[1].reason == Reason.RESOURCES
    assert placed(place([job(1, mem=20), job(2, mem=4)], accounts, POLICY)) == {1: ("a", (0,)), 2: ("a", (0,))}


def _busy(end: float | None) -> tuple[dict[str, list[GpuAccount]], list[RunningJob]]:
    accounts = {"a": [gpu("a", 0, held=16 * GIB, jobs=1)], "b": [gpu("b", 0, held=16 * GIB, jobs=1)]}
    running = [
        RunningJob(100, "x", "a", {"a-0": 16 * GIB}, ends_at=end),
        RunningJob(101, "x", "b", {"b-0": 16 * GIB}, ends_at=None if end is None else end + 100),
    ]
    return accounts, running


def test_a_job_blocked_past_the_threshold_reserves_and_holds_memory() -> None:
    accounts, running = _busy(NOW + 600)
    config = PolicyConfig(reserve_after_s=60)
    big = job(1, mem=20, submitted_at=NOW - 120, priority=5)
    long_small = job(2, mem=6, submitted_at=NOW)  # no time limit: would sit on the reserved memory
    short_small = job(3, mem=6, submitted_at=NOW, time_limit_s=300)  # ends before the big job's expected start
    result = place([big, long_small, short_small], accounts, POLICY, config=config, running=running, now=NOW)
    (plan,) = result.reservations
    assert (plan.job_id, plan.node, plan.gpu_indexes, plan.est_start) == (1, "a", (0,), NOW + 600)
    assert result.waiting[1].est_start == NOW + 600 and "reserved a GPU 0" in result.waiting[1].detail
    # The small job without a time limit may not take a's memory, but may use b's.
    assert placed(result) == {3: ("a", (0,)), 2: ("b", (0,))}
    young = place([replace(big, submitted_at=NOW - 10), long_small], accounts, POLICY, config=config, now=NOW)
    assert not young.reservations and placed(young) == {2: ("a", (0,))}  # under the threshold: plain backfill


def test_held_memory_is_not_lent_when_the_start_is_unknown() -> None:
    accounts, running = _busy(None)
    accounts["b"][0] = gpu("b", 0, held=24 * GIB, jobs=1)
    config = PolicyConfig(reserve_after_s=0)
    big = job(1, mem=20, priority=5)
    short = job(2, mem=6, time_limit_s=1)
    result = place([big, short], accounts, POLICY, config=config, running=running, now=NOW)
    assert result.reservations[0].est_start == float("inf") and result.waiting[1].est_start is None
    assert "start unknown" in result.waiting[1].detail
    assert not result.assignments
    assert result.waiting[2].reason == Reason.PRIORITY and "held for job 1" in result.waiting[2].detail


def test_fair_share_puts_the_light_user_first_and_aging_lifts_old_jobs() -> None:
    accounts = cluster(a=[24])
    jobs = [job(1, mem=20, user="heavy"), job(2, mem=20, user="light", submitted_at=NOW)]
    result = place(jobs, accounts, POLICY, usage={"heavy": 1e15}, now=NOW)
    assert placed(result) == {2: ("a", (0,))}
    config = PolicyConfig(weight_fairshare=0, weight_age=1000, max_age_s=3600)
    aged = [job(1, mem=20, submitted_at=NOW - 60), job(2, mem=20, priority=100, submitted_at=NOW)]
    assert placed(place(aged, accounts, POLICY, config=config, now=NOW)) == {2: ("a", (0,))}
    aged[0] = replace(aged[0], submitted_at=NOW - 3000)  # 833 points of age beat --priority 100
    assert placed(place(aged, accounts, POLICY, config=config, now=NOW)) == {1: ("a", (0,))}


def test_user_caps_keep_jobs_waiting_with_reason_user_limit() -> None:
    accounts = cluster(a=[80, 80, 80, 80])
    running = [RunningJob(100, "ann", "a", {"a-0": 10 * GIB})]
    config = PolicyConfig(max_running_per_user=2, max_gpus_per_user=3, max_mem_per_user_bytes=40 * GIB)
    jobs = [job(1, user="ann"), job(2, user="ann"), job(3, user="bob", gpus=4), job(4, user="cy", mem=None)]
    result = place(jobs, accounts, POLICY, config=config, running=running)
    assert set(placed(result)) == {1}
    assert result.waiting[2].reason == Reason.USER_LIMIT and "max_running_per_user" in result.waiting[2].detail
    assert result.waiting[3].reason == Reason.USER_LIMIT and "max_gpus_per_user" in result.waiting[3].detail
    assert result.waiting[4].reason == Reason.USER_LIMIT and "max_mem_per_user" in result.waiting[4].detail


def test_array_throttle_counts_running_tasks() -> None:
    accounts = cluster(a=[80])
    running = [RunningJob(10, "u", "a", {"a-0": GIB}, array_id=10)]
    tasks = [job(i, mem=1, array_id=10, array_throttle=2) for i in (11, 12, 13)]
    result = place(tasks, accounts, POLICY, running=running)
    assert set(placed(result)) == {11}
    assert {result.waiting[i].reason for i in (12, 13)} == {Reason.ARRAY_TASK_LIMIT}


def test_node_model_and_drain_constraints() -> None:
    accounts = {"a": [gpu("a", 0, name="NVIDIA A100-SXM4-80GB")], "b": [gpu("b", 0, name="NVIDIA RTX 4090")]}
    assert placed(place([job(1, gpu_model="a100")], accounts, POLICY)) == {1: ("a", (0,))}
    assert placed(place([job(1, node="b")], accounts, POLICY)) == {1: ("b", (0,))}
    drained = place([job(1, node="b"), job(2)], accounts, POLICY, unavailable_nodes=frozenset({"b"}))
    assert drained.waiting[1].reason == Reason.NODE_NOT_AVAIL and "draining" in drained.waiting[1].detail
    assert placed(drained) == {2: ("a", (0,))}
    gone = place([job(1, node="c")], accounts, POLICY).waiting[1]
    assert (gone.reason, gone.detail) == (Reason.NODE_NOT_AVAIL, "node c is not online")
    none = place([job(1, gpu_model="H100")], accounts, POLICY).waiting[1]
    assert none.reason == Reason.INFEASIBLE and "H100" in none.detail


def test_reasons_for_impossible_requests_and_an_empty_cluster() -> None:
    accounts = cluster(a=[24, 24])
    result = place([job(1, gpus=3), job(2, mem=30)], accounts, POLICY)
    assert result.waiting[1].reason == Reason.INFEASIBLE and "largest node has 2" in result.waiting[1].detail
    assert result.waiting[2].reason == Reason.INFEASIBLE and "largest GPU offers 24.0GiB" in result.waiting[2].detail
    assert place([job(1)], {}, POLICY).waiting[1].detail == "no worker is online"


def test_place_does_not_modify_its_inputs() -> None:
    accounts = cluster(a=[24, 24])
    before = {n: [replace(g) for g in gs] for n, gs in accounts.items()}
    place([job(1), job(2, mem=None), job(3, gpus=2, mem=5)], accounts, POLICY)
    assert accounts == before
