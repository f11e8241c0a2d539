"""The trace-replay simulator (bench/replay): small traces whose schedule is known by hand,
the event order, invariants over random traces (no policy over-commits), and the gpulab
adapter's prefilter giving the same answers as handing `place` the whole queue."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import pytest

from bench.replay.gpulab_policy import GpulabPolicy
from bench.replay.metrics import percentile, summarise, table
from bench.replay.policies import BestFit, EasyBackfill, FifoExclusive, TaskSpooler
from bench.replay.sim import GiB, Gpu, Node, OverCommit, Policy, Queue, SimJob, Start, make_nodes, simulate
from bench.replay.traces import LUCID_BANDS, TRACE_DIR, compress, load_openb, load_philly, lucid_mem
from jobs.config import PolicyConfig
from scheduler.policy.accounting import AccountingPolicy

NO_HEADROOM = AccountingPolicy(headroom_bytes=0)
ONE_GPU = [[16 * GiB]]


def all_policies() -> list[Policy]:
    return [
        FifoExclusive(),
        TaskSpooler(),
        EasyBackfill(),
        BestFit(),
        GpulabPolicy("gpulab", config=PolicyConfig()),
        GpulabPolicy("gpulab-no-time", config=PolicyConfig(), time_limits=False),
        GpulabPolicy("gpulab-no-headroom", policy=NO_HEADROOM, config=PolicyConfig()),
    ]


def starts(policy: Policy, jobs: list[SimJob], cluster: list[list[int]] = ONE_GPU) -> list[tuple[float, float]]:
    return [(r.start, r.end) for r in simulate(jobs, policy, cluster, check=True).jobs]


# ---- schedules known by hand --------------------------------------------------------------------


def test_two_half_gpu_jobs_share_a_gpu_only_under_packing() -> None:
    jobs = [SimJob(1, 0.0, 10.0, 1, 8 * GiB), SimJob(2, 0.0, 10.0, 1, 8 * GiB)]
    together, one_after_other = [(0.0, 10.0), (0.0, 10.0)], [(0.0, 10.0), (10.0, 20.0)]
    assert starts(BestFit(), jobs) == together
    assert starts(GpulabPolicy(policy=NO_HEADROOM, config=PolicyConfig()), jobs) == together
    assert starts(FifoExclusive(), jobs) == one_after_other
    assert starts(EasyBackfill(), jobs) == one_after_other
    # task-spooler: the first job uses half the card, so the GPU is no longer "> 90% free".
    assert starts(TaskSpooler(), jobs) == one_after_other
    # gpulab keeps 256 MiB headroom per GPU: two exact halves do not fit together.
    assert starts(GpulabPolicy(config=PolicyConfig()), jobs) == one_after_other


def test_jct_wait_and_memory_utilisation_are_exact() -> None:
    jobs = [SimJob(1, 0.0, 10.0, 1, 8 * GiB), SimJob(2, 0.0, 10.0, 1, 8 * GiB)]
    exclusive = summarise(simulate(jobs, FifoExclusive(), ONE_GPU))
    assert (exclusive.avg_jct_s, exclusive.p95_jct_s, exclusive.mean_wait_s, exclusive.makespan_s) == (15, 20, 5, 20)
    assert exclusive.queued_s == 10.0  # job 2 waits from 0 to 10
    assert exclusive.mem_util_queued == 0.5  # meanwhile job 1 holds the 8 GiB it asked for, of 16
    packed = summarise(simulate(jobs, BestFit(), ONE_GPU))
    assert (packed.avg_jct_s, packed.mean_wait_s, packed.makespan_s, packed.queued_s) == (10, 0, 10, 0)
    assert "| fifo-exclusive | 2 |" in table([exclusive, packed])


def test_a_gpu_freed_at_t_is_used_by_a_job_arriving_at_t() -> None:
    """At one instant: ends first, then arrivals, then one scheduling pass."""
    jobs = [SimJob(1, 0.0, 10.0, 1, None), SimJob(2, 10.0, 5.0, 1, None)]
    for policy in (FifoExclusive(), EasyBackfill(), BestFit(), GpulabPolicy(config=PolicyConfig())):
        assert starts(policy, jobs) == [(0.0, 10.0), (10.0, 15.0)], policy.name


def test_jobs_arriving_together_start_in_id_order() -> None:
    jobs = [SimJob(i, 0.0, 10.0, 1, None) for i in (1, 2, 3)]
    assert starts(FifoExclusive(), jobs) == [(0.0, 10.0), (10.0, 20.0), (20.0, 30.0)]


def test_easy_backfill_starts_only_jobs_that_do_not_delay_the_head() -> None:
    node = [[16 * GiB, 16 * GiB]]
    jobs = [
        SimJob(1, 0.0, 100.0, 1, None),
        SimJob(2, 1.0, 10.0, 2, None),  # the head: both GPUs, free at t=100
        SimJob(3, 2.0, 50.0, 1, None),  # ends at 52 < 100: may jump ahead
        SimJob(4, 3.0, 200.0, 1, None),  # would hold a GPU past 100: must wait
    ]
    assert starts(EasyBackfill(), jobs, node) == [(0, 100), (100, 110), (2, 52), (110, 310)]
    assert starts(FifoExclusive(), jobs, node) == [(0, 100), (100, 110), (110, 160), (110, 310)]


def test_task_spooler_co_locates_without_looking_at_requests_and_that_ooms() -> None:
    small = SimJob(1, 0.0, 10.0, 1, 1 * GiB)  # leaves the card 94% free: "free" to task-spooler
    whole = SimJob(2, 0.0, 10.0, 1, None)  # a whole GPU's worth
    result = simulate([small, whole], TaskSpooler(), ONE_GPU, check=True)
    assert [(r.start, r.oom) for r in result.jobs] == [(0.0, False), (0.0, True)]
    for policy in (FifoExclusive(), BestFit(), GpulabPolicy(config=PolicyConfig())):
        assert summarise(simulate([small, whole], policy, ONE_GPU, check=True)).oom == 0


def schedule_once(policy: Policy, queue: Queue, nodes: list[Node], now: float) -> list[Start]:
    launched: list[Start] = []

    def launch(start: Start) -> None:
        launched.append(start)
        queue.remove(start.job)

    policy.schedule(now, queue, nodes, launch)
    return launched


def test_multi_gpu_jobs_take_all_their_gpus_on_one_node() -> None:
    """One free GPU on each of two nodes is not room for a 2-GPU job; two on one node is."""
    for policy in all_policies():
        nodes = make_nodes([[16 * GiB] * 2, [16 * GiB] * 2])
        for node in nodes:  # GPU 0 of every node is taken by a whole-GPU job
            gpu = node.gpus[0]
            gpu.jobs, gpu.whole, gpu.requested, gpu.used = 1, 1, gpu.cap, gpu.cap
        queue = Queue()
        queue.add(SimJob(1, 0.0, 10.0, 2, 4 * GiB))
        assert schedule_once(policy, queue, nodes, 0.0) == [], policy.name
        nodes[1].gpus[0] = Gpu(16 * GiB)  # node 1 is free again
        assert [(s.node, s.gpus) for s in schedule_once(policy, queue, nodes, 1.0)] == [(1, (0, 1))], policy.name


def test_a_job_no_node_can_hold_is_reported() -> None:
    with pytest.raises(RuntimeError, match="can never start"):
        simulate([SimJob(1, 0.0, 1.0, 2, None)], FifoExclusive(), ONE_GPU)


# ---- invariants over random traces --------------------------------------------------------------


def random_trace(seed: int, n: int = 150) -> list[SimJob]:
    rng = random.Random(seed)
    jobs, t = [], 0.0
    for i in range(1, n + 1):
        t += rng.choice([0.0, 0.0, rng.expovariate(1 / 20)])  # bursts of simultaneous arrivals
        gpus = rng.choice([1, 1, 1, 1, 2, 4])
        mem = None if rng.random() < 0.3 else rng.choice([2, 4, 6, 8, 12]) * GiB
        jobs.append(SimJob(i, t, float(rng.randint(1, 300)), gpus, mem))
    return jobs


CLUSTER = [[16 * GiB] * 4, [24 * GiB] * 4]


@pytest.mark.parametrize("seed", range(4))
def test_no_policy_over_commits_and_request_packers_never_oom(seed: int) -> None:
    jobs = random_trace(seed)
    for policy in all_policies():
        result = simulate(jobs, policy, CLUSTER, check=True)  # raises OverCommit on a breach
        assert len(result.jobs) == len(jobs)
        assert all(r.start >= r.job.arrival and r.end == r.start + r.job.duration for r in result.jobs)
        if policy.by_request:
            assert summarise(result).oom == 0, policy.name


def test_the_checker_catches_an_over_commit() -> None:
    class Greedy(BestFit):
        name = "greedy"

        def schedule(self, now: float, queue: Queue, nodes: list[Node], launch: Callable[[Start], None]) -> None:
            for job in list(queue):
                launch(Start(job, 0, tuple(range(job.gpus))))

    with pytest.raises(OverCommit):
        simulate([SimJob(1, 0, 1, 1, 12 * GiB), SimJob(2, 0, 1, 1, 12 * GiB)], Greedy(), ONE_GPU, check=True)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "make",
    [
        lambda p: GpulabPolicy(config=PolicyConfig(reserve_after_s=30.0), prefilter=p),
        lambda p: GpulabPolicy(config=PolicyConfig(reserve_after_s=30.0), time_limits=False, prefilter=p),
        lambda p: GpulabPolicy(config=PolicyConfig(max_reservations=0), prefilter=p),
        lambda p: GpulabPolicy(policy=NO_HEADROOM, config=PolicyConfig(), prefilter=p),
    ],
)
def test_prefilter_gives_the_same_schedule_as_the_whole_queue(seed: int, make: Callable[[bool], GpulabPolicy]) -> None:
    jobs = compress(random_trace(seed, 200), 3.0)  # denser arrivals: long queues, reservations
    fast = simulate(jobs, make(True), CLUSTER, check=True)
    full = simulate(jobs, make(False), CLUSTER, check=True)
    assert [(r.start, r.end) for r in fast.jobs] == [(r.start, r.end) for r in full.jobs]
    assert max(q for _, _, q in full.timeline) > 10  # the case is not trivial: jobs did queue


# ---- traces and metrics ---------------------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 95) == 95.0
    assert percentile([], 50) == 0.0


def test_lucid_memory_draw_follows_the_stated_bands() -> None:
    rng = random.Random(1)
    draws = [lucid_mem(rng) for _ in range(20_000)]
    assert min(draws) >= 2 * GiB and max(draws) <= 20 * GiB
    assert all(d % (256 * 2**20) == 0 for d in draws)
    under4 = sum(d <= 4 * GiB for d in draws) / len(draws)
    under8 = sum(d <= 8 * GiB for d in draws) / len(draws)
    assert abs(under4 - LUCID_BANDS[0][0]) < 0.02
    assert abs(under8 - (LUCID_BANDS[0][0] + LUCID_BANDS[1][0])) < 0.02


needs_traces = pytest.mark.skipif(not (TRACE_DIR / "openb_pod_list_default.csv").exists(), reason="no traces")


@needs_traces
def test_openb_maps_fractions_to_memory_and_drops_pods_that_never_ran() -> None:
    jobs = load_openb(16 * GiB)
    assert len(jobs) == 6203  # 7064 GPU pods - 861 never scheduled
    assert [j.id for j in jobs] == list(range(1, len(jobs) + 1))
    assert all(a.arrival <= b.arrival for a, b in itertools.pairwise(jobs))
    assert all(j.mem is None or j.mem < 16 * GiB for j in jobs)
    assert {j.gpus for j in jobs} == {1, 2, 4, 8}
    assert all(j.mem is None for j in jobs if j.gpus > 1)


@needs_traces
def test_philly_is_one_virtual_cluster_with_seeded_memory() -> None:
    a, b = load_philly(seed=3), load_philly(seed=3)
    assert len(a) == 41226
    assert [j.mem for j in a[:100]] == [j.mem for j in b[:100]]
    assert max(j.gpus for j in a) <= 8
