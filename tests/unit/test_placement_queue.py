"""`place_queue` (groups merged by their heads, blocked groups answered whole) decides
exactly what the one-job-at-a-time loop decides: same assignments, same reservations, the
same reason for every waiting job."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.config import PolicyConfig
from scheduler.policy.placement import PendingJob, WaitingQueue, place, place_queue
from tests.unit.placement_reference import reference_place
from tests.unit.placement_sim import POLICY, Gpu
from tests.unit.test_placement_props import busy_sim, clusters, policies, queues


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    clusters(), queues(), policies(),
    st.lists(st.tuples(st.integers(0, 11), st.integers(1, 40), st.sampled_from([None, 20.0, 80.0])), max_size=6),
    st.sampled_from([frozenset(), frozenset({"n1"})]), st.dictionaries(st.sampled_from("abc"), st.floats(0, 1e14)),
    st.sampled_from([0.0, 60.0, 1000.0]), st.integers(1, 4),
)  # fmt: skip
def test_grouped_placement_decides_as_the_job_by_job_loop(
    gpus: list[Gpu], jobs: list[PendingJob], config: PolicyConfig,
    occupants: list[tuple[int, int, float | None]], drained: frozenset[str], usage: dict[str, float],
    now: float, copies: int,
) -> None:  # fmt: skip
    # Copies of the queue make long groups of one shape: what skipping is for.
    jobs = [j.__class__(**{**j.__dict__, "id": j.id + 100 * c}) for c in range(copies) for j in jobs]
    sim = busy_sim(gpus, config, occupants)
    sim.unavailable = drained
    accounts, running = sim.accounts(), sim.running_jobs()
    kwargs = {"config": config, "running": running, "usage": usage, "now": now, "unavailable_nodes": drained}
    expected = reference_place(jobs, accounts, POLICY, **kwargs)  # type: ignore[arg-type]
    for result in (
        place(jobs, accounts, POLICY, **kwargs),  # type: ignore[arg-type]
        place_queue(WaitingQueue(jobs), accounts, POLICY, **kwargs),  # type: ignore[arg-type]
        place_queue(WaitingQueue(jobs), accounts, POLICY, skip_blocked_groups=False, **kwargs),  # type: ignore[arg-type]
    ):
        assert result.assignments == expected.assignments
        assert result.reservations == expected.reservations
        assert result.waiting == expected.waiting
    assert place(jobs, accounts, POLICY, **kwargs).order == expected.order  # type: ignore[arg-type]


def test_a_queue_kept_across_changes_holds_each_job_once_in_submission_order() -> None:
    queue = WaitingQueue()
    for job_id, at in ((3, 5.0), (1, 1.0), (2, 5.0), (4, 0.5)):
        queue.add(PendingJob(job_id, 1, 2**30, user="a", submitted_at=at))
    queue.add(PendingJob(5, 1, None, user="b"))
    assert [j.id for j in queue] == [4, 1, 2, 3, 5]
    queue.discard(2)
    queue.discard(2)
    queue.add(PendingJob(1, 1, 2**30, user="a", submitted_at=1.0))  # replaced, not doubled
    assert [j.id for j in queue] == [4, 1, 3, 5] and len(queue) == 4 and queue.users() == {"a", "b"}
    _ids_follow_groups(queue)
    queue.discard(5)
    assert queue.users() == {"a"} and 5 not in queue
    _ids_follow_groups(queue)


def _ids_follow_groups(queue: WaitingQueue) -> None:
    """The id lists placement answers blocked tails from are the groups' ids, in order."""
    assert queue.ids == {key: [j.id for j in group] for key, group in queue.groups.items()}


def test_a_negative_age_weight_still_orders_as_rank_does() -> None:
    jobs = [PendingJob(i, 1, 30 * 2**30, user="a", submitted_at=float(i)) for i in range(1, 6)]
    gpus = [Gpu("n0", 0, 40 * 2**30, "NVIDIA A100")]
    config = PolicyConfig(weight_age=-1000.0, max_age_s=100.0)
    accounts = busy_sim(gpus, config, []).accounts()
    expected = reference_place(jobs, accounts, POLICY, config=config, now=50.0)
    got = place_queue(WaitingQueue(jobs), accounts, POLICY, config=config, now=50.0)
    assert [a.job_id for a in got.assignments] == [a.job_id for a in expected.assignments] == [5]
    assert got.waiting == expected.waiting


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 30), st.sampled_from([1.0, 2.0, 3.0]), st.sampled_from("ab"))))
def test_adds_and_discards_in_any_order_keep_each_group_sorted(ops: list[tuple[bool, int, float, str]]) -> None:
    """Discard finds a job by bisection on (submitted_at, id), wherever it is in its group."""
    queue, model = WaitingQueue(), {}
    for add, job_id, at, user in ops:
        if add:
            job = PendingJob(job_id, 1, 2**30, user=user, submitted_at=at)
            queue.add(job)
            model[job_id] = job
        else:
            queue.discard(job_id)
            model.pop(job_id, None)
    assert len(queue) == len(model) and queue.users() == {j.user for j in model.values()}
    for key, group in queue.groups.items():
        assert group == sorted((j for j in model.values() if j.user == key[0]), key=lambda j: (j.submitted_at, j.id))
    _ids_follow_groups(queue)
